"""Content types, format names and errors shared by the request and result codecs."""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from typing import Any

import numpy as np

from atlas.errors import AtlasError

ARROW = "application/vnd.apache.arrow.stream"
NPZ = "application/x-npz"
JSON = "application/json"
CONTENT_TYPES = (ARROW, NPZ, JSON)
REQUEST_FORMAT = "atlas.map-request/1"
RESPONSE_FORMAT = "atlas.map-response/1"
_REQUEST_KEY = b"atlas.request"
_RESPONSE_KEY = b"atlas.response"
_NUMERIC_KINDS = "iuf"


class WireError(AtlasError):
    """A request or response body (or a parameter) that does not follow the wire format."""



def parse_json(raw: str | bytes, what: str) -> Any:
    """``json.loads`` for untrusted text: any failure (bad syntax, bad UTF-8, nesting so deep
    that the parser's recursion limit is hit) is a :class:`WireError` naming ``what``."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WireError(f"{what} is not valid JSON ({e})") from None
    except RecursionError:
        raise WireError(f"{what} is JSON nested too deeply to read; the formats here nest a few levels") from None


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


# -- reading Arrow and npz containers from untrusted bytes ------------------------------------


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
