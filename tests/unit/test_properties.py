"""Property-based tests of the pure functions on the input path.

Generated count matrices put empty rows anywhere (first, last, all, none), have zero rows, one
row, one feature, duplicate and unsorted indices, huge and tiny values, int and float dtypes.
Each property is checked against a plain reference implementation (scanpy's ``normalize_total``
+ ``log1p`` on the dense matrix, a Python loop) or states an invariant. A query whose last cell
had no counts crashed ``normalize_log1p`` (``add.reduceat`` out of bounds) before these existed.
"""

from __future__ import annotations

import io
import os
import types
import zipfile

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from atlas import wire
from atlas.data.arrow import list_column_csr
from atlas.data.batches import csr_to_batch, normalize_log1p, pad_rows, row_totals, tfidf_log1p, top_k_per_row
from atlas.mapping.align import align_query

# Bounded and reproducible in `make test` (the same examples every run); a wider random search:
# ATLAS_HYPOTHESIS_EXAMPLES=2000 pytest tests/unit/test_properties.py
_WIDE = int(os.environ.get("ATLAS_HYPOTHESIS_EXAMPLES", "0"))
settings.register_profile("atlas", max_examples=_WIDE or 60, deadline=None, derandomize=not _WIDE,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("atlas")

EMPTY_ROWS = st.sampled_from(["none", "first", "last", "all", "random"])


@st.composite
def count_matrices(draw, max_rows: int = 12, max_cols: int = 9, integer: bool | None = None):
    """A scipy CSR of non-negative counts with empty rows placed by an EMPTY_ROWS policy."""
    n_rows = draw(st.integers(0, max_rows))
    n_cols = draw(st.integers(1, max_cols))
    integer = draw(st.booleans()) if integer is None else integer
    if integer:
        dtype = draw(st.sampled_from([np.int32, np.int64, np.uint16]))
        values = st.integers(0, 2**15 - 1)
    else:
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        # No subnormals: no count is 1e-45, and scanpy leaves such a cell unscaled (we scale it).
        values = st.one_of(st.floats(0, 1e6, width=32, allow_subnormal=False),
                           st.sampled_from([0.0, 1e-30, 1e-6, 3.0, 1e7]))
    dense = draw(hnp.arrays(dtype, (n_rows, n_cols), elements=values))
    dense = dense * draw(hnp.arrays(np.bool_, (n_rows, n_cols)))  # sparsity
    policy = draw(EMPTY_ROWS)
    if n_rows:
        if policy == "first":
            dense[0] = 0
        elif policy == "last":
            dense[-1] = 0
        elif policy == "all":
            dense[:] = 0
        elif policy == "random":
            dense[draw(hnp.arrays(np.bool_, n_rows))] = 0
    csr = sp.csr_matrix(dense)
    if draw(st.booleans()):  # unsorted indices within rows
        csr = _shuffled_within_rows(csr, draw(st.randoms(use_true_random=False)))
    return csr


def _shuffled_within_rows(csr: sp.csr_matrix, rnd) -> sp.csr_matrix:
    indices, data = csr.indices.copy(), csr.data.copy()
    for r in range(csr.shape[0]):
        a, b = csr.indptr[r], csr.indptr[r + 1]
        order = list(range(a, b))
        rnd.shuffle(order)
        indices[a:b], data[a:b] = csr.indices[order], csr.data[order]
    out = sp.csr_matrix((data, indices, csr.indptr.copy()), shape=csr.shape)
    out.has_sorted_indices = False
    return out


def _scanpy_log1p(dense: np.ndarray) -> np.ndarray:
    import warnings

    import scanpy as sc

    adata = ad.AnnData(dense.astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Some cells have zero counts": on purpose
        sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return np.asarray(adata.X)


# -- normalisation -----------------------------------------------------------------------------


@given(count_matrices())
def test_normalize_log1p_equals_scanpy(csr):
    out = normalize_log1p(csr.indptr, csr.data)
    assert out.dtype == np.float32 and out.shape == csr.data.shape and np.isfinite(out).all()
    got = sp.csr_matrix((out, csr.indices, csr.indptr), shape=csr.shape).toarray()
    if csr.shape[0]:
        np.testing.assert_allclose(got, _scanpy_log1p(csr.toarray()), rtol=2e-5, atol=2e-5)
    empty = np.diff(csr.indptr) == 0
    assert (got[empty] == 0).all()


@given(count_matrices())
def test_row_totals_are_row_sums_with_one_for_empty_rows(csr):
    totals = row_totals(csr.indptr, csr.data)
    sums = np.asarray(csr.sum(axis=1), dtype=np.float64).ravel()
    expected = np.where(sums == 0, 1.0, sums)
    np.testing.assert_allclose(totals, expected, rtol=1e-5)


@given(count_matrices(), st.data())
def test_tfidf_matches_its_definition(csr, data):
    idf = data.draw(hnp.arrays(np.float32, csr.shape[1], elements=st.floats(0.0625, 100, width=32)))
    out = tfidf_log1p(csr.indptr, csr.indices, csr.data, idf)
    assert np.isfinite(out).all() and out.shape == csr.data.shape
    dense = csr.toarray().astype(np.float64)
    totals = dense.sum(axis=1, keepdims=True)
    tf = np.divide(dense, totals, out=np.zeros_like(dense), where=totals > 0)
    expected = np.log1p(tf * idf[None, :] * 1e4)
    got = sp.csr_matrix((out, csr.indices, csr.indptr), shape=csr.shape).toarray()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# -- top-k per row, padding, batches -----------------------------------------------------------


@given(count_matrices(integer=False), st.integers(1, 10))
def test_top_k_per_row_keeps_the_k_largest_in_order(csr, k):
    indptr, indices, data = top_k_per_row(csr.indptr, csr.indices.astype(np.int64), csr.data, k)
    assert indptr[0] == 0 and indptr[-1] == len(data) == len(indices)
    for r in range(csr.shape[0]):
        a, b = csr.indptr[r], csr.indptr[r + 1]
        row_vals, row_ids = csr.data[a:b], csr.indices[a:b]
        kept_ids, kept_vals = indices[indptr[r]:indptr[r + 1]], data[indptr[r]:indptr[r + 1]]
        assert len(kept_ids) == min(k, b - a)
        if b - a:
            assert np.sort(kept_vals)[::-1].tolist() == np.sort(row_vals)[::-1][: len(kept_vals)].tolist()
            position = {int(i): p for p, i in enumerate(row_ids)}
            assert [position[int(i)] for i in kept_ids] == sorted(position[int(i)] for i in kept_ids)


@given(count_matrices())
def test_csr_to_batch_round_trips_every_row(csr):
    batch = csr_to_batch({"RNA": csr}, normalize=False)
    ids, values, mask = batch["RNA_ids"].numpy(), batch["RNA_values"].numpy(), batch["RNA_mask"].numpy()
    assert ids.shape[0] == values.shape[0] == mask.shape[0] == csr.shape[0]
    dense = np.zeros(csr.shape, np.float64)
    for r in range(csr.shape[0]):
        np.add.at(dense[r], ids[r][mask[r]], values[r][mask[r]])
    np.testing.assert_allclose(dense, csr.toarray().astype(np.float32), rtol=1e-6)
    assert mask.sum() == csr.nnz


@given(count_matrices())
def test_pad_rows_shapes(csr):
    ids, values, mask = pad_rows(csr.indptr, csr.indices, csr.data)
    width = max(int(np.diff(csr.indptr).max()) if csr.shape[0] else 0, 1)
    assert ids.shape == values.shape == mask.shape == (csr.shape[0], width)
    assert (mask.sum(axis=1) == np.diff(csr.indptr)).all()


# -- Arrow list columns ↔ CSR ------------------------------------------------------------------


@given(count_matrices(), st.integers(0, 3), st.integers(1, 4))
def test_list_column_csr_of_sliced_and_chunked_columns(csr, cut, n_chunks):
    rows = [csr.data[csr.indptr[r]:csr.indptr[r + 1]].tolist() for r in range(csr.shape[0])]
    column = pa.array(rows, type=pa.list_(pa.float64()))
    column = column.slice(min(cut, len(rows)))  # offsets no longer start at 0
    kept = rows[min(cut, len(rows)):]
    size = max(1, -(-len(kept) // n_chunks))
    chunks = [column.slice(i, size) for i in range(0, len(kept), size)] or [column]
    for form in (column, pa.chunked_array(chunks, type=column.type)):
        offsets, flat = list_column_csr(form)
        assert offsets[0] == 0 and len(offsets) == len(kept) + 1 and offsets[-1] == len(flat)
        assert [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(len(kept))] == kept


# -- the wire format ---------------------------------------------------------------------------


@given(count_matrices(max_rows=6, max_cols=5), st.sampled_from(wire.CONTENT_TYPES))
def test_wire_request_round_trips(csr, content_type):
    assume(csr.shape[0] > 0)
    features = [f"G{i}" for i in range(csr.shape[1])]
    payload = wire.QueryPayload([f"c{i}" for i in range(csr.shape[0])], {"RNA": (features, csr)}, {"k_coarse": 7})
    back = wire.decode_request(wire.encode_request(payload, content_type), content_type)
    assert back.cells == payload.cells and back.params == {"k_coarse": 7}
    got_features, got = back.modalities["RNA"]
    assert got_features == features
    np.testing.assert_array_equal(got.toarray(), csr.toarray().astype(got.dtype))


def _valid_bodies() -> dict[str, bytes]:
    counts = sp.csr_matrix(np.array([[1, 0, 2], [0, 0, 0]], dtype=np.int32))
    payload = wire.QueryPayload(["a", "b"], {"RNA": (["G0", "G1", "G2"], counts)}, {"levels": ["l1"]})
    return {ct: wire.encode_request(payload, ct) for ct in wire.CONTENT_TYPES}


VALID = _valid_bodies()


def _decode_or_wire_error(body: bytes, content_type: str) -> None:
    """The decoders' contract: a payload or a WireError (a 4xx), never anything else (a 500)."""
    try:
        payload = wire.decode_request(body, content_type, max_cells=1000, max_decoded_bytes=1 << 20)
    except wire.WireError:
        return
    payload.to_anndata()  # what the mapper reads next must be buildable too


@given(st.binary(max_size=400), st.sampled_from(wire.CONTENT_TYPES))
def test_random_bytes_are_a_wire_error(body, content_type):
    _decode_or_wire_error(body, content_type)


@given(st.sampled_from(wire.CONTENT_TYPES), st.data())
def test_truncated_and_corrupted_valid_bodies_are_a_wire_error(content_type, data):
    body = VALID[content_type]
    cut = data.draw(st.integers(0, len(body)))
    _decode_or_wire_error(body[:cut], content_type)
    flipped = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body) - 1))
        flipped[at] = data.draw(st.integers(0, 255))
    _decode_or_wire_error(bytes(flipped), content_type)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@given(st.sampled_from(["format", "cells", "features", "counts", "modalities", "params"]), JSON_VALUES)
def test_json_body_with_one_field_replaced_is_a_wire_error_or_valid(field, value):
    import json

    doc = json.loads(VALID[wire.JSON])
    doc[field] = value
    _decode_or_wire_error(json.dumps(doc).encode(), wire.JSON)


@given(st.sampled_from(["meta", "cell_id", "RNA_data", "RNA_indices", "RNA_indptr", "RNA_features"]), st.data())
def test_npz_with_one_member_replaced_is_a_wire_error_or_valid(member, data):
    with zipfile.ZipFile(io.BytesIO(VALID[wire.NPZ])) as z:
        names = z.namelist()
        members = {n: z.read(n) for n in names}
    target = next((n for n in names if n.startswith(member)), None)
    assume(target is not None)
    replacement = data.draw(st.sampled_from([
        np.array([1.5, -1.0]), np.array(["x"]), np.array(7), np.zeros((2, 2)), np.array([], dtype=np.int64),
        np.array('{"format": 3}'), np.array([2**40]),
    ]))
    buf = io.BytesIO()
    np.save(buf, replacement)
    members[target] = buf.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, raw in members.items():
            z.writestr(n, raw)
    _decode_or_wire_error(out.getvalue(), wire.NPZ)


def test_deeply_nested_json_is_a_wire_error_not_a_crash():
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"cells": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        with pytest.raises(wire.WireError, match="nested too deeply"):
            wire.decode_request(body, wire.JSON)
    with pytest.raises(wire.WireError, match="nested too deeply"):
        wire.params_from_query([("thresholds", '{"a":' + "[" * 50_000 + "]" * 50_000 + "}")])


# -- alignment ---------------------------------------------------------------------------------


def _atlas(vocab: list[str]):
    return types.SimpleNamespace(vocabulary={"RNA": vocab}, version="test", manifest={"species": "human"})


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@given(count_matrices(max_rows=8, max_cols=8, integer=True), st.data())
def test_align_query_equals_a_plain_loop(csr, data):
    vocab = [f"GENE{i}" for i in range(10)]
    n_features = csr.shape[1]
    # Query features: atlas genes in any order, unknown genes, and repeats (the first one counts).
    pool = vocab + ["UNKNOWN1", "UNKNOWN2"]
    features = data.draw(st.lists(st.sampled_from(pool), min_size=n_features, max_size=n_features))
    assume(len({f for f in features if f in vocab}) >= 1)
    adata = ad.AnnData(X=csr, var=pd.DataFrame(index=pd.Index(features)))
    aligned, report = align_query(adata, _atlas(vocab), "RNA", min_fraction=0.0, check_species=False)
    expected = np.zeros((csr.shape[0], len(vocab)), np.float32)
    seen = set()
    dense = csr.toarray()
    for j, f in enumerate(features):
        if f in vocab and f not in seen:
            expected[:, vocab.index(f)] = dense[:, j]
        seen.add(f)
    np.testing.assert_array_equal(aligned.toarray(), expected)
    assert aligned.shape == (csr.shape[0], len(vocab)) and aligned.has_sorted_indices
    assert report["n_present"] == len({f for f in features if f in vocab})
    assert report["n_duplicates"] == len(features) - len(set(features))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0, 0.5])
