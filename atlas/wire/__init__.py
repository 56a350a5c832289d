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

# The codecs live in submodules, one concern each: common (content types, errors), params
# (MapParams), request (query counts), result (the mapped AnnData). This module is their one
# public face: ``from atlas import wire; wire.decode_request(...)``.
from atlas.mapping.params import PREDICT_METHODS  # noqa: F401,E402
from atlas.names import MODALITIES  # noqa: F401,E402
from atlas.wire.common import (  # noqa: F401
    ARROW,
    CONTENT_TYPES,
    JSON,
    NPZ,
    REQUEST_FORMAT,
    RESPONSE_FORMAT,
    TooManyCells,
    UnsupportedMediaType,
    WireError,
    choose_response_type,
    media_type,
    parse_json,
)
from atlas.wire.params import MapParams, merge_params, params_from_query, parse_params  # noqa: F401
from atlas.wire.request import QueryPayload, decode_request, encode_request  # noqa: F401
from atlas.wire.result import (  # noqa: F401
    MapResult,
    concat_results,
    decode_result,
    encode_result,
    result_from_anndata,
    result_to_anndata,
    take_cells,
)
