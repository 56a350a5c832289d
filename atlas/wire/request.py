"""Requests: a query's raw counts, features and cell ids in Arrow, npz or JSON."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlas.names import MODALITIES
from atlas.wire.common import (
    _NUMERIC_KINDS,
    _REQUEST_KEY,
    ARROW,
    CONTENT_TYPES,
    JSON,
    NPZ,
    REQUEST_FORMAT,
    UnsupportedMediaType,
    WireError,
    _arrow_meta,
    _check_cells,
    _malformed,
    _npz_get,
    _npz_json,
    _open_npz,
    _read_arrow,
    media_type,
    parse_json,
)

# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


@dataclass
class QueryPayload:
    """A decoded request: the cells' raw counts per modality and the raw (unvalidated) parameters."""

    cells: list[str]
    """Cell ids, in order (returned as the result's obs_names)."""
    modalities: dict[str, tuple[list[str], sp.csr_matrix]] = field(default_factory=dict)
    """Modality → (feature ids, counts CSR [cells, features]) in the dtype the client sent."""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return len(self.cells)

    def to_anndata(self) -> Any:
        """The cells as an AnnData laid out the way :mod:`atlas.mapping.align` reads a query:
        RNA in ``X`` (feature ids = ``var_names``), other modalities in ``obsm[m]`` as DataFrames
        (sparse-backed). obs_names are positions; the real cell ids stay in :attr:`cells`."""
        import warnings

        import anndata as ad

        index = pd.Index([str(i) for i in range(self.n_cells)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate feature ids are the aligner's business
            if "RNA" in self.modalities:
                features, counts = self.modalities["RNA"]
                adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=index),
                                   var=pd.DataFrame(index=pd.Index(features)))
            else:
                adata = ad.AnnData(obs=pd.DataFrame(index=index))
            for m, (features, counts) in self.modalities.items():
                if m != "RNA":
                    frame = pd.DataFrame.sparse.from_spmatrix(counts, index=index, columns=pd.Index(features))
                    adata.obsm[m] = frame
        return adata


def _check_modality(m: str) -> None:
    if m not in MODALITIES:
        raise WireError(f"unknown modality {m!r}; the wire carries {list(MODALITIES)}")


def _csr(m: str, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_cells: int,
         n_features: int) -> sp.csr_matrix:
    data, indices, indptr = np.asarray(data), np.asarray(indices), np.asarray(indptr)
    if data.dtype.kind not in _NUMERIC_KINDS:
        raise WireError(f"{m} counts must be numbers, got dtype {data.dtype}")
    if indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu":
        raise WireError(f"{m} indices and indptr must be integers")
    if indptr.ndim != 1 or len(indptr) != n_cells + 1:
        raise WireError(f"{m} indptr has {len(indptr)} entries for {n_cells} cells (expected {n_cells + 1})")
    if data.ndim != 1 or indices.ndim != 1 or len(data) != len(indices):
        raise WireError(f"{m} data and indices must be 1-d of the same length ({data.shape} vs {indices.shape})")
    if n_cells and (indptr[0] != 0 or indptr[-1] != len(data) or np.any(np.diff(indptr.astype(np.int64)) < 0)):
        raise WireError(f"{m} indptr must start at 0, never decrease and end at the number of values")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_features):
        raise WireError(f"{m} indices must lie in [0, {n_features}) (the number of {m} features)")
    idx_type = np.int64 if max(n_features, len(data)) >= 2**31 - 1 else np.int32
    return sp.csr_matrix((data, indices.astype(idx_type), indptr.astype(idx_type)),
                         shape=(n_cells, n_features))


def _features(m: str, features: Any) -> list[str]:
    if not isinstance(features, (list, tuple, np.ndarray)) or not all(isinstance(f, str) for f in list(features)):
        raise WireError(f"{m} features must be a list of feature ids (strings)")
    return [str(f) for f in features]


def _wire_data(values: np.ndarray) -> np.ndarray:
    """The counts in the smallest dtype that holds them exactly (what offline would see)."""
    values = np.asarray(values)
    if values.dtype.kind == "b":
        return values.astype(np.int32)
    if values.dtype.kind in "iu":
        if values.size == 0 or (values.min() >= np.iinfo(np.int32).min and values.max() <= np.iinfo(np.int32).max):
            return values.astype(np.int32, copy=False)
        return values.astype(np.int64, copy=False)
    if values.dtype.kind == "f":
        if values.dtype == np.float32:
            return values
        as32: np.ndarray = values.astype(np.float32)
        with np.errstate(invalid="ignore"):
            if np.array_equal(as32.astype(values.dtype), values, equal_nan=True):
                return as32
        return values.astype(np.float64, copy=False)
    raise WireError(f"counts must be numbers, got dtype {values.dtype}")


