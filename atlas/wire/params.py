"""The mapping parameters on the wire: :class:`~atlas.mapping.params.MapParams` from a JSON body
or a query string, with errors as :class:`WireError` (a 400)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from atlas.errors import MappingError
from atlas.mapping.params import MapParams, params_from_text
from atlas.wire.common import WireError

__all__ = ["MapParams", "merge_params", "params_from_query", "parse_params"]


def parse_params(values: Mapping[str, Any] | None) -> MapParams:
    """Validate JSON-typed parameters (a request body's ``params``) into :class:`MapParams`."""
    try:
        return MapParams.parse(values)
    except MappingError as err:
        raise WireError(str(err)) from None


def params_from_query(items: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Query-string parameters (``?levels=a,b&predict=protein&k_coarse=30``) as JSON-typed values
    (the text forms of :func:`~atlas.mapping.params.params_from_text`)."""
    try:
        return params_from_text(list(items))
    except MappingError as err:
        raise WireError(f"in the query string: {err}") from None


def merge_params(body: Mapping[str, Any] | None, query: Mapping[str, Any] | None) -> MapParams:
    """The request's parameters: the body's and the query string's (a clash is an error)."""
    body, query = dict(body or {}), dict(query or {})
    clash = sorted(k for k in set(body) & set(query) if body[k] != query[k])
    if clash:
        raise WireError(f"parameter(s) {clash} differ between the query string and the body; give each once")
    return parse_params({**body, **query})
