"""Checks run on a source before anything is written to the store.

Every check raises :class:`~atlas.store.versions.StoreError` with one line that names the
problem and the fix. The count matrix is checked one block of cells at a time, so validating a
source needs memory for one block, not the whole matrix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from atlas.store.sources import RowMatrix
from atlas.store.versions import StoreError

RESERVED_OBS = ("soma_joinid", "obs_id", "cell_id", "dataset_id", "batch")
"""obs columns the store fills itself; label levels may not take these names."""

DEFAULT_CHUNK_ROWS = 50_000
"""Default largest block of cells read, checked and written at once."""
MAX_BLOCK_NNZ = 4_000_000
"""Largest number of stored values in one block (bounds memory for dense-ish cells)."""


def row_blocks(matrix: RowMatrix, max_rows: int = DEFAULT_CHUNK_ROWS,
               max_nnz: int = MAX_BLOCK_NNZ) -> Iterator[tuple[int, int]]:
    """Split a matrix's rows into blocks of at most ``max_rows`` rows and about ``max_nnz`` values."""
    n = matrix.shape[0]
    nnz = matrix.row_nnz()
    if nnz is None:
        # No cheap nnz per row: bound the block by a dense-size estimate instead.
        rows = max(1, min(max_rows, max_nnz // max(1, matrix.shape[1])))
        for start in range(0, n, rows):
            yield start, min(n, start + rows)
        return
    cumulative = np.concatenate([[0], np.cumsum(nnz, dtype=np.int64)])
    start = 0
    while start < n:
        # Furthest stop whose nnz stays within the bound (at least one row).
        limit = int(np.searchsorted(cumulative, cumulative[start] + max_nnz, side="right")) - 1
        stop = int(min(n, start + max_rows, max(limit, start + 1)))
        yield start, stop
        start = stop


@dataclass
class MatrixScan:
    """What a block-wise pass over a count matrix found."""

    row_nonzero: np.ndarray
    """Number of non-zero values per row (cell); 0 = the cell has no data in this modality."""
    non_integer: int = 0
    negative: int = 0
    non_finite: int = 0
    example: str = ""
    """One offending value with its position, for the message."""


def scan_matrix(matrix: RowMatrix, *, chunk_size: int = DEFAULT_CHUNK_ROWS,
                on_block: Callable[[int], None] | None = None) -> MatrixScan:
    """Read a matrix block by block and tally values that raw counts cannot have."""
    nonzero: np.ndarray = np.zeros(matrix.shape[0], dtype=np.int64)
    scan = MatrixScan(nonzero)
    for start, stop in row_blocks(matrix, chunk_size):
        block = matrix.rows(start, stop)
        data = block.data
        finite = np.isfinite(data)
        bad_finite = int((~finite).sum())
        data_f = np.where(finite, data, 0)
        negative = int((data_f < 0).sum())
        non_integer = int((data_f != np.round(data_f)).sum())
        if (bad_finite or negative or non_integer) and not scan.example:
            bad = np.flatnonzero(~finite | (data_f < 0) | (data_f != np.round(data_f)))[0]
            row = int(np.searchsorted(block.indptr, bad, side="right") - 1)
            scan.example = f"value {data[bad]!r} at cell {start + row}, feature {int(block.indices[bad])}"
        scan.non_finite += bad_finite
        scan.negative += negative
        scan.non_integer += non_integer
        block.data = data_f  # a fresh block: safe to overwrite
        block.eliminate_zeros()
        nonzero[start:stop] = np.diff(block.indptr)
        if on_block is not None:
            on_block(stop - start)
    return scan


def check_counts(scan: MatrixScan, origin: str, *, allow_normalized: bool) -> None:
    """Refuse values raw counts cannot have (NaN/inf always; non-integer/negative unless allowed)."""
    if scan.non_finite:
        raise StoreError(f"{origin} has {scan.non_finite} NaN/inf values ({scan.example}); "
                         "the store holds raw counts: ingest the raw count matrix")
    if allow_normalized:
        return
    if scan.negative:
        raise StoreError(f"{origin} has {scan.negative} negative values ({scan.example}), so it is not raw counts; "
                         "ingest the raw count matrix (e.g. from .raw or a 'counts' layer), or pass --allow-normalized")
    if scan.non_integer:
        raise StoreError(f"{origin} has {scan.non_integer} non-integer values ({scan.example}), so it is not raw "
                         "counts; ingest the raw count matrix (e.g. from .raw or a 'counts' layer), "
                         "or pass --allow-normalized")


def check_unique(ids: pd.Index, what: str, origin: str, fix: str) -> None:
    """Refuse duplicated cell or feature ids."""
    dup = ids[ids.duplicated()]
    if len(dup):
        examples = ", ".join(map(repr, dup.unique()[:3]))
        raise StoreError(f"{origin} has {len(dup)} duplicate {what} ids (e.g. {examples}); {fix}")


def check_same_cells(primary: pd.Index, other: pd.Index, name: str, origin: str) -> None:
    """Refuse a paired modality whose cells are not exactly the primary's cells."""
    missing = primary.difference(other)
    extra = other.difference(primary)
    if len(missing) or len(extra) or len(primary) != len(other):
        ex = ", ".join(map(repr, list(missing[:2]) + list(extra[:2])))
        raise StoreError(
            f"the cells of {name} ({origin}) do not match the source's: {len(missing)} of the source's "
            f"{len(primary)} cells are missing from it and {len(extra)} of its {len(other)} cells are not in the "
            f"source (e.g. {ex}); pair files that hold exactly the same cell ids"
        )


def check_columns(obs: pd.DataFrame, origin: str, *, batch_key: str | None,
                  label_keys: dict[str, str]) -> None:
    """Refuse a batch or label column the source does not have, and reserved label names."""
    available = ", ".join(map(str, obs.columns)) or "none"
    if batch_key is not None and batch_key not in obs.columns:
        raise StoreError(f"--batch-key {batch_key}: {origin} has no obs column '{batch_key}' "
                         f"(columns: {available}); pass one of those")
    for level, column in label_keys.items():
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", level):
            raise StoreError(f"label level name '{level}' is not a plain identifier; use letters, digits and _ "
                             "(e.g. --label-key cell_type_l1=COL)")
        if level in RESERVED_OBS:
            raise StoreError(f"label level name '{level}' is reserved by the store ({', '.join(RESERVED_OBS)}); "
                             "choose another level name")
        if column not in obs.columns:
            raise StoreError(f"--label-key {level}={column}: {origin} has no obs column '{column}' "
                             f"(columns: {available}); pass one of those")


def check_dataset_id(dataset_id: str, existing: list[str]) -> None:
    """Refuse an unusable dataset id or one the store already has."""
    if not dataset_id or ":" in dataset_id or dataset_id.strip() != dataset_id:
        raise StoreError(f"dataset id {dataset_id!r} is not usable (empty, ':' or surrounding spaces); "
                         "pass --dataset-id NAME")
    if dataset_id in existing:
        raise StoreError(f"dataset id '{dataset_id}' is already in the store; pass another --dataset-id "
                         "(each ingest adds a new dataset)")


def as_strings(values: pd.Series) -> np.ndarray:
    """Column values as strings, with missing values (NaN/None) as the empty string."""
    s = pd.Series(values).astype(object)
    missing = s.isna().to_numpy()
    out = s.map(str).to_numpy(dtype=object)
    out[missing] = ""
    return out
