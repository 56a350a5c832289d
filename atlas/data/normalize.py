"""Row-wise normalisation of CSR counts and their padding (numpy only).

What the store's read tasks, the mapper and the SDK need of :mod:`atlas.data.batches` without
torch: a Ray Data read task that imports torch spends ~1.7 s of a fresh worker's start on it
(every read worker of every build's first epoch), and so did a shard replica or the SDK.
:mod:`atlas.data.batches` re-exports all of it.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

TARGET_SUM = 1e4


def row_totals(indptr: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Sum of each CSR row's values (float32), with 1 for rows whose sum is zero (empty rows
    anywhere, or explicit zeros), so that dividing by it leaves those rows at zero.

    ``np.add.reduceat`` over every row start is wrong for empty rows (it returns the next
    row's first value) and out of bounds when the last rows are empty; it is applied to the
    non-empty rows only.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    lengths = np.diff(indptr)
    totals = np.ones(lengths.size, dtype=np.float32)
    filled = lengths > 0
    if filled.any():
        # Cut at the last row's end: reduceat's last segment runs to the end of what it is given.
        values = np.asarray(data, dtype=np.float32)[: indptr[-1]]
        sums = np.add.reduceat(values, indptr[:-1][filled]).astype(np.float32)
        totals[filled] = np.where(sums != 0, sums, np.float32(1.0))
    return totals


def normalize_log1p(
    indptr: np.ndarray, data: np.ndarray, target_sum: float = TARGET_SUM
) -> np.ndarray:
    """Library-size normalise each row to ``target_sum`` then ``log1p``.

    Same arithmetic as ``scanpy.pp.normalize_total(target_sum=...)`` followed by
    ``scanpy.pp.log1p``: rows whose total is zero are left at zero.
    """
    data = np.asarray(data, dtype=np.float32)
    lengths = np.diff(indptr)
    # x / total ≤ 1 first: target_sum / total overflows float32 for a cell whose total is tiny.
    fraction = data.astype(np.float64) / np.repeat(row_totals(indptr, data).astype(np.float64), lengths)
    return np.log1p(fraction * target_sum).astype(np.float32)


def tfidf_log1p(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    idf: np.ndarray,
    scale_factor: float = TARGET_SUM,
) -> np.ndarray:
    """TF-IDF for chromatin accessibility, as in Signac's ``RunTFIDF`` (method 1).

    ``tf = x / row total``; ``value = log1p(tf * idf * scale_factor)``; ``idf`` is per feature
    (``n_cells / cells with the feature``), fitted on the reference and indexed by vocabulary id.
    """
    data = np.asarray(data, dtype=np.float32)
    lengths = np.diff(indptr)
    tf = data / np.repeat(row_totals(indptr, data), lengths)
    return np.log1p(tf * idf[indices].astype(np.float32) * np.float32(scale_factor))


def idf_from_counts(n_cells: int, cells_with_feature: np.ndarray) -> np.ndarray:
    """Inverse document frequency per feature: ``n_cells / (1 + cells containing it)``."""
    return (n_cells / (1.0 + np.asarray(cells_with_feature))).astype(np.float32)


def fit_idf(csr: sp.csr_matrix, n_features: int | None = None) -> np.ndarray:
    """Inverse document frequency per feature of an in-memory count matrix."""
    n_features = csr.shape[1] if n_features is None else n_features
    return idf_from_counts(csr.shape[0], np.bincount(csr.indices, minlength=n_features)[:n_features])


def top_k_per_row(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the ``k`` largest values of each row (for very dense cells); order within a row kept."""
    lengths = np.diff(indptr)
    if lengths.size == 0 or lengths.max() <= k:
        return indptr, indices, data
    row: np.ndarray = np.repeat(np.arange(lengths.size), lengths)
    # Rank entries within each row by value, descending: sort by (row, -value).
    order = np.lexsort((-data, row))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - np.repeat(indptr[:-1], lengths)
    keep = rank < k
    new_lengths = np.minimum(lengths, k)
    new_indptr = np.concatenate([[0], np.cumsum(new_lengths)]).astype(indptr.dtype)
    return new_indptr, indices[keep], data[keep]


def pad_rows(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, min_len: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR rows → padded ``(ids, values, mask)`` arrays of shape ``[rows, longest row]``."""
    lengths = np.diff(indptr).astype(np.int64)
    n_rows = lengths.size
    width = max(int(lengths.max()) if n_rows else 0, min_len)
    # The mask's True entries, read row by row, are the CSR entries in order: boolean-mask
    # assignment fills them sequentially (2.5x faster than scattering by (row, column) pairs).
    mask = np.arange(width) < lengths[:, None]
    ids = np.zeros((n_rows, width), dtype=np.int64)
    values = np.zeros((n_rows, width), dtype=np.float32)
    start, stop = int(indptr[0]) if n_rows else 0, int(indptr[-1]) if n_rows else 0
    ids[mask] = indices[start:stop]
    values[mask] = data[start:stop]
    return ids, values, mask
