"""The Python SDK of the mapping service: map an AnnData onto a served atlas.

::

    from atlas.client import AtlasClient

    client = AtlasClient("http://127.0.0.1:8000", token=token)
    client.info()["levels"]                      # what the atlas can label
    out = client.map(adata, levels=["cell_type_l1", "cell_type_l2"], predict=["protein"])
    out.obs["cell_type_l2_pred"], out.obs["cell_type_l2_confidence"], out.obs["cell_type_l2_unknown"]
    out.obsm["X_atlas"], out.obsm["protein_pred"]

The result is the same AnnData that the offline :func:`atlas.mapping.map_query` returns for
the same atlas (same values, same columns, the query's ``obs_names``). Large queries are sent in
chunks (``max_cells_per_request`` cells, fewer when a chunk's body would exceed the server's
size limit): memory stays bounded by one chunk, and a progress bar counts the cells.

What is sent is the query's **raw counts**, read exactly where the offline mapper reads them:
RNA from ``adata.layers["counts"]`` if present, else ``adata.X`` (gene ids = ``var_names``);
protein / ATAC from ``adata.obsm[m]`` or ``adata.obsm[f"{m}_counts"]`` as DataFrames whose
columns are the feature ids. Nothing else of the AnnData leaves your machine.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from atlas.errors import AtlasError
from atlas.wire import ARROW, MapParams, QueryPayload, WireError

#: Environment variable read when no token is given.
TOKEN_ENV = "ATLAS_TOKEN"
#: Statuses worth retrying: the service is restarting a replica or overloaded.
RETRY_STATUSES = (502, 503, 504)


class ServiceError(AtlasError):
    """The mapping service refused or failed a request; the message is the server's."""

    def __init__(self, message: str, status: int | None = None, request_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.request_id = request_id


class AuthenticationError(ServiceError):
    """The service needs a (valid) bearer token: pass ``token=`` or set ``$ATLAS_TOKEN``."""


class RequestRejected(ServiceError):
    """The service could not map the query as sent (4xx): the message says what to change."""


class ServiceUnavailableError(ServiceError):
    """The service stayed unreachable or unavailable through every retry."""


class AtlasClient:
    """A connection to an atlas mapping service (``atlas serve`` or a RayService).

    Args:
        url: The service's address, e.g. ``http://127.0.0.1:8000``.
        token: The bearer token (default: ``$ATLAS_TOKEN``; None for an open service).
        timeout: Seconds to wait for one request's answer.
        max_cells_per_request: Cells per request (the server's own limit applies too).
        retries: How many times a request is retried when the service is restarting a replica
            (503) or unreachable, waiting longer each time (``backoff_s`` · 2^attempt, or the
            server's ``Retry-After``).
        concurrency: Chunks of one query in flight at once (the service embeds concurrent
            requests in one batch); memory holds at most this many chunks' bodies.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 300.0,
                 max_cells_per_request: int = 2000, retries: int = 5, backoff_s: float = 1.0,
                 content_type: str = ARROW, verify_tls: bool = True, concurrency: int = 4):
        import httpx

        if max_cells_per_request < 1:
            raise ValueError("max_cells_per_request must be ≥ 1")
        if concurrency < 1:
            raise ValueError("concurrency must be ≥ 1")
        self.concurrency = concurrency
        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        headers = {"User-Agent": "atlas-client"}
        if token:
            headers["Authorization"] = f"Bearer {token.strip()}"
        self.max_cells_per_request = max_cells_per_request
        self.retries = retries
        self.backoff_s = backoff_s
        self.content_type = content_type
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, verify=verify_tls)
        self._info: dict[str, Any] | None = None
        #: Seconds per stage of each request of the last :meth:`map` (see :meth:`map`).
        self.timings: list[dict[str, float]] = []

    # -- plumbing ----------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AtlasClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send with retries on 502/503/504 and connection failures; raise on any other error."""
        import httpx

        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as e:
                if attempt >= self.retries:
                    raise ServiceUnavailableError(f"cannot reach the mapping service at {self.url}: {e}") from None
                self._sleep(attempt, None)
                attempt += 1
                continue
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                self._sleep(attempt, response.headers.get("retry-after"))
                attempt += 1
                continue
            if response.status_code >= 400:
                raise _error(response)
            return response

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        wait = self.backoff_s * 2**attempt
        if retry_after:
            with contextlib.suppress(ValueError):
                wait = max(wait, float(retry_after))
        time.sleep(min(wait, 60.0))

    # -- API ---------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``GET /healthz``: whether the service is up (no token needed)."""
        return self._request("GET", "/healthz").json()

    def info(self) -> dict[str, Any]:
        """What the atlas offers: ``atlas_version``, ``levels`` and ``labels`` per level,
        ``modalities`` (vocabulary sizes), ``predictable`` modalities, calibrated
        ``thresholds``, the shard ``layout``, default parameters and the request ``limits``."""
        self._info = self._request("GET", "/v1/atlas").json()
        return self._info

    def map(self, adata: Any, params: MapParams | Mapping[str, Any] | None = None, *, progress: bool = True,
            **options: Any) -> Any:
        """Map the query's cells onto the served atlas.

        Args:
            adata: The query AnnData with raw counts (see the module docstring for where).
            params: Mapping options (:class:`~atlas.mapping.params.MapParams`), or give them as
                keywords: ``levels`` (default: every level of the atlas), ``predict`` (e.g.
                ``["protein"]``; default: every modality the atlas can predict that the query
                lacks; ``[]`` for none), ``predict_method`` (``"knn"``, ``"decoder"`` for CVQVAE
                atlases, or ``"both"``), ``thresholds`` (``"calibrated"``, one number, a dict per
                level, or None), ``k_coarse``, ``k_fine``, ``return_neighbors``,
                ``min_fraction``, ``batch_key`` (obs column of the query's batches) or
                ``batch`` (one name for the whole query), ``domain_statistics`` and
                ``min_domain_cells``.
            progress: Show a progress bar.

        Each query batch (``obs[batch_key]``, or ``batch``) of at least
        ``min_domain_cells`` cells is sent in requests of its own, as large as the service allows,
        so that it is normalised by its own statistics exactly as offline; a batch larger than one
        request is normalised per request (``uns["atlas"]["query_domains"]`` says so: ``requests``).

        After the call, :attr:`timings` holds one dict per request: the client's ``encode``,
        ``request`` (round trip) and ``decode`` seconds, and the server's stages from its
        ``Server-Timing`` header prefixed ``server.`` (``server.embed``, ``server.labels``,
        ``server.total``…), to trace a slow query to its stage.

        Returns:
            An AnnData with the query's ``obs_names``: ``obs[f"{level}_pred"]``,
            ``obs[f"{level}_confidence"]``, ``obs[f"{level}_unknown"]``, ``obsm["X_atlas"]``,
            ``obsm[f"{m}_pred"]`` per predicted modality and ``uns["atlas"]`` — exactly what
            :func:`atlas.mapping.map_query` returns.
        """
        import numpy as np

        from atlas.mapping.align import MappingError, query_modalities
        from atlas.mapping.domains import batch_labels, domains_report
        from atlas.wire import concat_results, result_to_anndata, take_cells

        params = MapParams.parse(params, **options)
        self.timings = []
        n = adata.n_obs
        if n == 0:
            raise MappingError("the query has no cells")
        modalities = query_modalities(adata[:0])
        if not modalities:
            raise MappingError("the query holds no counts: put RNA counts in adata.X (or layers['counts']) or "
                               "other modalities in adata.obsm as DataFrames (e.g. obsm['protein'])")
        info = self._info if self._info is not None else self.info()
        limits = info.get("limits") or {}
        server_cells = int(limits.get("max_cells_per_request") or n)
        max_bytes = int(limits.get("max_request_bytes") or 0) or None

        # Requests: (query rows, batch name or None, parameters sent, cells per request). A batch
        # with its own statistics goes whole (as far as the service allows), named by `batch`;
        # the other cells share requests and the reference's statistics.
        batches = batch_labels(adata, params.batch_key, params.batch)
        names, codes = np.unique((batches if batches is not None else np.array([], dtype=object)).astype(str),
                                 return_inverse=True)
        counts = np.bincount(codes, minlength=len(names))
        own = (counts >= params.min_domain_cells) & (params.domain_statistics != "reference")
        groups: list[tuple[np.ndarray, str | None, MapParams, int]] = []
        for b in np.flatnonzero(own):
            groups.append((np.flatnonzero(codes == b), str(names[b]),
                           params.model_copy(update={"batch_key": None, "batch": str(names[b])}), server_cells))
        rest = np.arange(n) if batches is None else np.flatnonzero(~own[codes])
        if len(rest):
            groups.append((rest, None, params.model_copy(update={"batch_key": None, "batch": None}),
                           min(self.max_cells_per_request, server_cells)))
        jobs = [(rows[a : a + size], name, p.to_request()) for rows, name, p, size in groups
                for a in range(0, len(rows), size)]

        with _progress(progress, n) as advance:
            def run(job: tuple[np.ndarray, str | None, dict[str, Any]]) -> list[Any]:
                rows, _, sent_params = job
                return self._map_range(adata[rows], 0, len(rows), modalities, sent_params, max_bytes, advance)

            if self.concurrency == 1 or len(jobs) == 1:
                chunks = [run(job) for job in jobs]
            else:
                from concurrent.futures import ThreadPoolExecutor

                # Each thread slices and encodes its own chunk: only `concurrency` bodies exist at once.
                with ThreadPoolExecutor(min(self.concurrency, len(jobs)), thread_name_prefix="atlas-map") as pool:
                    chunks = list(pool.map(run, jobs))
        result = concat_results([part for chunk in chunks for part in chunk])
        rows = np.concatenate([job[0] for job in jobs])
        result = take_cells(result, np.argsort(rows, kind="stable"))
        report = domains_report(params.domain_statistics, params.batch_key, params.batch, params.min_domain_cells)
        for i, name in enumerate(names):
            parts = [c for job, c in zip(jobs, chunks) if job[1] == name]
            entry: dict[str, Any] = {"cells": int(counts[i]), "own_statistics": bool(parts) and all(
                p.uns["atlas"]["query_domains"]["batches"].get(str(name), {}).get("own_statistics", False)
                for chunk in parts for p in chunk)}
            if sum(len(c) for c in parts) > 1:
                entry["requests"] = sum(len(c) for c in parts)
            entry.update(_merged_choice([p.uns["atlas"].get("query_domains", {}) for chunk in parts for p in chunk],
                                        str(name)))
            report["batches"][str(name)] = entry
        for chunk in chunks:  # domain_statistics="auto": the rule and any fallback, as the service reported them
            for part in chunk:
                served = part.uns.get("atlas", {}).get("query_domains", {})
                report.update({k: served[k] for k in ("min_overlap", "auto") if k in served})
        result.uns.setdefault("atlas", {})["query_domains"] = report
        return result_to_anndata(result, obs_names=adata.obs_names)

    def _map_range(self, adata: Any, start: int, stop: int, modalities: list[str], params: dict[str, Any],
                   max_bytes: int | None, advance: Any) -> list[Any]:
        """Results of cells ``start:stop``; halves the range while its body is too large."""
        from atlas.mapping.align import MappingError, query_matrix
        from atlas.timing import StageClock, parse_server_timing
        from atlas.wire import decode_result, encode_request

        clock = StageClock()
        started = time.perf_counter()
        chunk = adata[start:stop]
        payload = QueryPayload([str(c) for c in chunk.obs_names], {}, params)
        for m in modalities:
            found = query_matrix(chunk, m)
            if found is None:  # impossible: `modalities` are those query_modalities found
                raise MappingError(f"the query holds no {m} counts")
            counts, features = found
            payload.modalities[m] = (features, counts)
        body = encode_request(payload, self.content_type)
        clock.add("encode", time.perf_counter() - started)
        del payload, chunk
        too_large = max_bytes is not None and len(body) > max_bytes
        if not too_large:
            try:
                with clock("request"):
                    response = self._request("POST", "/v1/map", content=body,
                                             headers={"Content-Type": self.content_type, "Accept": self.content_type})
            except RequestRejected as e:
                if e.status != 413 or stop - start == 1:
                    raise
                too_large = True  # the server's limits are lower than it said: split further
            else:
                del body
                with clock("decode"):
                    result = decode_result(response.content, response.headers.get("content-type", self.content_type))
                if result.n_cells != stop - start:
                    raise WireError(f"the service answered {result.n_cells} cells for {stop - start}")
                served = parse_server_timing(response.headers.get("server-timing"))
                self.timings.append({**clock.seconds, **{f"server.{k}": v for k, v in served.items()}})
                advance(stop - start)
                return [result]
        if stop - start == 1:
            raise RequestRejected(f"one cell's counts take {len(body)} bytes, more than the service accepts "
                                  f"({max_bytes} bytes per request)", 413)
        middle = (start + stop) // 2
        return (self._map_range(adata, start, middle, modalities, params, max_bytes, advance)
                + self._map_range(adata, middle, stop, modalities, params, max_bytes, advance))


def _error(response: Any) -> ServiceError:
    """The exception for an error response, with the server's message."""
    try:
        doc = response.json()
        message = doc.get("detail") if isinstance(doc, dict) else None
        request_id = doc.get("request_id") if isinstance(doc, dict) else None
    except ValueError:
        message, request_id = None, None
    if not isinstance(message, str):
        message = (response.text or response.reason_phrase or "").strip()[:500]
    status = response.status_code
    text = f"{message} (HTTP {status})"
    if status == 401 or status == 403:
        return AuthenticationError(f"{text}; pass AtlasClient(url, token=...) or set ${TOKEN_ENV}", status, request_id)
    if 400 <= status < 500:
        return RequestRejected(text, status, request_id)
    if status in RETRY_STATUSES:
        return ServiceUnavailableError(text, status, request_id)
    return ServiceError(text + (f" [request id {request_id}]" if request_id else ""), status, request_id)


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Any]:
    """``advance(n_cells)`` for a rich progress bar on stderr (a no-op when disabled)."""
    if not enabled:
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]mapping"), BarColumn(), MofNCompleteColumn(), TextColumn("cells"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("map", total=total)
        yield lambda n: bar.advance(task, n)


def _merged_choice(reports: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """What ``domain_statistics="auto"`` chose for batch ``name`` over the requests that carried it:
    one value when they agree (always, for a batch sent whole), else the list per request."""
    merged: dict[str, Any] = {}
    for key in ("layers", "composition_overlap", "composition_level"):
        values = [r["batches"][name][key] for r in reports if key in r.get("batches", {}).get(name, {})]
        if values:
            merged[key] = values[0] if all(v == values[0] for v in values) else values
    return merged
