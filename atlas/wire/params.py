"""The mapping parameters on the wire: :class:`MapParams`, from a JSON body or a query string."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from atlas.wire.common import PREDICT_METHODS, WireError, parse_json

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


