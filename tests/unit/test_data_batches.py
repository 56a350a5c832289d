"""Index-value batches and the transforms that feed them (pure numpy/torch)."""

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

from atlas.data.batches import (
    batch_to_dense,
    csr_to_batch,
    fit_idf,
    normalize_log1p,
    pad_rows,
    tfidf_log1p,
    top_k_per_row,
)
from atlas.data.collate import table_to_batch

PBMC10K = "pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"


def _random_counts(n=50, m=30, density=0.2, seed=0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = sp.random(n, m, density=density, format="csr", random_state=seed, dtype=np.float32)
    x.data = rng.integers(1, 20, x.nnz).astype(np.float32)
    return x


@pytest.mark.real_data
def test_normalisation_matches_scanpy_on_real_cells(dataset):
    adata = ad.read_h5ad(dataset(PBMC10K))[:500].copy()
    counts = sp.csr_matrix(adata.X)
    ours = normalize_log1p(counts.indptr, counts.data)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    expected = sp.csr_matrix(adata.X)
    np.testing.assert_array_equal(expected.indptr, counts.indptr)
    np.testing.assert_allclose(ours, expected.data, rtol=1e-5, atol=1e-6)


def test_normalisation_leaves_empty_rows_empty():
    x = sp.csr_matrix(np.array([[0, 0, 0], [1, 3, 0]], dtype=np.float32))
    out = normalize_log1p(x.indptr, x.data)
    np.testing.assert_allclose(out, np.log1p([2500.0, 7500.0]), rtol=1e-6)


def test_pad_rows_round_trip_and_padding_is_masked():
    x = _random_counts()
    ids, values, mask = pad_rows(x.indptr, x.indices.astype(np.int64), x.data)
    assert ids.shape == (x.shape[0], np.diff(x.indptr).max())
    assert mask.sum() == x.nnz
    assert (values[~mask] == 0).all() and (ids[~mask] == 0).all()
    dense = np.zeros(x.shape, np.float32)
    rows = np.nonzero(mask)[0]
    dense[rows, ids[mask]] = values[mask]
    np.testing.assert_array_equal(dense, x.toarray())


def test_csr_to_batch_densifies_back_to_normalised_counts():
    x = _random_counts()
    batch = csr_to_batch({"RNA": x}, domain=np.arange(x.shape[0]) % 3)
    expected = x.copy()
    expected.data = normalize_log1p(x.indptr, x.data)
    np.testing.assert_allclose(batch_to_dense(batch, "RNA", x.shape[1]).numpy(), expected.toarray(), rtol=1e-6)
    assert batch["domain"].tolist() == (np.arange(x.shape[0]) % 3).tolist()


def test_top_k_keeps_the_largest_values_of_each_row():
    x = _random_counts(n=20, m=40, density=0.5)
    indptr, indices, data = top_k_per_row(x.indptr, x.indices, x.data, 5)
    assert np.diff(indptr).max() <= 5
    for r in range(x.shape[0]):
        row = x.getrow(r)
        kept = data[indptr[r] : indptr[r + 1]]
        assert sorted(kept, reverse=True) == sorted(row.data, reverse=True)[: kept.size]


def test_tfidf_matches_its_formula():
    x = _random_counts()
    idf = fit_idf(x)
    out = tfidf_log1p(x.indptr, x.indices, x.data, idf)
    dense = x.toarray()
    tf = dense / dense.sum(1, keepdims=True).clip(min=1)
    expected = np.log1p(tf * idf[None, :] * 1e4)[dense > 0]
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_arrow_collate_equals_direct_batch_including_sliced_blocks():
    import pyarrow as pa

    x = _random_counts()
    values = normalize_log1p(x.indptr, x.data)
    table = pa.table({
        "soma_joinid": pa.array(np.arange(x.shape[0], dtype=np.int64)),
        "domain": pa.array(np.zeros(x.shape[0], np.int32)),
        "RNA_ids": pa.ListArray.from_arrays(pa.array(x.indptr.astype(np.int32)), pa.array(x.indices)),
        "RNA_values": pa.ListArray.from_arrays(pa.array(x.indptr.astype(np.int32)), pa.array(values)),
    })
    direct = csr_to_batch({"RNA": x})
    sliced = table_to_batch(table.slice(10, 20), ("RNA",))
    dense = batch_to_dense(direct, "RNA", x.shape[1])[10:30]
    torch.testing.assert_close(batch_to_dense(sliced, "RNA", x.shape[1]), dense)
    assert sliced["soma_joinid"].tolist() == list(range(10, 30))
