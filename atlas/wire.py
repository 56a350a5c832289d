"""The mapping service's wire format: query counts in, mapping results out (pure functions).

A request carries, per modality, the query's **raw counts** as a sparse matrix together with
the feature ids and the cell ids, plus the mapping parameters. A response carries the contract's
AnnData (see :func:`atlas.mapping.map_query`) column by column, so that the client rebuilds it
exactly: float32 values bit for bit, the same dtypes, the same column order, ``uns["atlas"]``.

Three encodings, chosen by ``Content-Type`` (the response uses the request's, or the first of
these that ``Accept`` names):

``application/vnd.apache.arrow.stream`` (Arrow IPC stream; what the SDK sends)
    Request: one row per cell — ``cell_id`` (string) and per modality ``<m>.indices``
    (list<int32>: vocabulary-free column numbers into that modality's feature list) and
    ``<m>.data`` (list<numeric>: the counts). The list offsets are the CSR row pointer. The
    schema metadata key ``atlas.request`` holds JSON ``{"format": "atlas.map-request/1",
    "modalities": {m: {"features": [...]}}, "params": {...}}``.
    Response: one row per cell — ``cell_id``, one column per entry (below); metadata
    ``atlas.response`` = JSON ``{"format", "entries", "uns"}``.

``application/x-npz`` (numpy ``.npz``, read without pickle)
    Request: ``cell_id`` (str [n]); per modality ``<m>.features`` (str [f]), ``<m>.data``,
    ``<m>.indices``, ``<m>.indptr`` (CSR arrays); ``params`` (0-d str: JSON).
    Response: ``cell_id``, ``e0``, ``e1``, … (one array per entry) and ``meta`` (0-d str: JSON
    ``{"format", "entries", "uns"}``).

``application/json`` (small requests, e.g. from ``curl``)
    Request: ``{"cells": [...], "features": [...], "counts": [[...], ...], "modalities":
    {"protein": {"features": [...], "counts": [[...]]}}, "params": {...}}`` — dense
    cells × features counts; top-level ``features``/``counts`` are RNA.
    Response: ``{"format", "cells", "entries": [{..., "values": [...]}], "uns"}``. Non-finite
    floats are the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.

A response *entry* is one per-cell array of the result: ``{"place": ["obs", column] |
["obsm", key] | ["uns", key, ...], "dtype": "float32", "shape": [n] or [n, w], "columns":
[...] or null}`` (``columns``: the feature names of an ``obsm`` DataFrame). ``uns`` holds the
result's JSON-able ``uns`` (arrays stored as entries are left out of it).

Mapping parameters (:class:`MapParams`) go in the body (``params``) or in the query string
(``?levels=cell_type_l1,cell_type_l2&predict=protein&thresholds=0.5``); a parameter given in
both places must have the same value.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlas.errors import AtlasError
from atlas.names import MODALITIES

ARROW = "application/vnd.apache.arrow.stream"
NPZ = "application/x-npz"
JSON = "application/json"
CONTENT_TYPES = (ARROW, NPZ, JSON)
REQUEST_FORMAT = "atlas.map-request/1"
RESPONSE_FORMAT = "atlas.map-response/1"
_REQUEST_KEY = b"atlas.request"
_RESPONSE_KEY = b"atlas.response"
PREDICT_METHODS = ("knn", "decoder", "both")
_NUMERIC_KINDS = "iuf"


class WireError(AtlasError):
    """A request or response body (or a parameter) that does not follow the wire format."""


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapParams:
    """How to map: the options of :func:`atlas.mapping.map_query`, with the same defaults."""

    levels: list[str] | None = None
    """Label levels to predict (None: every level of the atlas)."""
    predict: list[str] | None = None
    """Modalities to predict (None: every one the atlas can predict that the query lacks; []: none)."""
    predict_method: str = "knn"
    """``knn``, ``decoder`` (CVQVAE atlases) or ``both``."""
    k_coarse: int = 25
    """Neighbours per cell in the coarse index (level 1 and modality prediction)."""
    k_fine: int = 5
    """Neighbours per cell in a fine shard (deeper levels)."""
    thresholds: str | float | dict[str, float] | None = "calibrated"
    """Minimum confidence per level: ``"calibrated"`` (the atlas's), a number, a dict per level, or None."""
    return_neighbors: bool = False
    """Also return each cell's coarse neighbours (store ids, similarities, datasets)."""
    min_fraction: float = 0.5
    """Refuse a modality whose query covers less than this fraction of the atlas's features."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_PARAM_NAMES = tuple(MapParams.__dataclass_fields__)


def _str_list(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise WireError(f"parameter {name} must be a list of names (or a comma-separated string), got {value!r}")
    return list(value)


def _number(name: str, value: Any, kind: type, minimum: float | None = None,
            maximum: float | None = None) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and isinstance(value, float) and not value.is_integer()):
        raise WireError(f"parameter {name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if not math.isfinite(value):
        raise WireError(f"parameter {name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise WireError(f"parameter {name} must be ≥ {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise WireError(f"parameter {name} must be ≤ {maximum}, got {value!r}")
    return value


def _thresholds(value: Any) -> str | float | dict[str, float] | None:
    if value is None or value == "calibrated":
        return value
    if isinstance(value, Mapping):
        return {str(k): _number(f"thresholds[{k!r}]", v, float) for k, v in value.items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _number("thresholds", value, float)
    raise WireError(f"parameter thresholds must be 'calibrated', a number, an object per level or null; got {value!r}")


def parse_params(values: Mapping[str, Any] | None) -> MapParams:
    """Validate JSON-typed parameters (a request body's ``params``) into :class:`MapParams`."""
    values = dict(values or {})
    unknown = sorted(set(values) - set(_PARAM_NAMES))
    if unknown:
        raise WireError(f"unknown parameter(s) {unknown}; accepted: {list(_PARAM_NAMES)}")
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in ("levels", "predict"):
            out[name] = _str_list(name, value)
        elif name == "predict_method":
            if value not in PREDICT_METHODS:
                raise WireError(f"parameter predict_method must be one of {list(PREDICT_METHODS)}, got {value!r}")
            out[name] = value
        elif name in ("k_coarse", "k_fine"):
            out[name] = _number(name, value, int, minimum=1)
        elif name == "min_fraction":
            out[name] = _number(name, value, float, minimum=0.0, maximum=1.0)
        elif name == "return_neighbors":
            if not isinstance(value, bool):
                raise WireError(f"parameter return_neighbors must be true or false, got {value!r}")
            out[name] = value
        elif name == "thresholds":
            out[name] = _thresholds(value)
    return MapParams(**out)


def params_from_query(items: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Query-string parameters (``?levels=a,b&predict=protein&k_coarse=30``) as JSON-typed values.

    Lists may be comma-separated or repeated; ``predict=none`` (or empty) asks for no
    prediction; ``thresholds`` is ``calibrated``, ``none``, a number or a JSON object.
    """
    raw: dict[str, list[str]] = {}
    for key, value in items:
        raw.setdefault(key, []).append(value)
    out: dict[str, Any] = {}
    for key, values in raw.items():
        if key not in _PARAM_NAMES:
            raise WireError(f"unknown query parameter {key!r}; accepted: {list(_PARAM_NAMES)}")
        if key in ("levels", "predict"):
            names = [v.strip() for value in values for v in value.split(",") if v.strip()]
            out[key] = [] if key == "predict" and names in ([], ["none"]) else names
            continue
        if len(values) > 1:
            raise WireError(f"query parameter {key} is given {len(values)} times; give it once")
        value = values[0].strip()
        if key == "predict_method":
            out[key] = value
        elif key in ("k_coarse", "k_fine"):
            try:
                out[key] = int(value)
            except ValueError:
                raise WireError(f"query parameter {key} must be an integer, got {value!r}") from None
        elif key == "min_fraction":
            out[key] = _float_text(key, value)
        elif key == "return_neighbors":
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise WireError(f"query parameter return_neighbors must be true or false, got {value!r}")
            out[key] = lowered in ("true", "1", "yes")
        elif key == "thresholds":
            if value in ("calibrated",):
                out[key] = value
            elif value.lower() in ("none", "null", ""):
                out[key] = None
            elif value.startswith("{"):
                out[key] = parse_json(value, "query parameter thresholds")
            else:
                out[key] = _float_text(key, value)
    return out


def _float_text(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise WireError(f"query parameter {key} must be a number, got {value!r}") from None


def merge_params(body: Mapping[str, Any] | None, query: Mapping[str, Any] | None) -> MapParams:
    """The request's parameters: the body's and the query string's (a clash is an error)."""
    body, query = dict(body or {}), dict(query or {})
    clash = sorted(k for k in set(body) & set(query) if body[k] != query[k])
    if clash:
        raise WireError(f"parameter(s) {clash} differ between the query string and the body; give each once")
    return parse_params({**body, **query})


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
        as32 = values.astype(np.float32)
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


def _malformed() -> tuple[type[BaseException], ...]:
    """What decoding a body malformed in an unforeseen way raises (pyarrow imported lazily)."""
    import pyarrow as pa

    # SystemError / MemoryError: pyarrow raises them for some corrupt length fields; RuntimeError:
    # zipfile, for a member whose flags say "encrypted" (all found by fuzzing).
    return (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, EOFError,
            NotImplementedError, SystemError, MemoryError, RuntimeError, zipfile.BadZipFile, zlib.error,
            pa.ArrowException)


class TooManyCells(WireError):
    """More cells in one request than the server accepts."""


class UnsupportedMediaType(WireError):
    """A body in a format the service does not read."""


def _check_cells(n: int, max_cells: int | None) -> None:
    if max_cells is not None and n > max_cells:
        raise TooManyCells(
            f"the request holds {n} cells; this server maps at most {max_cells} cells per request — "
            "split the query into smaller requests, or use atlas.client.AtlasClient, which sends "
            "large queries in chunks")


def media_type(content_type: str | None) -> str:
    """``"application/json; charset=utf-8"`` → ``"application/json"``."""
    return (content_type or "").split(";")[0].strip().lower()


# -- Arrow ------------------------------------------------------------------------------------


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


def _read_arrow(body: bytes, max_decoded_bytes: int | None) -> Any:
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.py_buffer(body))
        batches, total = [], 0
        for batch in reader:
            total += batch.nbytes
            if max_decoded_bytes is not None and total > max_decoded_bytes:
                raise WireError(f"the Arrow stream expands to more than {max_decoded_bytes} bytes; send fewer cells per request")
            batches.append(batch)
        return pa.Table.from_batches(batches, schema=reader.schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError) as e:
        raise WireError(f"the body is not a readable Arrow IPC stream ({e})") from None


def _arrow_meta(table: Any, key: bytes) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(key)
    if raw is None:
        raise WireError(f"the Arrow stream has no {key.decode()!r} schema metadata (see atlas.wire)")
    meta = parse_json(raw, f"the {key.decode()!r} schema metadata")
    if not isinstance(meta, dict):
        raise WireError(f"the {key.decode()!r} schema metadata must be a JSON object")
    return meta


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
    np.savez(buf, **arrays)
    return buf.getvalue()


def _open_npz(body: bytes, max_decoded_bytes: int | None) -> Any:
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            expanded = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise WireError(f"the body is not a readable .npz file ({e})") from None
    if max_decoded_bytes is not None and expanded > max_decoded_bytes:
        raise WireError(f"the .npz expands to {expanded} bytes (more than {max_decoded_bytes}); send fewer cells per request")
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise WireError(f"the body is not a readable .npz file ({e})") from None


def _npz_get(z: Any, key: str) -> np.ndarray:
    try:
        return z[key]
    except KeyError:
        raise WireError(f"the .npz request has no {key!r} array") from None
    except ValueError as e:  # object arrays need pickle: refused
        raise WireError(f"the .npz array {key!r} cannot be read without pickle ({e}); send numbers and strings") from None


def _npz_json(z: Any, key: str) -> Any:
    raw = _npz_get(z, key)
    if raw.ndim != 0 or raw.dtype.kind != "U":
        raise WireError(f"the .npz {key!r} must be a 0-d string holding JSON")
    return parse_json(str(raw), f"the .npz {key!r}")


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


def parse_json(raw: str | bytes, what: str) -> Any:
    """``json.loads`` for untrusted text: any failure (bad syntax, bad UTF-8, nesting so deep
    that the parser's recursion limit is hit) is a :class:`WireError` naming ``what``."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WireError(f"{what} is not valid JSON ({e})") from None
    except RecursionError:
        raise WireError(f"{what} is JSON nested too deeply to read; the formats here nest a few levels") from None


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
    return out


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


def _check_format(doc: Any) -> None:
    if not isinstance(doc, dict) or doc.get("format") != RESPONSE_FORMAT:
        raise WireError(f"not an {RESPONSE_FORMAT} response (format {doc.get('format') if isinstance(doc, dict) else None!r})")


def choose_response_type(request_type: str, accept: str | None) -> str:
    """The response encoding: the first wire type ``Accept`` names, else the request's."""
    for part in (accept or "").split(","):
        kind = media_type(part)
        if kind in CONTENT_TYPES:
            return kind
    kind = media_type(request_type)
    return kind if kind in CONTENT_TYPES else JSON
