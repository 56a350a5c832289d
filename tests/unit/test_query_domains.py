"""Query-domain normalisation: each query batch normalised by its own exact statistics
(atlas.mapping.domains, atlas.models.recalibrate.with_query_domains, embed_prepared)."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from atlas.mapping.domains import FixedDomains, query_domains
from atlas.mapping.embedding import embed_prepared
from atlas.models.concerto import ConcertoConfig
from atlas.models.config import build_model
from atlas.models.recalibrate import add_query_domains, query_statistics, set_query_statistics


def _model_and_cells(n=60, seed=0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(ConcertoConfig(modalities=("protein",), embed_dim=8), {"protein": 7}, 3).eval()
    # Two query batches with different scales (another protocol's shift), as log-normalised values.
    scale = np.where(np.arange(n) < n // 2, 1.0, 3.0)[:, None]
    values = np.log1p(rng.poisson(rng.uniform(0.5, 6, size=(n, 7)) * scale)).astype(np.float32)
    return model, {"protein": sp.csr_matrix(values)}


def test_codes_follow_batches_minimum_and_empty_cells():
    batches = np.array(["b", "a", "a", "b", "c", "a", "b"])
    has_data = np.array([True, True, True, True, True, False, True])
    domains, report = query_domains(batches, has_data, statistics="input", min_cells=2, batch_key="sample")
    # a: 2 cells with data (one empty), b: 3, c: 1 (below the minimum: the reference average)
    np.testing.assert_array_equal(domains.codes, [1, 0, 0, 1, -1, -1, 1])
    assert domains.layers == "input"
    assert report["batches"] == {"a": {"cells": 3, "own_statistics": True}, "b": {"cells": 3, "own_statistics": True},
                                 "c": {"cells": 1, "own_statistics": False}}
    none, report = query_domains(batches, has_data, statistics="reference", min_cells=2, batch_key=None)
    assert none is None and not any(b["own_statistics"] for b in report["batches"].values())
    empty, _ = query_domains(np.array([], dtype=str), np.array([], dtype=bool), statistics="all", min_cells=2,
                             batch_key=None)
    assert empty is None


def test_a_batch_embeds_the_same_alone_or_beside_another_and_the_model_is_untouched():
    model, aligned = _model_and_cells()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = aligned["protein"].shape[0]
    both = np.where(np.arange(n) < n // 2, 0, 1)
    emb_both, _ = embed_prepared(aligned, model, domains=both)
    first = {"protein": aligned["protein"][: n // 2]}
    emb_first, _ = embed_prepared(first, model, domains=np.zeros(n // 2, dtype=int))
    np.testing.assert_allclose(emb_both[: n // 2], emb_first, atol=1e-5)
    # Its own statistics change the embedding (the point of it) ...
    emb_reference, _ = embed_prepared(aligned, model)
    assert np.abs(emb_reference - emb_both).max() > 1e-3
    # ... and leave the shared model as it was (a Serve replica embeds other requests with it).
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_statistics_shipped_to_another_process_give_the_same_embedding():
    """The offline mapper's path: statistics computed once, set into each actor's own copy."""
    model, aligned = _model_and_cells()
    n = aligned["protein"].shape[0]
    codes = np.where(np.arange(n) < n // 2, 0, 1)
    direct, _ = embed_prepared(aligned, model, domains=codes, layers="all")

    from atlas.mapping.embedding import forward
    from atlas.models.recalibrate import with_query_domains

    adapted, offset = with_query_domains(model, 2, lambda m, o: forward(aligned, m, codes + o, None, 1024, "cpu", {}),
                                         layers="all")
    shipped = query_statistics(adapted, offset)
    copy, offset2 = add_query_domains(model, 2)
    set_query_statistics(copy, offset2, shipped)
    fixed = FixedDomains(("a", "b"), (True, True), offset2)
    absolute = fixed.codes(np.where(codes == 0, "a", "b"), np.ones(n, dtype=bool))
    via_fixed, _ = embed_prepared(aligned, copy, domains=absolute, domains_set=True)
    np.testing.assert_allclose(via_fixed, direct, atol=1e-6)
    # keep=False for a batch: its cells use the reference average, as below the minimum
    set_query_statistics(copy, offset2, shipped, keep=np.array([False, True]))
    half, _ = embed_prepared(aligned, copy, domains=np.where(codes == 0, -1, absolute), domains_set=True)
    reference, _ = embed_prepared(aligned, model)
    np.testing.assert_allclose(half[: n // 2], reference[: n // 2], atol=1e-6)


@pytest.mark.parametrize("n_query", [1, 3])
def test_added_domains_start_at_the_reference_average(n_query):
    model, aligned = _model_and_cells()
    copy, offset = add_query_domains(model, n_query)
    n = aligned["protein"].shape[0]
    unset, _ = embed_prepared(aligned, copy, domains=np.full(n, offset), domains_set=True)
    reference, _ = embed_prepared(aligned, model)
    np.testing.assert_allclose(unset, reference, atol=1e-6)


@pytest.mark.parametrize("layers,adapted", [("input", {"value_norm"}), ("all", {"value_norm", "norm"})])
def test_input_adapts_only_the_value_normalisation(layers, adapted):
    """'input' sets the query statistics of the layer over the measured values only; deeper
    layers keep the reference average (their features carry the batch's cell-type mix)."""
    from atlas.mapping.embedding import forward
    from atlas.models.layers import DomainBatchNorm1d
    from atlas.models.recalibrate import with_query_domains

    model, aligned = _model_and_cells()
    n = aligned["protein"].shape[0]
    copy, offset = with_query_domains(model, 1, lambda m, o: forward(aligned, m, np.full(n, o), None, 1024, "cpu", {}),
                                      layers=layers)
    teacher = copy.teachers["protein"]
    set_layers = {name for name in ("value_norm", "norm")
                  if int(getattr(teacher, name).domain_batches[offset]) > 0}
    assert set_layers == adapted
    assert all(isinstance(getattr(teacher, name), DomainBatchNorm1d) for name in ("value_norm", "norm"))
    values = aligned["protein"].data.astype(np.float64)
    np.testing.assert_allclose(float(teacher.value_norm.running_mean[offset, 0]), values.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(teacher.value_norm.running_var[offset, 0]), values.var(ddof=1), rtol=1e-4)
