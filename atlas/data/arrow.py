"""Arrow list columns as CSR parts (no torch: the SDK and the service's wire format use it too)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def list_column_csr(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (starting at 0) and flat values of a list column, zero-copy where Arrow allows."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    offsets = column.offsets.to_numpy()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return (offsets - offsets[0]).astype(np.int64), flat
