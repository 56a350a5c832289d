"""The HTTP face of the mapping service: a FastAPI app behind a Serve ingress deployment.

Routes: ``POST /v1/map`` (map query cells), ``GET /v1/atlas`` (what the atlas offers),
``GET /healthz`` (open), ``/docs`` (OpenAPI). Everything except ``/healthz`` and the docs
needs ``Authorization: Bearer <token>``.

Status codes: 400 malformed body or parameter; 401 missing/wrong token (with
``WWW-Authenticate``); 413 body or cell count above the limits (the message says the limit and
how to split); 415 unknown content type; 422 a well-formed query that cannot be mapped (the
:class:`~atlas.mapping.MappingError` message: unknown genes, non-integer counts, another
species, unknown level…); 503 + ``Retry-After`` while a replica restarts; 500 only for a bug,
with a request id and no traceback (the traceback goes to the replica's log).

No ``from __future__ import annotations`` here: FastAPI reads the route annotations at runtime
(with string annotations a body or query parameter silently changes meaning).
"""

import asyncio
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Optional

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve

from atlas import __version__
from atlas.mapping.params import help_texts
from atlas.wire import ARROW, CONTENT_TYPES, JSON, NPZ, MapParams

log = logging.getLogger("ray.serve")

_DESCRIPTION = """Map single-cell query cells onto a reference atlas: cell-type labels per level
with confidences and unknown flags, the atlas embedding, and predicted modalities (e.g. surface
proteins from RNA). Send **raw counts**; the Python SDK (`atlas.client.AtlasClient`) does it for an
AnnData, in chunks. Authenticate with `Authorization: Bearer <token>`. Wire format: `atlas.wire`."""

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "Raw counts of the query cells per modality, with feature and cell ids "
                       "(see atlas.wire). Parameters may also go in the body's params.",
        "content": {
            ARROW: {"schema": {"type": "string", "format": "binary"}},
            NPZ: {"schema": {"type": "string", "format": "binary"}},
            JSON: {"schema": {"type": "object"}, "example": {
                "cells": ["cell_1", "cell_2"], "features": ["CD3E", "MS4A1", "LYZ"],
                "counts": [[3, 0, 1], [0, 5, 0]], "params": {"levels": ["cell_type_l1"], "predict": ["protein"]}}},
        },
    },
    "responses": {"200": {"description": "The mapping result in the request's format (or per Accept)",
                          "content": {ARROW: {}, NPZ: {}, JSON: {}}}},
    "parameters": [{"name": name, "in": "query", "required": False, "schema": {"type": "string"},
                    "description": f"{text} (default: {MapParams.model_fields[name].default!r})"}
                   for name, text in help_texts().items()],
}


class Problem(Exception):
    """An HTTP error answered as ``{"detail": message, "request_id": ...}``."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _problem_response(request: Request, status: int, message: str, headers: Optional[Dict[str, str]] = None):
    rid = getattr(request.state, "request_id", None)
    return JSONResponse({"detail": message, "request_id": rid}, status_code=status, headers=headers or {})


#: Largest JSON body (JSON is for a few cells; Arrow and npz take up to max_request_bytes).
JSON_MAX_BYTES = 8 << 20


def too_large_message(size: Optional[int], limit: int, hint: str = "") -> str:
    what = f"{size} bytes" if size is not None else "more than that"
    return (f"request body too large: {what}; this server accepts at most {limit} bytes per request{hint} "
            "(max_request_bytes). Split the query into smaller requests, or use atlas.client.AtlasClient, "
            "which sends large queries in chunks")


async def read_body(request: Request, limit: int, hint: str = "") -> bytes:
    """The body, refused (413) from its Content-Length before reading, and again while reading."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise Problem(400, f"invalid Content-Length {declared!r}") from None
        if size > limit:
            raise Problem(413, too_large_message(size, limit, hint))
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:  # a chunked upload, or a Content-Length that lied
            raise Problem(413, too_large_message(None, limit, hint))
        chunks.append(chunk)
    return b"".join(chunks)