def encode_request(payload: QueryPayload, content_type: str = ARROW) -> bytes:
    """Encode a query (``payload.params``: JSON-typed parameters) as a request body."""
    for m, (features, counts) in payload.modalities.items():
        _check_modality(m)
        if counts.shape != (payload.n_cells, len(features)):
            raise WireError(f"{m} counts have shape {counts.shape}; expected ({payload.n_cells} cells, "
                            f"{len(features)} features)")
    if content_type == ARROW:
        return _arrow_request(payload)
    if content_type == NPZ:
        return _npz_request(payload)
    if content_type == JSON:
        return _json_request(payload)
    raise WireError(f"unsupported content type {content_type!r}; use one of {list(CONTENT_TYPES)}")


def decode_request(body: bytes, content_type: str, *, max_cells: int | None = None,
                   max_decoded_bytes: int | None = None) -> QueryPayload:
    """Decode a request body; :class:`WireError` with a precise message when it is malformed.

    ``max_cells``: :class:`TooManyCells` above it. ``max_decoded_bytes`` bounds what a
    compressed body may expand to (npz members, Arrow record batches).
    """
    kind = media_type(content_type)
    decoders = {ARROW: lambda: _arrow_decode_request(body, max_cells, max_decoded_bytes),
                NPZ: lambda: _npz_decode_request(body, max_cells, max_decoded_bytes),
                JSON: lambda: _json_decode_request(body, max_cells)}
    if kind not in decoders:
        raise UnsupportedMediaType(
            f"unsupported content type {content_type!r}; send {ARROW} (what atlas.client sends), {NPZ} "
            f"or, for a few cells, {JSON}")
    try:
        payload = decoders[kind]()
    except WireError:
        raise
    except _malformed() as e:
        # The checks above name the common faults; a body malformed in a way they do not foresee
        # (found by fuzzing: a corrupt zip member, a field of the wrong JSON type) is still the
        # client's fault, a 400, never a 500.
        raise WireError(f"the body is not a well-formed {kind} map request ({type(e).__name__}: {e}); "
                        "see atlas.wire for the format, or send it with atlas.client") from None
    if payload.n_cells == 0:
        raise WireError("the request holds no cells")
    if not payload.modalities:
        raise WireError(f"the request holds no counts; send at least one modality of {list(MODALITIES)}")
    if not isinstance(payload.params, dict):
        raise WireError("params must be a JSON object")
    return payload


