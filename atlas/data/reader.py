"""Read one block of cells from the SOMA store and emit Arrow blocks of normalised index-value rows.

Each emitted row is one cell: ``soma_joinid``, ``domain``, ``labels`` when the plan has label
levels (a fixed-size list of codes) and, per modality ``m``,
``{m}_ids: list<int32>`` and ``{m}_values: list<float32>``. The list offsets of a block *are*
the CSR row pointer, so the consumer turns a block into padded tensors without re-parsing.
Pure tiledbsoma + numpy: runs in a Ray read task, or directly in tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma

from atlas.data.normalize import normalize_log1p, tfidf_log1p, top_k_per_row
from atlas.data.plan import LABELS, ReadBlock, ReadPlan
from atlas.data.snapshot import read_rows
from atlas.names import csr_columns

X_LAYER = "counts"


@lru_cache(maxsize=8)
def open_experiment(uri: str) -> tiledbsoma.Experiment:
    """Open (once per process) a store version read-only; versions never change once committed."""
    return tiledbsoma.Experiment.open(uri)


def read_csr(uri: str, modality: str, joinids: np.ndarray) -> sp.csr_matrix:
    """Raw counts of ``joinids`` (rows in the given order) × the whole vocabulary of ``modality``."""
    exp = open_experiment(uri)
    ms = exp.ms[modality]
    n_features = ms.var.count
    order = np.argsort(joinids, kind="stable")
    sorted_ids = joinids[order]
    table = ms.X[X_LAYER].read(coords=(sorted_ids,)).tables().concat()
    cell = table.column("soma_dim_0").to_numpy()
    rows = order[np.searchsorted(sorted_ids, cell)]
    csr = sp.csr_matrix(
        (
            table.column("soma_data").to_numpy().astype(np.float32, copy=False),
            (rows, table.column("soma_dim_1").to_numpy()),
        ),
        shape=(joinids.size, n_features),
    )
    csr.sort_indices()
    return csr


def transform(
    csr: sp.csr_matrix, method: str, idf: np.ndarray | None, max_features: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalise a count CSR (see :class:`ReadPlan.normalization`) → ``(indptr, indices, values)``."""
    indptr, indices = csr.indptr, csr.indices
    if method == "log1p":
        values = normalize_log1p(indptr, csr.data)
    elif method == "tfidf":
        if idf is None:
            raise ValueError("TF-IDF needs the reference's idf; fit it with atlas.data.fit_store_idf")
        values = tfidf_log1p(indptr, indices, csr.data, idf)
    elif method == "none":
        values = csr.data.astype(np.float32, copy=False)
    else:
        raise ValueError(f"unknown normalization {method!r}: use log1p, tfidf or none")
    if max_features is not None:
        indptr, indices, values = top_k_per_row(indptr, indices, values, max_features)
    return indptr, indices, values


def _list_column(indptr: np.ndarray, values: np.ndarray, dtype: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(
        pa.array(indptr.astype(np.int32, copy=False)), pa.array(values, type=dtype)
    )


def read_block(plan: ReadPlan, block: ReadBlock) -> Iterator[pa.Table]:
    """Read, normalise and emit one block; memory is bounded by the block, not the store. A
    snapshot plan's blocks read their rows of the training snapshot, already normalised."""
    rows = block.rows
    if plan.snapshot is not None and rows is None:
        raise ValueError("a snapshot plan's block carries no snapshot rows")
    columns: dict[str, pa.Array] = {
        "soma_joinid": pa.array(block.joinids, type=pa.int64()),
        "domain": pa.array(block.domains, type=pa.int32()),
    }
    if plan.label_levels:
        if block.labels is None:
            raise ValueError("the plan has label levels but a block carries no labels")
        columns[LABELS] = pa.FixedSizeListArray.from_arrays(
            pa.array(block.labels.reshape(-1), type=pa.int32()), len(plan.label_levels))
    for modality in plan.modalities:
        if plan.snapshot is not None and rows is not None:
            indptr, indices, values = read_rows(plan.snapshot, modality, rows)
        else:
            csr = read_csr(plan.uri, modality, block.joinids)
            indptr, indices, values = transform(
                csr,
                plan.normalization.get(modality, "log1p"),
                plan.idf.get(modality),
                plan.max_features,
            )
        ids_column, values_column = csr_columns(modality)
        columns[ids_column] = _list_column(indptr, indices, pa.int32())
        columns[values_column] = _list_column(indptr, values, pa.float32())
    table = pa.table(columns)
    step = plan.batch_size if plan.single_domain else plan.rows_per_block
    for start in range(0, table.num_rows, step):
        yield table.slice(start, step)


def output_schema(modalities: tuple[str, ...], n_label_levels: int = 0) -> pa.Schema:
    fields = [pa.field("soma_joinid", pa.int64()), pa.field("domain", pa.int32())]
    if n_label_levels:
        fields.append(pa.field(LABELS, pa.list_(pa.int32(), n_label_levels)))
    for m in modalities:
        ids_column, values_column = csr_columns(m)
        fields += [pa.field(ids_column, pa.list_(pa.int32())), pa.field(values_column, pa.list_(pa.float32()))]
    return pa.schema(fields)