def install_error_handling(app: FastAPI) -> None:
    """Request ids, :class:`Problem` answers, and the catch-all: an unexpected exception is
    logged with its traceback and answered with a short 500 that names the request id."""

    @app.middleware("http")
    async def request_id_and_catch_all(request: Request, call_next):
        # Serve's proxy gives every request an id (X-Request-ID, also in the replica's log lines)
        # and returns it in the response; use the same one, so a user's report finds the log.
        given = request.headers.get("x-request-id")
        safe = given is not None and 0 < len(given) <= 64 and all(c.isalnum() or c in "-_." for c in given)
        request.state.request_id = given if safe else uuid.uuid4().hex
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - the last line of defence: no traceback leaves the server
            log.exception("request %s %s %s failed", request.state.request_id, request.method, request.url.path)
            response = _problem_response(
                request, 500, f"internal error (request id {request.state.request_id}); the service log has details")
        if given is None:  # not behind Serve's proxy (which adds the header itself)
            response.headers["X-Request-ID"] = request.state.request_id
        return response

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return _problem_response(request, exc.status, exc.message, exc.headers)

    # The library's errors, each with its status (the most specific class wins: a TooManyCells
    # is a WireError). The message is the library's own: it says what to change.
    from atlas.errors import MappingError
    from atlas.service.remote import ServiceUnavailable
    from atlas.wire import TooManyCells, UnsupportedMediaType, WireError

    def answer(status: int):
        async def handler(request: Request, exc: Exception):
            return _problem_response(request, status, str(exc))
        return handler

    for error, status in ((TooManyCells, 413), (UnsupportedMediaType, 415), (WireError, 400), (MappingError, 422)):
        app.add_exception_handler(error, answer(status))

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(request: Request, exc: ServiceUnavailable):
        return _problem_response(request, 503, str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = ["/".join(str(x) for x in e.get("loc", ())) + ": " + str(e.get("msg")) for e in exc.errors()]
        return _problem_response(request, 400, "invalid request: " + "; ".join(parts))


def _describe(handle: Any, shard: str) -> Callable[[], Any]:
    """A sender of a shard deployment's ``describe`` call (for :func:`~atlas.service.remote.gather`)."""
    return lambda: handle.describe.remote(shard)


def make_ingress():
    """The ingress deployment class (built here: the FastAPI app must not be a module global)."""
    app = FastAPI(title="atlas mapping service", version=__version__, description=_DESCRIPTION,
                  docs_url="/docs", openapi_url="/openapi.json", redoc_url=None)
    install_error_handling(app)

    @serve.deployment(name="ingress")
    @serve.ingress(app)
    class Ingress:
        """Authenticates, enforces the limits, decodes, maps (encoder + shard deployments), encodes."""

        def __init__(self, artifact: str, encoder: Any, shards: Dict[str, Any], args: Any, threads: int):
            from atlas.artifact import load_atlas
            from atlas.service.auth import load_tokens
            from atlas.service.remote import RetryPolicy, ServeSearcher

            # Lazy: hashes the vocabularies and the layout now, the idf files when first used;
            # the ingress reads no shard and no weights.
            self.atlas = load_atlas(artifact, verify="lazy")
            # args: the validated atlas.service.config.ServiceArgs (its defaults are the only ones)
            self.tokens = load_tokens(args.token_file, args.token_env, allow_anonymous=args.allow_anonymous)
            self.max_bytes = args.max_request_bytes
            self.max_cells = args.max_cells_per_request
            self.policy = RetryPolicy(retries=args.retries, timeout_s=args.call_timeout_s,
                                      retry_after_s=args.retry_after_s)
            self.encoder = encoder
            self.shards = dict(shards)
            self.searcher = ServeSearcher(self.shards, self.policy)
            self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="map")
            self._pipeline: Any = None  # a MappingPipeline once built
            self._lock = threading.Lock()
            threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()
            log.info("ingress for atlas %s (%d shards, auth %s)", self.atlas.version, len(self.shards),
                     "off" if self.tokens is None else "on")

        def _warm_up(self) -> None:
            """Build the pipeline and make a first call on every handle, in the background: a
            handle's first call (its router finding the replicas) and the shard descriptions took
            ~4 s of the first request. A request that comes sooner waits for the pipeline's lock."""
            from atlas.service.remote import call, gather

            try:
                self._pipeline_sync()
                rest = [n for n in self.shards if n not in self._layout().root.shards]
                gather(f"index shard(s) {rest}", [_describe(self.shards[n], n) for n in rest], self.policy)
                call("the encoder", lambda: self.encoder.ready.remote(), self.policy)
            except Exception:  # noqa: BLE001 - a request will meet (and report) the same failure
                log.warning("warm-up of the ingress failed; the first request will retry", exc_info=True)

        # -- helpers ------------------------------------------------------------------------
        def _layout(self) -> Any:
            """The atlas's shard layout; MappingError for an atlas without index shards."""
            from atlas.errors import MappingError

            if self.atlas.layout is None:
                raise MappingError(f"atlas {self.atlas.version} has no index shards; rebuild it with index levels")
            return self.atlas.layout

        def _authorize(self, request: Request) -> None:
            from atlas.service.auth import check_authorization

            problem = check_authorization(request.headers.get("authorization"), self.tokens)
            if problem is not None:
                error = "invalid_request" if "missing" in problem else "invalid_token"
                raise Problem(401, problem, {"WWW-Authenticate": f'Bearer realm="atlas", error="{error}"'})

        def _pipeline_sync(self) -> Any:
            """The mapping pipeline, built on first use from the root shards' descriptions."""
            from atlas.service.pipeline import MappingPipeline, root_info
            from atlas.service.remote import gather

            with self._lock:
                if self._pipeline is None:
                    names = list(self._layout().root.shards)
                    descriptions = gather(f"index shard(s) {names}", [_describe(self.shards[n], n) for n in names],
                                          self.policy)
                    self._pipeline = MappingPipeline(self.atlas, root_info(descriptions))
                return self._pipeline

        async def _run(self, fn, *args):
            # Off the event loop; errors become HTTP answers in the app's exception handlers.
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

        def _embed(self, aligned, decode, domains, clock):
            from atlas.service.remote import call

            emb, decoded, used, seconds = call(
                "the encoder", lambda: self.encoder.embed.remote((aligned, dict(decode), domains)), self.policy)
            clock.add("encoder", seconds)  # the model's share of the request's "embed"
            return emb, decoded, used

        def _map_sync(self, body: bytes, content_type: str, query: Dict[str, Any], out_type: str,
                      clock: Any) -> bytes:
            from atlas.wire import decode_request, encode_result, merge_params, result_from_anndata

            with clock("decode"):
                payload = decode_request(body, content_type, max_cells=self.max_cells,
                                         max_decoded_bytes=4 * self.max_bytes)
                params = merge_params(payload.params, query)
                adata = payload.to_anndata()
            pipeline = self._pipeline_sync()
            embed = functools.partial(self._embed, clock=clock)
            result = pipeline.map(adata, pd.Index(payload.cells), params, embed, self.searcher, clock)
            with clock("encode"):
                return encode_result(result_from_anndata(result, payload.cells), out_type)

        def _info_sync(self) -> Dict[str, Any]:
            from atlas.mapping.query import model_modalities

            pipeline = self._pipeline_sync()
            manifest = self.atlas.manifest
            layout = self._layout()
            calibrated = (manifest.get("mapping") or {}).get("thresholds") or {}
            return {
                "atlas_version": self.atlas.version,
                "created_at": manifest.get("created_at"),
                "species": manifest.get("species"),
                "model": {"kind": manifest["model"].get("kind"), "modalities": model_modalities(manifest)},
                "modalities": {m: {"n_features": len(v)} for m, v in self.atlas.vocabulary.items()},
                "levels": list(pipeline.levels),
                "labels": {lv: pipeline.root.labels.get(lv, []) for lv in pipeline.levels},
                "predictable": pipeline.predictable(),
                "thresholds": {"calibrated": calibrated},
                "layout": {"mode": layout.mode, "levels": list(layout.levels), "n_reference_cells": pipeline.root.n_cells,
                           "nodes": [{"name": n.name, "level": n.level, "group": list(n.group), "n_cells": n.n_cells,
                                      "shards": list(n.shards)} for n in layout.nodes]},
                "defaults": MapParams().to_json(),
                "limits": {"max_request_bytes": self.max_bytes, "max_cells_per_request": self.max_cells,
                           "max_json_request_bytes": min(self.max_bytes, JSON_MAX_BYTES)},
                "content_types": list(CONTENT_TYPES),
            }

        # -- routes -------------------------------------------------------------------------
        @app.get("/healthz", summary="Liveness (no token needed)")
        async def healthz(self) -> Dict[str, Any]:
            return {"status": "ok", "atlas_version": self.atlas.version}

        @app.get("/v1/atlas", summary="What this atlas offers: levels, labels, modalities, thresholds, limits")
        async def info(self, request: Request) -> Dict[str, Any]:
            self._authorize(request)
            return await self._run(self._info_sync)

        @app.post("/v1/map", summary="Map query cells onto the atlas", openapi_extra=_BODY_DOC,
                  response_class=Response)
        async def map_cells(self, request: Request) -> Response:
            # The mapping parameters (atlas.mapping.params.MapParams) are read from the query
            # string by the one text parser every CLI uses, and documented from the same model.
            from atlas.timing import StageClock
            from atlas.wire import choose_response_type, media_type, params_from_query

            clock = StageClock()
            started = time.perf_counter()
            self._authorize(request)
            content_type = media_type(request.headers.get("content-type"))
            if content_type not in CONTENT_TYPES:
                raise Problem(415, f"unsupported content type {content_type or '(none)'!r}; send one of "
                                   f"{list(CONTENT_TYPES)} (see atlas.wire)")
            # JSON is for a few cells: parsed into Python objects it takes ~20x its size.
            limit = min(self.max_bytes, JSON_MAX_BYTES) if content_type == JSON else self.max_bytes
            with clock("receive"):
                body = await read_body(request, limit, hint="" if limit == self.max_bytes else
                                       f" (JSON bodies; send {ARROW} or {NPZ} for more cells)")
            query = await self._run(params_from_query, list(request.query_params.multi_items()))
            out_type = choose_response_type(content_type, request.headers.get("accept"))
            content = await self._run(self._map_sync, body, content_type, query, out_type, clock)
            clock.add("total", time.perf_counter() - started)
            # Seconds per stage, for the client (AtlasClient.timings) and browsers' developer tools.
            return Response(content, media_type=out_type, headers={"Server-Timing": clock.header()})

    return Ingress
