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

from atlas.data.normalize import (  # noqa: F401 - part of this module's interface (torch-free, in normalize)
    TARGET_SUM,
    fit_idf,
    idf_from_counts,
    normalize_log1p,
    pad_rows,
    row_totals,
    tfidf_log1p,
    top_k_per_row,
)
from atlas.names import MODALITIES, csr_columns  # noqa: F401 - MODALITIES: part of this module's interface


def modality_keys(modality: str) -> tuple[str, str, str]:
    """The three batch keys of one modality: ids, values, mask."""
    return (*csr_columns(modality), f"{modality}_mask")


def batch_modalities(batch: Mapping[str, torch.Tensor]) -> list[str]:
    """Modalities present in a batch, in canonical order."""
    return [m for m in MODALITIES if csr_columns(m)[0] in batch]


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
