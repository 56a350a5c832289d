"""Arrow block of cells → padded index-value tensors (the batch format of ``atlas.data.batches``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from atlas.data.arrow import list_column_csr
from atlas.data.batches import modality_keys, pad_rows
from atlas.data.plan import LABELS
from atlas.names import csr_columns


def table_to_batch(table: pa.Table, modalities: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Convert an Arrow block emitted by :func:`atlas.data.reader.read_block` to a batch dict."""
    batch = {
        "soma_joinid": torch.from_numpy(table.column("soma_joinid").to_numpy().astype(np.int64)),
        "domain": torch.from_numpy(table.column("domain").to_numpy().astype(np.int64)),
    }
    if LABELS in table.column_names:
        column = table.column(LABELS).combine_chunks()
        width = column.type.list_size
        flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        batch[LABELS] = torch.from_numpy(flat.reshape(-1, width))
    for m in modalities:
        ids_column, values_column = csr_columns(m)
        indptr, indices = list_column_csr(table.column(ids_column))
        _, values = list_column_csr(table.column(values_column))
        ids, vals, mask = pad_rows(indptr, indices, values)
        k_ids, k_values, k_mask = modality_keys(m)
        batch[k_ids] = torch.from_numpy(ids)
        batch[k_values] = torch.from_numpy(vals)
        batch[k_mask] = torch.from_numpy(mask)
    return batch