@pytest.mark.parametrize("where", [0, -1])
def test_align_query_refuses_values_that_are_not_counts_wherever_they_are(bad, where):
    from atlas.mapping.align import MappingError

    dense = np.ones((150_000 // 10 + 1, 10), np.float32)  # > 100,000 values: past any sample
    dense.flat[where] = bad
    adata = ad.AnnData(X=sp.csr_matrix(dense), var=pd.DataFrame(index=[f"GENE{i}" for i in range(10)]))
    with pytest.raises(MappingError, match="not raw counts"):
        align_query(adata, _atlas([f"GENE{i}" for i in range(10)]), "RNA", check_species=False)


@given(data=st.data(), n=st.integers(0, 6), k=st.integers(0, 7))
def test_balanced_vote_equals_a_plain_loop(data, n, k):
    """Weighted vote with label factors: the winner maximises Σ factor(label)·max(sim, 0) (all
    non-positive: neighbours count equally), its share is in [0, 1]; empty labels, missing hits
    and non-finite similarities never vote; ties go to the most similar neighbour, then the label."""
    from atlas.mapping.vote import balance_weights, weighted_vote

    labels = data.draw(hnp.arrays("U2", (n, k), elements=st.sampled_from(["", "A", "B", "C"])))
    sims = data.draw(hnp.arrays(np.float64, (n, k), elements=st.one_of(
        st.floats(-1, 1), st.just(-np.inf), st.just(np.nan))))
    counts = data.draw(st.dictionaries(st.sampled_from(["A", "B", "C"]), st.integers(0, 1000)))
    power = data.draw(st.sampled_from([0.0, 0.5, 1.0, 3.0]))
    factor = balance_weights(counts, power)
    pred, conf = weighted_vote(labels, sims, label_weight=factor)
    assert pred.shape == conf.shape == (n,)
    assert ((conf >= 0) & (conf <= 1 + 1e-6)).all()
    for i in range(n):
        valid = [j for j in range(k) if labels[i, j] != "" and np.isfinite(sims[i, j])]
        if not valid:
            assert pred[i] == "" and conf[i] == 0
            continue
        w = {j: max(sims[i, j], 0.0) for j in valid}
        if sum(w.values()) <= 0:
            w = {j: 1.0 for j in valid}
        score: dict[str, float] = {}
        for j in valid:
            score[labels[i, j]] = score.get(labels[i, j], 0.0) + w[j] * factor.get(labels[i, j], 1.0)
        best = max(score.values())
        if best <= 0:  # every voter has factor 0 weight: nothing decides; only the range is checked
            continue
        tied = [c for c, v in score.items() if v >= best - 1e-9 * max(best, 1.0)]
        assert pred[i] in tied
        np.testing.assert_allclose(conf[i], score[pred[i]] / sum(score.values()), rtol=1e-6, atol=1e-9)
