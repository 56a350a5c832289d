"""The offline mapping output: one Parquet row per cell, written by :func:`map_offline` and read
back by :func:`read_mapping` (the same AnnData :func:`atlas.mapping.map_query` returns).

    OUTPUT/cells/*.parquet   row (query position), cell_id, per level {level}_pred / _confidence /
                             _unknown, X_atlas (fixed-size list<float32>), {modality}_pred
    OUTPUT/features.json     {"protein_pred": [feature ids, in list order], ...}
    OUTPUT/summary.json      cells, timings, label counts, uns["atlas"]
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from atlas.mapping.align import MappingError
from atlas.names import EMBEDDING, is_level_column, level_of, pred_key, unknown_key

CELLS_DIR = "cells"
SUMMARY = "summary.json"
FEATURES = "features.json"
FEATURES_KEY = b"atlas.features"


def result_table(result: Any, rows: Any) -> pa.Table:
    """One mapped block (the AnnData of :func:`map_query`) as Arrow rows; feature names of the
    predicted modalities ride along in the schema metadata."""
    columns: dict[str, Any] = {
        "row": pa.array(np.asarray(rows, dtype=np.int64)),
        "cell_id": pa.array([str(x) for x in result.obs_names], type=pa.string()),
    }
    for name in result.obs.columns:
        values = result.obs[name]
        if level_of(name, "unknown"):
            columns[name] = pa.array(values.to_numpy(dtype=bool))
        elif level_of(name, "confidence"):
            columns[name] = pa.array(values.to_numpy(dtype=np.float32))
        else:
            columns[name] = pa.array(values.astype(str).tolist(), type=pa.string())
    features = {}
    for key, value in result.obsm.items():
        if key == EMBEDDING:
            columns[key] = fixed_list(np.asarray(value, dtype=np.float32))
        elif isinstance(value, pd.DataFrame):
            columns[key] = fixed_list(value.to_numpy(dtype=np.float32))
            features[key] = [str(c) for c in value.columns]
    table = pa.table(columns)
    return table.replace_schema_metadata({FEATURES_KEY: json.dumps(features).encode()})


def fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), int(matrix.shape[1]))


def json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _parquet_files(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).glob("*.parquet"))
    if not files:
        raise MappingError(f"{folder} holds no Parquet files; is it the output of map_offline?")
    return files


def features_of(folder: Path) -> dict[str, list[str]]:
    metadata = pq.read_schema(_parquet_files(folder)[0]).metadata or {}
    return json.loads(metadata.get(FEATURES_KEY, b"{}"))


def count_labels(folder: str | os.PathLike) -> tuple[int, dict[str, dict[str, Any]]]:
    """``(cells, {level: {"labels": {label: cells}, "unknown_fraction": f}})`` of written results,
    streamed file by file over the label columns only."""
    files = _parquet_files(Path(folder))
    schema = pq.read_schema(files[0])
    levels = [lv for n in schema.names if (lv := level_of(n, "unknown"))]
    columns = [c for lv in levels for c in (pred_key(lv), unknown_key(lv))] or ["row"]
    labels: dict[str, Counter[Any]] = {lv: Counter() for lv in levels}
    unknown: Counter[str] = Counter()
    cells = 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(columns=columns, batch_size=65536):
            cells += batch.num_rows
            for lv in levels:
                for item in pc.value_counts(batch.column(pred_key(lv))).to_pylist():
                    labels[lv][item["values"]] += item["counts"]
                unknown[lv] += int(pc.sum(batch.column(unknown_key(lv)).cast(pa.int64())).as_py() or 0)
    return cells, {lv: {"labels": dict(labels[lv].most_common()),
                        "unknown_fraction": round(unknown[lv] / max(cells, 1), 6)} for lv in levels}


def _matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(n, flat.size // n if n else 0)


def read_mapping(output: str | os.PathLike) -> Any:
    """The results of :func:`map_offline` as the AnnData :func:`~atlas.mapping.map_query`
    returns: cells in query order, ``obs`` labels/confidences/unknown flags, ``obsm["X_atlas"]``,
    ``obsm[f"{m}_pred"]`` DataFrames named by feature, ``uns["atlas"]`` from the summary.
    Loads everything into memory: for very large outputs read ``OUTPUT/cells`` with pyarrow
    or pandas column by column instead."""
    import anndata as ad

    root = Path(output)
    if not (root / CELLS_DIR).is_dir():
        raise MappingError(f"{root} is not an offline mapping output (no {CELLS_DIR}/ folder)")
    table = pa.concat_tables(pq.read_table(p) for p in _parquet_files(root / CELLS_DIR)).sort_by("row")
    features_path = root / FEATURES
    features = json.loads(features_path.read_text()) if features_path.exists() else features_of(root / CELLS_DIR)
    index = pd.Index(table.column("cell_id").to_pylist(), dtype=str)
    obs = pd.DataFrame(index=index)
    for name in table.column_names:
        if is_level_column(name) and name not in features:
            values = table.column(name).to_numpy(zero_copy_only=False)
            if level_of(name):
                values = values.astype(str)
            obs[name] = values
    result = ad.AnnData(obs=obs)
    result.obsm[EMBEDDING] = _matrix(table.column(EMBEDDING))
    for key, names in features.items():
        result.obsm[key] = pd.DataFrame(_matrix(table.column(key)), index=index, columns=list(names))
    summary_path = root / SUMMARY
    if summary_path.exists():
        result.uns["atlas"] = json.loads(summary_path.read_text()).get("atlas", {})
    return result
