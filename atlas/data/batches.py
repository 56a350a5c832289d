"""Index-value batches: the one format the models consume.

A cell is the list of its non-zero features (vocabulary ids) and their normalised values.
Only non-zero entries travel; a batch pads every cell to the longest cell of that batch.

A batch is a flat ``dict[str, torch.Tensor]`` so that it passes through Ray Data's
``iter_torch_batches`` and DDP unchanged:

=================  ================  ==========================================================
key                dtype, shape      meaning
=================  ================  ==========================================================
``soma_joinid``    int64 ``[B]``     the cell's row (``soma_joinid``) in the store's obs
``domain``         int64 ``[B]``     index of the cell's domain (batch / donor) in the build's
                                     domain list; ``-1`` for a domain the model never saw
``{m}_ids``        int64 ``[B, L]``  vocabulary ids (``soma_joinid`` of the measurement's var)
                                     of the cell's non-zero features; 0 in padding
``{m}_values``     float32 ``[B, L]`` normalised values; 0 in padding
``{m}_mask``       bool ``[B, L]``   True for real entries; a cell without modality ``m`` has an
                                     all-False row
=================  ================  ==========================================================

``m`` is a measurement name: ``RNA``, ``protein`` or ``ATAC``.

This module is pure numpy/torch (no Ray, no SOMA) so that tests, the models' own tests and the
mapping path build batches the same way the streaming pipeline does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp
import torch

from atlas.names import MODALITIES, csr_columns  # noqa: F401 - MODALITIES: part of this module's interface

TARGET_SUM = 1e4


def modality_keys(modality: str) -> tuple[str, str, str]:
    """The three batch keys of one modality: ids, values, mask."""
    return (*csr_columns(modality), f"{modality}_mask")


def batch_modalities(batch: Mapping[str, torch.Tensor]) -> list[str]:
    """Modalities present in a batch, in canonical order."""
    return [m for m in MODALITIES if csr_columns(m)[0] in batch]


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
    ids = np.zeros((n_rows, width), dtype=np.int64)
    values = np.zeros((n_rows, width), dtype=np.float32)
    mask = np.zeros((n_rows, width), dtype=bool)
    rows: np.ndarray = np.repeat(np.arange(n_rows), lengths)
    cols = np.arange(indices.size) - np.repeat(np.asarray(indptr[:-1], np.int64), lengths)
    ids[rows, cols] = indices
    values[rows, cols] = data
    mask[rows, cols] = True
    return ids, values, mask


def csr_to_batch(
    modalities: Mapping[str, sp.csr_matrix],
    domain: np.ndarray | None = None,
    soma_joinid: np.ndarray | None = None,
    normalize: bool = True,
    max_features: int | None = None,
) -> dict[str, torch.Tensor]:
    """Build an index-value batch from per-modality CSR count matrices over the same cells.

    Column ``j`` of each matrix must be vocabulary id ``j`` of that modality. With
    ``normalize`` the counts are library-size normalised and log1p-transformed per modality.
    """
    n_cells = {m.shape[0] for m in modalities.values()}
    if len(n_cells) != 1:
        raise ValueError(f"modalities disagree on the number of cells: {sorted(n_cells)}")
    (n,) = n_cells
    batch: dict[str, torch.Tensor] = {
        "soma_joinid": torch.as_tensor(
            np.arange(n) if soma_joinid is None else np.asarray(soma_joinid), dtype=torch.int64
        ),
        "domain": torch.as_tensor(
            np.zeros(n) if domain is None else np.asarray(domain), dtype=torch.int64
        ),
    }
    for name, matrix in modalities.items():
        csr = sp.csr_matrix(matrix)
        csr.sort_indices()
        indptr, indices, data = csr.indptr, csr.indices.astype(np.int64), csr.data
        if normalize:
            data = normalize_log1p(indptr, data)
        if max_features is not None:
            indptr, indices, data = top_k_per_row(indptr, indices, data, max_features)
        ids, values, mask = pad_rows(indptr, indices, data)
        k_ids, k_values, k_mask = modality_keys(name)
        batch[k_ids] = torch.from_numpy(ids)
        batch[k_values] = torch.from_numpy(values)
        batch[k_mask] = torch.from_numpy(mask)
    return batch


def batch_to_dense(batch: Mapping[str, torch.Tensor], modality: str, n_features: int) -> torch.Tensor:
    """Densify one modality of a batch to ``[B, n_features]`` (for tests and small views)."""
    k_ids, k_values, k_mask = modality_keys(modality)
    ids, values, mask = batch[k_ids], batch[k_values], batch[k_mask]
    dense = torch.zeros(ids.shape[0], n_features, dtype=values.dtype)
    dense.scatter_add_(1, ids, values * mask)
    return dense
