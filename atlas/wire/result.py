"""Results: the mapped AnnData, column by column, in Arrow, npz or JSON."""
from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from atlas.wire.common import (
    _RESPONSE_KEY,
    ARROW,
    CONTENT_TYPES,
    JSON,
    NPZ,
    RESPONSE_FORMAT,
    WireError,
    _arrow_meta,
    _check_format,
    _npz_get,
    _npz_json,
    _open_npz,
    _read_arrow,
    media_type,
    parse_json,
)

# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


@dataclass
class MapResult:
    """A mapping result as plain arrays: what travels, and what chunked results concatenate as.

    ``entries``: place → (array with ``n`` rows, DataFrame columns or None), in the result's
    order; places are ``("obs", column)``, ``("obsm", key)`` and ``("uns", key, ...)``.
    """

    cells: list[str]
    entries: dict[tuple[str, ...], tuple[np.ndarray, list[str] | None]]
    uns: dict[str, Any]

    @property
    def n_cells(self) -> int:
        return len(self.cells)


def _uns_arrays(uns: Mapping[str, Any], n: int, path: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict]:
    """Split ``uns`` into its JSON part and its per-cell arrays (first axis = cells)."""
    plain: dict[str, Any] = {}
    arrays: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in uns.items():
        place = path + (str(key),)
        if isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == n:
            arrays[place] = value
        elif isinstance(value, Mapping):
            sub_plain, sub_arrays = _uns_arrays(value, n, place)
            arrays.update(sub_arrays)
            if sub_plain or not sub_arrays:
                plain[str(key)] = sub_plain
        else:
            plain[str(key)] = _plain(value)
    return plain, arrays


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise WireError(f"uns value of type {type(value).__name__} cannot travel on the wire")


def result_from_anndata(adata: Any, cells: Sequence[str] | None = None) -> MapResult:
    """The arrays of a mapping result AnnData (``map_query``'s or ``assemble``'s)."""
    n = adata.n_obs
    entries: dict[tuple[str, ...], tuple[np.ndarray, list[str] | None]] = {}
    for column in adata.obs.columns:
        values = adata.obs[column].to_numpy()
        if values.dtype == object:
            values = values.astype(str)
        entries[("obs", str(column))] = (values, None)
    for key in adata.obsm.keys():
        value = adata.obsm[key]
        if isinstance(value, pd.DataFrame):
            entries[("obsm", str(key))] = (value.to_numpy(), [str(c) for c in value.columns])
        else:
            entries[("obsm", str(key))] = (np.asarray(value), None)
    plain, arrays = _uns_arrays(dict(adata.uns), n)
    for place, values in arrays.items():
        entries[("uns",) + place] = (values, None)
    names = [str(c) for c in (adata.obs_names if cells is None else cells)]
    return MapResult(names, entries, plain)


