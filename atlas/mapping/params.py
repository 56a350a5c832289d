"""The mapping parameters, declared once: :class:`MapParams`.

Every way of mapping reads this one model — :func:`atlas.mapping.map_query` (keyword options),
:func:`atlas.mapping.offline.map_offline`, :meth:`atlas.client.AtlasClient.map`, the service's
request body and query string, ``atlas map`` and ``jobs/map_query.py`` — so a parameter, its
default, its check and its help text exist in one place. Values arrive either JSON-typed
(:meth:`MapParams.parse`: Python callers, request bodies) or as the text a user types
(:func:`params_from_text`: command lines and query strings: ``levels=a,b``, ``predict=none``,
``thresholds=l1=0.5,l2=0.3``); both end in the same validation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atlas.errors import MappingError
from atlas.mapping.composition import MIN_OVERLAP

PREDICT_METHODS = ("knn", "decoder", "both")
K_COARSE = 25
K_FINE = 25
"""Neighbours per cell at level 1 and in a fine shard. The fine k was 5 until chosen on two
reference-only validation splits (``benchmarks/validate_vote.py``): level-2 macro-F1 0.794 → 0.804
(pbmc10k's reference split again 80/20) and 0.207 → 0.267 (liao2020, one reference patient mapped
onto the other), accuracy up on both; level 1 does not depend on it."""
DOMAIN_STATISTICS = ("auto", "input", "all", "reference")
_CHOICES = {"predict_method": PREDICT_METHODS, "domain_statistics": DOMAIN_STATISTICS}


class MapParams(BaseModel):
    """How to map query cells onto an atlas (see :func:`atlas.mapping.map_query`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    levels: list[str] | None = Field(None, description="Label levels to predict (default: every level of the atlas).")
    predict: list[str] | None = Field(
        None, description="Modalities to predict (default: every one the atlas can predict that the query lacks; "
                          "empty or 'none': none).")
    predict_method: str = Field("knn", description="knn (weighted mean of the k_coarse nearest reference cells "
                                                   "in the atlas's profile space, or in its embedding), decoder "
                                                   "(CVQVAE atlases) or both.")
    k_coarse: int = Field(K_COARSE, description="Neighbours per cell in the coarse index (level 1, modality "
                                                "prediction).")
    k_fine: int = Field(K_FINE, description="Neighbours per cell in a fine shard (deeper levels).")
    thresholds: str | float | dict[str, float] | None = Field(
        "calibrated", description="Unknown below this confidence: calibrated (the atlas's own), none, one number, "
                                  "or one per level (LEVEL=NUMBER,... on a command line).")
    return_neighbors: bool = Field(False, description="Also return each cell's coarse neighbours.")
    min_fraction: float = Field(0.5, description="Refuse a modality whose query covers less than this fraction of "
                                                 "the atlas's features.")
    batch_key: str | None = Field(
        None, description="obs column naming the query's batches (samples, donors, runs): each batch of at least "
                          "min_domain_cells cells is normalised by its own statistics. Without batch_key or batch "
                          "every cell uses the reference's average statistics.")
    batch: str | None = Field(
        None, description="The whole query is one batch with this name (instead of batch_key), normalised by its "
                          "own statistics.")
    domain_statistics: str = Field(
        "auto", description="input: each query batch of at least min_domain_cells cells gets its own statistics "
                            "for the normalisation of its measured values (their scale in its protocol), the "
                            "reference average deeper; all: its own statistics in every normalisation layer "
                            "(stronger, but erases the biology of a batch whose cell-type mix differs from the "
                            "reference's, e.g. sorted cells); auto: all for a batch whose cell-type mix, estimated "
                            "by the atlas's label heads, overlaps the reference's by at least min_mix_overlap, else input "
                            "(input without label heads); reference: the reference average everywhere.")
    min_domain_cells: int = Field(100, description="Fewest cells a query batch needs for its own statistics.")
    min_mix_overlap: float = Field(
        MIN_OVERLAP, description="With domain_statistics auto: the least overlap (sum over cell types of the smaller "
                                 "of the two fractions) of a batch's estimated cell-type mix with the reference's for "
                                 "every layer to adapt.")

    # -- checks (messages name the parameter and what is accepted) -----------------------------

    @field_validator("levels", "predict", mode="before")
    @classmethod
    def _names(cls, value: Any, info: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{info.field_name} must be a list of names (or a comma-separated string), got {value!r}")
        return list(value)

    @field_validator("predict_method", "domain_statistics", mode="before")
    @classmethod
    def _choice(cls, value: Any, info: Any) -> Any:
        choices = _CHOICES[info.field_name]
        if value not in choices:
            raise ValueError(f"{info.field_name} must be one of {list(choices)}, got {value!r}")
        return value

    @field_validator("k_coarse", "k_fine", "min_domain_cells", mode="before")
    @classmethod
    def _positive_int(cls, value: Any, info: Any) -> Any:
        return _number(info.field_name, value, int, minimum=2 if info.field_name == "min_domain_cells" else 1)

    @field_validator("min_fraction", "min_mix_overlap", mode="before")
    @classmethod
    def _fraction(cls, value: Any, info: Any) -> Any:
        return _number(info.field_name, value, float, minimum=0.0, maximum=1.0)

    @field_validator("return_neighbors", mode="before")
    @classmethod
    def _flag(cls, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError(f"return_neighbors must be true or false, got {value!r}")
        return value

    @field_validator("batch_key", "batch", mode="before")
    @classmethod
    def _name(cls, value: Any, info: Any) -> Any:
        if value is not None and (not isinstance(value, str) or not value.strip()):
            what = "the name of an obs column" if info.field_name == "batch_key" else "a batch name"
            raise ValueError(f"{info.field_name} must be {what}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_batch_source(self) -> MapParams:
        if self.batch_key is not None and self.batch is not None:
            raise ValueError("give batch_key (an obs column of batches) or batch (one name for the whole query), "
                             "not both")
        return self

    @field_validator("thresholds", mode="before")
    @classmethod
    def _thresholds(cls, value: Any) -> Any:
        if value is None or value == "calibrated":
            return value
        if isinstance(value, Mapping):
            return {str(k): _number(f"thresholds[{k!r}]", v, float) for k, v in value.items()}
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _number("thresholds", value, float)
        raise ValueError(f"thresholds must be 'calibrated', a number, an object per level or null; got {value!r}")

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def parse(cls, values: MapParams | Mapping[str, Any] | None = None, **options: Any) -> MapParams:
        """``values`` (a MapParams or JSON-typed mapping) with ``options`` on top, validated.

        Raises :class:`~atlas.mapping.align.MappingError` naming every bad parameter."""
        if values is not None and not isinstance(values, (MapParams, Mapping)):
            raise MappingError(f"mapping parameters must be a MapParams or a dict, got {type(values).__name__}; "
                               "give options by name, e.g. map_query(adata, atlas, levels=[...])")
        base = values.to_json() if isinstance(values, MapParams) else dict(values or {})
        merged = {**base, **options}
        unknown = sorted(set(merged) - set(cls.model_fields))
        if unknown:
            raise MappingError(f"unknown parameter(s) {unknown}; accepted: {list(cls.model_fields)}")
        try:
            return cls(**merged)
        except ValidationError as err:
            raise MappingError("; ".join(_message(e) for e in err.errors())) from None

    def to_json(self) -> dict[str, Any]:
        """Every parameter, JSON-typed (the service describes its defaults with it)."""
        return self.model_dump()

    def to_request(self) -> dict[str, Any]:
        """The parameters that differ from their defaults, JSON-typed: what a request body's
        ``params`` holds. A service takes its defaults for the rest, so a client newer than the
        service only fails where it asks for a parameter the service does not know."""
        return self.model_dump(exclude_defaults=True)


PARAM_NAMES = tuple(MapParams.model_fields)


def _number(name: str, value: Any, kind: type, minimum: float | None = None, maximum: float | None = None) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be ≤ {maximum}, got {value!r}")
    return value


def _message(error: Mapping[str, Any]) -> str:
    cause = (error.get("ctx") or {}).get("error")
    text = str(cause) if cause is not None else f"{'.'.join(map(str, error['loc']))}: {error['msg']}"
    return f"parameter {text}" if error.get("loc") else text


# ---------------------------------------------------------------------------------------------
# Text forms (command lines, query strings)
# ---------------------------------------------------------------------------------------------


def names_from_text(value: str | None) -> list[str] | None:
    """``"a,b"`` → ``["a", "b"]``; ``None`` (not given) → None (the default); ``"none"`` or ``""`` → ``[]``."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    return [] if names in ([], ["none"]) else names


def thresholds_from_text(value: str, option: str = "--thresholds") -> str | float | dict[str, float] | None:
    """``calibrated`` | ``none`` | one number for every level | ``LEVEL=NUMBER,LEVEL=NUMBER`` | a JSON object."""
    text = value.strip()
    if text.lower() in ("calibrated", "none", "null", ""):
        return "calibrated" if text.lower() == "calibrated" else None
    if text.startswith("{"):
        from atlas.wire.common import parse_json

        return parse_json(text, f"{option}")
    try:
        return float(text)
    except ValueError:
        pass
    out: dict[str, float] = {}
    for item in text.split(","):
        level, sep, number = item.partition("=")
        try:
            out[level.strip()] = float(number)
        except ValueError:
            sep = ""
        if not sep or not level.strip():
            raise MappingError(f"{option} {value!r}: expected calibrated, none, a number or LEVEL=NUMBER,...")
    return out


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def params_from_text(items: Iterable[tuple[str, str]] | Mapping[str, str | None]) -> dict[str, Any]:
    """Text values (``("k_coarse", "30")``, repeated names for lists) → JSON-typed values.

    Lists may be comma-separated or repeated; ``predict=none`` (or empty) asks for no
    prediction; ``thresholds`` is ``calibrated``, ``none``, a number, ``LEVEL=NUMBER,…`` or a JSON
    object. A mapping's None values are "not given". Validate the result with :meth:`MapParams.parse`.
    """
    pairs = [(k, v) for k, v in items.items() if v is not None] if isinstance(items, Mapping) else list(items)
    raw: dict[str, list[str]] = {}
    for key, value in pairs:
        raw.setdefault(key, []).append(str(value))
    out: dict[str, Any] = {}
    for key, values in raw.items():
        if key not in PARAM_NAMES:
            raise MappingError(f"unknown parameter {key!r}; accepted: {list(PARAM_NAMES)}")
        if key in ("levels", "predict"):
            names = [v.strip() for value in values for v in value.split(",") if v.strip()]
            out[key] = [] if key == "predict" and names in ([], ["none"]) else names
            continue
        if len(values) > 1:
            raise MappingError(f"parameter {key} is given {len(values)} times; give it once")
        value = values[0].strip()
        kind = MapParams.model_fields[key].annotation
        if key == "thresholds":
            out[key] = thresholds_from_text(value, "parameter thresholds")
        elif kind is int:
            try:
                out[key] = int(value)
            except ValueError:
                raise MappingError(f"parameter {key} must be an integer, got {value!r}") from None
        elif kind is float:
            try:
                out[key] = float(value)
            except ValueError:
                raise MappingError(f"parameter {key} must be a number, got {value!r}") from None
        elif kind is bool:
            if value.lower() not in _TRUE + _FALSE:
                raise MappingError(f"parameter {key} must be true or false, got {value!r}")
            out[key] = value.lower() in _TRUE
        elif key in ("batch_key", "batch") and value.lower() in ("none", ""):
            out[key] = None
        else:
            out[key] = value
    return out


def help_texts() -> dict[str, str]:
    """Parameter → help text, for command lines and OpenAPI."""
    return {name: field.description or "" for name, field in MapParams.model_fields.items()}
