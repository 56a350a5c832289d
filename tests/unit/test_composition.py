"""domain_statistics="auto": each query batch adapts every normalisation layer only when its
estimated cell-type mix is the reference's (atlas.mapping.composition)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from atlas.mapping.composition import (
    MIN_OVERLAP,
    ReferenceMix,
    batch_mix,
    choose_layers,
    embed_by_mix,
    mix_chooser,
    overlaps,
)
from atlas.mapping.domains import QueryDomains, query_domains
from atlas.mapping.embedding import embed_auto, embed_prepared, local_embed
from atlas.mapping.heads import Heads
from atlas.models.layers import DomainBatchNorm1d
from tests.unit.test_query_domains import _model_and_cells

CLASSES = ("B", "T")


def _heads() -> Heads:
    # Class by the larger of the embedding's two coordinates (sharp enough to be a hard call).
    return Heads(levels=("l1",), classes=(CLASSES,), weights=((np.eye(2, dtype=np.float32) * 50, np.zeros(2)),))


def _manifest(b: int, t: int) -> dict:
    return {"mapping": {"composition": {"l1": {"B": b, "T": t}}}}


def test_overlap_is_one_minus_total_variation():
    reference = ReferenceMix.of(_manifest(1, 1), _heads())
    assert reference is not None
    sums = np.array([[5.0, 5.0], [10.0, 0.0], [2.0, 8.0], [0.0, 0.0]])
    cells = np.array([10, 10, 10, 0])
    np.testing.assert_allclose(overlaps(sums, cells, reference), [1.0, 0.5, 0.7, 0.0])
    np.testing.assert_array_equal(choose_layers(np.array([1.0, 0.5, MIN_OVERLAP, 0.0])), [True, False, True, False])


def test_no_reference_mix_without_heads_or_composition():
    assert ReferenceMix.of(_manifest(1, 1), None) is None
    assert ReferenceMix.of({"mapping": {}}, _heads()) is None  # an atlas built before the composition was written
    assert ReferenceMix.of(_manifest(0, 0), _heads()) is None


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(0, 40), st.just(3)), elements=st.floats(0, 1)),
       st.integers(1, 4), st.integers(0, 40), st.lists(st.integers(0, 1000), min_size=3, max_size=3))
def test_mix_sums_add_up_over_blocks_and_overlap_stays_in_unit_interval(p, n_domains, cut, counts):
    """Blocks of a query (the offline mapper's) add up to the whole query's sums; any mix overlaps
    the reference's by a number in [0, 1]."""
    p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    codes = np.random.default_rng(len(p)).integers(-1, n_domains, size=len(p))
    whole, cells = batch_mix(p, codes, n_domains)
    a, ca = batch_mix(p[:cut], codes[:cut], n_domains)
    b, cb = batch_mix(p[cut:], codes[cut:], n_domains)
    np.testing.assert_allclose(a + b, whole, atol=1e-9)
    np.testing.assert_array_equal(ca + cb, cells)
    heads = Heads(levels=("l1",), classes=(("x", "y", "z"),), weights=((np.zeros((3, 2), np.float32), np.zeros(3)),))
    reference = ReferenceMix.of({"mapping": {"composition": {"l1": dict(zip("xyz", counts))}}}, heads)
    if reference is None:
        assert sum(counts) == 0
        return
    o = overlaps(whole, cells, reference)
    assert o.shape == (n_domains,) and np.all((o >= -1e-9) & (o <= 1 + 1e-9))


def test_deep_mask_adapts_every_layer_of_the_marked_domain_only():
    """One embedding with deep=(True, False) equals each batch alone with 'all' and 'input'."""
    model, aligned = _model_and_cells()
    n = aligned["protein"].shape[0]
    codes = np.where(np.arange(n) < n // 2, 0, 1)
    mixed, _ = embed_prepared(aligned, model, domains=codes, layers="all", deep=np.array([True, False]))
    first = {"protein": aligned["protein"][: n // 2]}
    second = {"protein": aligned["protein"][n // 2 :]}
    all_first, _ = embed_prepared(first, model, domains=np.zeros(n // 2, dtype=int), layers="all")
    input_second, _ = embed_prepared(second, model, domains=np.zeros(n - n // 2, dtype=int), layers="input")
    np.testing.assert_allclose(mixed[: n // 2], all_first, atol=1e-5)
    np.testing.assert_allclose(mixed[n // 2 :], input_second, atol=1e-5)
    assert np.abs(all_first - embed_prepared(first, model, domains=np.zeros(n // 2, dtype=int))[0]).max() > 1e-3


@pytest.mark.parametrize("composition,expected", [((1, 1), (True, False)), ((0, 1), (False, True))])
def test_the_chooser_adapts_every_layer_where_the_mix_is_the_references(composition, expected):
    """Batch 0 is half B, half T; batch 1 all T. Against a half-and-half reference only batch 0
    adapts every layer; against an all-T reference only batch 1 does."""
    n = 40
    codes = np.repeat([0, 1], n)
    emb = np.zeros((2 * n, 2), np.float32)
    emb[: n // 2, 0] = emb[n // 2 :, 1] = 1.0  # batch 0: 20 B then 20 T; batch 1: 40 T
    reference = ReferenceMix.of(_manifest(*composition), _heads())
    overlap, deep = mix_chooser(_heads(), reference)(emb, codes, 2)
    assert tuple(deep) == expected
    assert overlap[0] == pytest.approx(1.0 if composition == (1, 1) else 0.5, abs=1e-3)


def test_auto_asks_the_encoder_once_and_reports_its_choice():
    n = 40
    batches = np.array(["mixed"] * n + ["sorted"] * n)
    domains, report = query_domains(batches, np.ones(2 * n, dtype=bool), statistics="auto", min_cells=10,
                                    batch_key="sample")
    assert domains is not None and domains.layers == "auto"
    calls: list[QueryDomains] = []

    def embed(aligned, decode, seen):
        calls.append(seen)
        return np.ones((2 * n, 2), np.float32), {}, QueryDomains(seen.codes, "all", (True, False), overlap=(0.9, 0.4))

    emb, _, used = embed_by_mix({}, {}, domains, embed, _heads(), _manifest(1, 1), report, min_overlap=0.7)
    assert len(calls) == 1 and calls[0].layers == "auto" and calls[0].min_overlap == 0.7
    assert used.deep == (True, False)
    assert {k: (v["layers"], v["composition_overlap"]) for k, v in report["batches"].items()} == {
        "mixed": ("all", 0.9), "sorted": ("input", 0.4)}
    assert report["min_overlap"] == 0.7


@pytest.mark.parametrize("deep", [(True, False), (False, True), (False, False), (True, True)])
def test_auto_in_one_go_equals_input_then_every_layer(deep):
    """embed_auto gives what embedding with input statistics and again with every layer adapted
    for the chosen batches gives, from 3 forward passes over the cells instead of 5; the chooser
    sees the input-statistics embedding."""
    model, aligned = _model_and_cells()
    n = aligned["protein"].shape[0]
    codes = np.where(np.arange(n) < n // 2, 0, 1)
    seen = []

    def choose(emb, c, n_domains):
        seen.append(emb.copy())
        return np.array([0.5, 0.5]), np.array(deep)

    passes = []  # forward passes through the input normalisation (the mapping copy keeps the hook)
    first = next(m for m in model.modules() if isinstance(m, DomainBatchNorm1d) and m.normalises_input)
    hook = first.register_forward_pre_hook(lambda module, inputs: passes.append(1))
    try:
        emb, _, overlap, chosen = embed_auto(aligned, model, codes, choose, batch_size=4 * n)
    finally:
        hook.remove()
    assert len(passes) == (3 if any(deep) else 2)
    input_emb, _ = embed_prepared(aligned, model, domains=codes, layers="input")
    np.testing.assert_allclose(seen[0], input_emb, atol=1e-5)
    expected = embed_prepared(aligned, model, domains=codes, layers="all", deep=np.array(deep))[0] if any(deep) \
        else input_emb
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    assert tuple(chosen) == deep and list(overlap) == [0.5, 0.5]


def test_local_embed_resolves_auto_with_the_atlas_heads():
    model, aligned = _model_and_cells()
    n = aligned["protein"].shape[0]
    codes = np.where(np.arange(n) < n // 2, 0, 1)
    width = embed_prepared(aligned, model)[0].shape[1]
    heads = Heads(levels=("l1",), classes=(CLASSES,), weights=((np.zeros((2, width), np.float32), np.zeros(2)),))
    embed = local_embed(model, _manifest(1, 1), heads=heads)
    emb, _, used = embed(aligned, {}, QueryDomains(codes, "auto", min_overlap=0.6))
    # Heads that cannot tell B from T estimate a half-and-half mix for every batch: all adapt.
    assert used.layers == "all" and used.deep == (True, True)
    assert used.overlap == pytest.approx((1.0, 1.0))
    np.testing.assert_allclose(emb, embed_prepared(aligned, model, domains=codes, layers="all")[0], atol=1e-5)
    _, _, strict = embed(aligned, {}, QueryDomains(codes, "auto", min_overlap=1.01))
    assert strict.layers == "input" and strict.deep is None


def test_auto_without_heads_keeps_input_statistics_and_says_so():
    n = 30
    domains, report = query_domains(np.array(["a"] * n), np.ones(n, dtype=bool), statistics="auto", min_cells=10)
    calls = []

    def embed(aligned, decode, seen):
        calls.append(seen)
        return np.zeros((n, 2), np.float32), {}, seen

    _, _, used = embed_by_mix({}, {}, domains, embed, None, _manifest(1, 1), report)
    assert len(calls) == 1 and used.layers == "input"
    assert report["batches"]["a"]["layers"] == "input" and "no label heads" in report["auto"]


def test_the_choice_is_described_in_one_line():
    from atlas.mapping.domains import describe_domains

    report = {"statistics": "auto", "batches": {
        "blood": {"cells": 500, "own_statistics": True, "layers": "all", "composition_overlap": 0.78},
        "sorted": {"cells": 300, "own_statistics": True, "layers": "input", "composition_overlap": 0.49},
        "tiny": {"cells": 5, "own_statistics": False}}}
    assert describe_domains(report) == ("query statistics (auto): blood every layer (mix overlap 0.78), sorted input "
                                        "layer (mix overlap 0.49), tiny reference average")
    assert describe_domains({"statistics": "input", "batches": {"a": {"own_statistics": True}}}) == (
        "query statistics (input): a input layer")
    assert describe_domains({"statistics": "auto", "batches": {}}) == ""