def _arrow_request(payload: QueryPayload) -> bytes:
    import pyarrow as pa

    columns = {"cell_id": pa.array([str(c) for c in payload.cells], pa.string())}
    meta: dict[str, Any] = {"format": REQUEST_FORMAT, "modalities": {}, "params": payload.params}
    for m, (features, counts) in payload.modalities.items():
        csr = sp.csr_matrix(counts)
        offsets = pa.array(csr.indptr.astype(np.int64 if csr.nnz >= 2**31 else np.int32))
        list_of = pa.LargeListArray if csr.nnz >= 2**31 else pa.ListArray
        columns[f"{m}.indices"] = list_of.from_arrays(offsets, pa.array(csr.indices.astype(np.int32)))
        columns[f"{m}.data"] = list_of.from_arrays(offsets, pa.array(_wire_data(csr.data)))
        meta["modalities"][m] = {"features": list(features)}
    table = pa.table(columns).replace_schema_metadata({_REQUEST_KEY: json.dumps(meta).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _list_parts(table: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, flat values) of a list column, after checking it is one without nulls."""
    import pyarrow as pa

    from atlas.data.arrow import list_column_csr

    column = table.column(name)
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise WireError(f"column {name!r} must be a list column, got {column.type}")
    if column.null_count:
        raise WireError(f"column {name!r} has null rows; send an empty list for a cell without counts")
    return list_column_csr(column)


def _arrow_decode_request(body: bytes, max_cells: int | None, max_decoded_bytes: int | None) -> QueryPayload:
    table = _read_arrow(body, max_decoded_bytes)
    _check_cells(table.num_rows, max_cells)
    meta = _arrow_meta(table, _REQUEST_KEY)
    if meta.get("format") != REQUEST_FORMAT:
        raise WireError(f"request format {meta.get('format')!r} is not {REQUEST_FORMAT!r}")
    if "cell_id" not in table.column_names:
        raise WireError("the Arrow request has no cell_id column")
    cells = [str(c) for c in table.column("cell_id").to_pylist()]
    modalities = {}
    for m, info in (meta.get("modalities") or {}).items():
        _check_modality(m)
        features = _features(m, (info or {}).get("features"))
        for part in ("indices", "data"):
            if f"{m}.{part}" not in table.column_names:
                raise WireError(f"the Arrow request lists modality {m} but has no {m}.{part} column")
        ind_offsets, indices = _list_parts(table, f"{m}.indices")
        data_offsets, data = _list_parts(table, f"{m}.data")
        if not np.array_equal(ind_offsets, data_offsets):
            raise WireError(f"{m}.indices and {m}.data have different lengths in some cells")
        modalities[m] = (features, _csr(m, data, indices, ind_offsets, len(cells), len(features)))
    return QueryPayload(cells, modalities, meta.get("params") or {})


# -- npz --------------------------------------------------------------------------------------


def _npz_request(payload: QueryPayload) -> bytes:
    arrays: dict[str, np.ndarray] = {
        "format": np.array(REQUEST_FORMAT),
        "cell_id": np.asarray([str(c) for c in payload.cells], dtype=str),
        "params": np.array(json.dumps(payload.params)),
    }
    for m, (features, counts) in payload.modalities.items():
        csr = sp.csr_matrix(counts)
        arrays[f"{m}.features"] = np.asarray(list(features), dtype=str)
        arrays[f"{m}.data"] = _wire_data(csr.data)
        arrays[f"{m}.indices"] = csr.indices
        arrays[f"{m}.indptr"] = csr.indptr
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # no key is allow_pickle
    return buf.getvalue()


def _npz_decode_request(body: bytes, max_cells: int | None, max_decoded_bytes: int | None) -> QueryPayload:
    with _open_npz(body, max_decoded_bytes) as z:
        names = set(z.files)
        cells = _npz_get(z, "cell_id")
        if cells.ndim != 1 or cells.dtype.kind != "U":
            raise WireError("the .npz cell_id must be a 1-d string array")
        _check_cells(len(cells), max_cells)
        params = _npz_json(z, "params") if "params" in names else {}
        modalities = {}
        for key in sorted(names):
            if not key.endswith(".features"):
                continue
            m = key[: -len(".features")]
            _check_modality(m)
            features = _npz_get(z, key)
            if features.ndim != 1 or (features.size and features.dtype.kind != "U"):
                raise WireError(f"the .npz {key!r} must be a 1-d string array")
            modalities[m] = (
                [str(f) for f in features],
                _csr(m, _npz_get(z, f"{m}.data"), _npz_get(z, f"{m}.indices"), _npz_get(z, f"{m}.indptr"),
                     len(cells), len(features)),
            )
    return QueryPayload([str(c) for c in cells], modalities, params)


# -- JSON -------------------------------------------------------------------------------------


def _json_request(payload: QueryPayload) -> bytes:
    out: dict[str, Any] = {"format": REQUEST_FORMAT, "cells": [str(c) for c in payload.cells],
                           "modalities": {}, "params": payload.params}
    for m, (features, counts) in payload.modalities.items():
        dense = sp.csr_matrix(counts).toarray()
        out["modalities"][m] = {"features": list(features), "counts": dense.tolist()}
    return json.dumps(out).encode()


def _json_counts(m: str, counts: Any, n_cells: int, n_features: int) -> sp.csr_matrix:
    if not isinstance(counts, list) or len(counts) != n_cells:
        raise WireError(f"{m} counts must be a list of {n_cells} rows (one per cell)")
    for row in counts:
        if not isinstance(row, list) or len(row) != n_features:
            raise WireError(f"every {m} counts row must be a list of {n_features} numbers (one per feature)")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row):
            raise WireError(f"{m} counts must be numbers")
    dense = np.asarray(counts, dtype=np.float64).reshape(n_cells, n_features)
    return sp.csr_matrix(dense)


def _json_decode_request(body: bytes, max_cells: int | None) -> QueryPayload:
    doc = parse_json(body, "the body")
    if not isinstance(doc, dict):
        raise WireError("the JSON body must be an object with cells, features and counts")
    allowed = {"format", "cells", "features", "counts", "modalities", "params"}
    extra = sorted(set(doc) - allowed)
    if extra:
        raise WireError(f"unknown key(s) {extra} in the JSON body; accepted: {sorted(allowed)}")
    cells = doc.get("cells")
    if not isinstance(cells, list) or not all(isinstance(c, (str, int)) for c in cells):
        raise WireError("the JSON body needs 'cells': a list of cell ids")
    _check_cells(len(cells), max_cells)
    blocks = doc.get("modalities") or {}
    if not isinstance(blocks, dict):
        raise WireError("'modalities' in the JSON body must be an object: {modality: {features, counts}}")
    if not isinstance(doc.get("modalities") or {}, dict):
        raise WireError("'modalities' must be an object: {modality: {features, counts}}")
    if "features" in doc or "counts" in doc:
        if "RNA" in blocks:
            raise WireError("RNA is given twice (top-level features/counts and modalities.RNA)")
        blocks["RNA"] = {"features": doc.get("features"), "counts": doc.get("counts")}
    modalities = {}
    for m, block in blocks.items():
        _check_modality(m)
        if not isinstance(block, dict):
            raise WireError(f"modality {m} must be an object with features and counts")
        features = _features(m, block.get("features"))
        modalities[m] = (features, _json_counts(m, block.get("counts"), len(cells), len(features)))
    params = doc.get("params") or {}
    if not isinstance(params, dict):
        raise WireError("'params' must be a JSON object")
    return QueryPayload([str(c) for c in cells], modalities, params)