def _set_path(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def result_to_anndata(result: MapResult, obs_names: Any = None) -> Any:
    """Rebuild the result AnnData exactly as ``map_query`` lays it out.

    ``obs_names``: the query's (an Index keeps its name); default: the result's cell ids.
    """
    import anndata as ad

    if obs_names is None:
        index = pd.Index(list(result.cells))
    else:
        if len(obs_names) != result.n_cells:
            raise WireError(f"{len(obs_names)} obs_names for {result.n_cells} result cells")
        index = pd.Index([str(x) for x in obs_names], name=getattr(obs_names, "name", None))
    obs = pd.DataFrame(index=index)
    obsm: dict[str, Any] = {}
    uns = json.loads(json.dumps(result.uns))  # a deep copy
    for place, (values, columns) in result.entries.items():
        where, *path = place
        if where == "obs":
            obs[path[0]] = values.astype(object) if values.dtype.kind == "U" else values
        elif where == "obsm":
            obsm[path[0]] = values if columns is None else pd.DataFrame(values, index=index, columns=columns)
        elif where == "uns":
            _set_path(uns, path, values)
        else:
            raise WireError(f"unknown result place {place!r}")
    out = ad.AnnData(obs=obs)
    for key, value in obsm.items():
        out.obsm[key] = value
    out.uns.update(uns)
    return out


def concat_results(parts: Sequence[MapResult]) -> MapResult:
    """One result from the results of consecutive chunks of a query (same atlas, same parameters).

    ``uns["atlas"]["n_no_data"]`` is summed; everything else in ``uns`` must agree.
    """
    if not parts:
        raise ValueError("no results to concatenate")
    first = parts[0]
    for p in parts[1:]:
        if list(p.entries) != list(first.entries):
            raise WireError("chunk results differ in their columns; was the service redeployed mid-query?")
        a, b = _without_counts(first.uns), _without_counts(p.uns)
        if a != b:
            version = lambda u: (u.get("atlas") or {}).get("version")  # noqa: E731
            raise WireError("chunk results differ in their metadata (atlas version "
                            f"{version(first.uns)} vs {version(p.uns)}); map the query again")
    entries = {}
    for place, (_, columns) in first.entries.items():
        entries[place] = (np.concatenate([p.entries[place][0] for p in parts]), columns)
    uns = json.loads(json.dumps(first.uns))
    if isinstance(uns.get("atlas"), dict) and "n_no_data" in uns["atlas"]:
        uns["atlas"]["n_no_data"] = int(sum(p.uns["atlas"]["n_no_data"] for p in parts))
    return MapResult([c for p in parts for c in p.cells], entries, uns)


def _without_counts(uns: Mapping[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(uns))
    if isinstance(out.get("atlas"), dict):
        out["atlas"].pop("n_no_data", None)
        out["atlas"].pop("query_domains", None)  # per request; the client reports the query's
    return out


def take_cells(result: MapResult, order: np.ndarray) -> MapResult:
    """The result's cells in ``order`` (positions into its cells)."""
    order = np.asarray(order)
    entries = {place: (values[order], columns) for place, (values, columns) in result.entries.items()}
    return MapResult([result.cells[i] for i in order], entries, result.uns)


def _entry_meta(place: tuple[str, ...], values: np.ndarray, columns: list[str] | None) -> dict[str, Any]:
    kind = "str" if values.dtype.kind in "UO" else values.dtype.name
    if kind not in ("str", "bool", "float32", "float64", "int32", "int64"):
        raise WireError(f"result entry {place} has unsupported dtype {values.dtype}")
    return {"place": list(place), "dtype": kind, "shape": list(values.shape), "columns": columns}


def _from_kind(values: np.ndarray, kind: str, shape: Sequence[int]) -> np.ndarray:
    if kind == "str":
        out = np.asarray(values, dtype=object).astype(str) if len(values) else np.zeros(0, dtype="<U1")
    else:
        out = np.asarray(values).astype(np.dtype(kind), copy=False)
    return out.reshape(tuple(shape))


def encode_result(result: MapResult, content_type: str = ARROW) -> bytes:
    """Encode a mapping result as a response body."""
    metas = [_entry_meta(p, v, c) for p, (v, c) in result.entries.items()]
    if content_type == ARROW:
        return _arrow_result(result, metas)
    if content_type == NPZ:
        buf = io.BytesIO()
        arrays = {"cell_id": np.asarray(result.cells, dtype=str)}
        for i, (values, _) in enumerate(result.entries.values()):
            arrays[f"e{i}"] = values.astype(str) if values.dtype.kind == "O" else values
        meta = {"format": RESPONSE_FORMAT, "entries": metas, "uns": result.uns}
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        return buf.getvalue()
    if content_type == JSON:
        entries = [{**m, "values": _json_values(v)} for m, (v, _) in zip(metas, result.entries.values())]
        return json.dumps({"format": RESPONSE_FORMAT, "cells": result.cells, "entries": entries,
                           "uns": result.uns}, allow_nan=False).encode()
    raise WireError(f"unsupported content type {content_type!r}; use one of {list(CONTENT_TYPES)}")


def _json_values(values: np.ndarray) -> Any:
    if values.dtype.kind == "f":
        flat = [float(v) if math.isfinite(v) else ("NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity"))
                for v in values.ravel().tolist()]
        return np.asarray(flat, dtype=object).reshape(values.shape).tolist() if values.ndim > 1 else flat
    if values.dtype.kind in "UO":
        return values.astype(str).tolist()
    return values.tolist()


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _from_json_values(values: Any, meta: Mapping[str, Any]) -> np.ndarray:
    kind = meta["dtype"]
    if kind.startswith("float"):
        flat = np.asarray(values, dtype=object).ravel()
        flat = np.asarray([_NONFINITE[v] if isinstance(v, str) else v for v in flat], dtype=np.float64)
        return flat.astype(kind).reshape(tuple(meta["shape"]))
    return _from_kind(np.asarray(values, dtype=object).ravel(), kind, meta["shape"])


def _arrow_result(result: MapResult, metas: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa

    columns = {"cell_id": pa.array(result.cells, pa.string())}
    for meta, (values, _) in zip(metas, result.entries.values()):
        flat = values.reshape(len(values), -1) if values.ndim > 1 else values
        arrow_type = pa.string() if meta["dtype"] == "str" else pa.from_numpy_dtype(values.dtype)
        flat_values = pa.array(flat.ravel().astype(str) if meta["dtype"] == "str" else flat.ravel(), arrow_type)
        if values.ndim > 1:
            width = flat.shape[1]
            column = (pa.FixedSizeListArray.from_arrays(flat_values, width) if width
                      else pa.array([[]] * len(values), pa.list_(arrow_type)))
        else:
            column = flat_values
        columns["/".join(meta["place"])] = column
    doc = {"format": RESPONSE_FORMAT, "entries": metas, "uns": result.uns}
    table = pa.table(columns).replace_schema_metadata({_RESPONSE_KEY: json.dumps(doc).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_result(body: bytes, content_type: str) -> MapResult:
    """Decode a response body into a :class:`MapResult`."""
    kind = media_type(content_type)
    if kind == ARROW:
        table = _read_arrow(body, None)
        doc = _arrow_meta(table, _RESPONSE_KEY)
        _check_format(doc)
        entries = {}
        for meta in doc["entries"]:
            column = table.column("/".join(meta["place"])).combine_chunks()
            if len(meta["shape"]) > 1:
                column = column.flatten()
            entries[tuple(meta["place"])] = (_from_kind(column.to_numpy(zero_copy_only=False), meta["dtype"],
                                                        meta["shape"]), meta["columns"])
        cells = [str(c) for c in table.column("cell_id").to_pylist()]
        return MapResult(cells, entries, doc["uns"])
    if kind == NPZ:
        with _open_npz(body, None) as z:
            doc = _npz_json(z, "meta")
            _check_format(doc)
            entries = {tuple(m["place"]): (_from_kind(_npz_get(z, f"e{i}"), m["dtype"], m["shape"]), m["columns"])
                       for i, m in enumerate(doc["entries"])}
            cells = [str(c) for c in _npz_get(z, "cell_id")]
        return MapResult(cells, entries, doc["uns"])
    if kind == JSON:
        doc = parse_json(body, "the response")
        _check_format(doc)
        entries = {tuple(m["place"]): (_from_json_values(m["values"], m), m["columns"]) for m in doc["entries"]}
        return MapResult([str(c) for c in doc["cells"]], entries, doc["uns"])
    raise WireError(f"unsupported response content type {content_type!r}")


