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
from collections.abc import Iterator, Mapping, Sequence
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

    def map(
        self,
        adata: Any,
        levels: Sequence[str] | None = None,
        predict: Sequence[str] | None = None,
        *,
        predict_method: str = "knn",
        thresholds: str | float | Mapping[str, float] | None = "calibrated",
        k_coarse: int = 25,
        k_fine: int = 5,
        return_neighbors: bool = False,
        min_fraction: float = 0.5,
        progress: bool = True,
    ) -> Any:
        """Map the query's cells onto the served atlas.

        Args:
            adata: The query AnnData with raw counts (see the module docstring for where).
            levels: Label levels to predict (default: every level of the atlas).
            predict: Modalities to predict, e.g. ``["protein"]`` (default: every one the atlas
                can predict that the query lacks; ``[]`` for none).
            predict_method: ``"knn"`` (mean of the nearest reference cells), ``"decoder"``
                (CVQVAE atlases) or ``"both"``.
            thresholds: Minimum confidence below which a cell is ``"unknown"``:
                ``"calibrated"`` (the atlas's own), one number, a dict per level, or None.
            k_coarse, k_fine: Neighbours in the coarse index and in a fine shard.
            return_neighbors: Also return each cell's coarse neighbours.
            min_fraction: Least fraction of the atlas's features the query must have.
            progress: Show a progress bar.

        Returns:
            An AnnData with the query's ``obs_names``: ``obs[f"{level}_pred"]``,
            ``obs[f"{level}_confidence"]``, ``obs[f"{level}_unknown"]``, ``obsm["X_atlas"]``,
            ``obsm[f"{m}_pred"]`` per predicted modality and ``uns["atlas"]`` — exactly what
            :func:`atlas.mapping.map_query` returns.
        """
        from atlas.mapping.align import MappingError, query_modalities
        from atlas.wire import concat_results, parse_params, result_to_anndata

        params = parse_params(MapParams(
            levels=None if levels is None else list(levels), predict=None if predict is None else list(predict),
            predict_method=predict_method, thresholds=dict(thresholds) if isinstance(thresholds, Mapping) else thresholds,
            k_coarse=k_coarse, k_fine=k_fine, return_neighbors=return_neighbors, min_fraction=min_fraction,
        ).to_json()).to_json()
        n = adata.n_obs
        if n == 0:
            raise MappingError("the query has no cells")
        modalities = query_modalities(adata[:0])
        if not modalities:
            raise MappingError("the query holds no counts: put RNA counts in adata.X (or layers['counts']) or "
                               "other modalities in adata.obsm as DataFrames (e.g. obsm['protein'])")
        info = self._info if self._info is not None else self.info()
        limits = info.get("limits") or {}
        per_request = min(self.max_cells_per_request, int(limits.get("max_cells_per_request") or n))
        max_bytes = int(limits.get("max_request_bytes") or 0) or None

        ranges = [(start, min(start + per_request, n)) for start in range(0, n, per_request)]
        with _progress(progress, n) as advance:
            if self.concurrency == 1 or len(ranges) == 1:
                chunks = [self._map_range(adata, a, b, modalities, params, max_bytes, advance) for a, b in ranges]
            else:
                from concurrent.futures import ThreadPoolExecutor

                # Each thread slices and encodes its own chunk: only `concurrency` bodies exist at once.
                with ThreadPoolExecutor(min(self.concurrency, len(ranges)), thread_name_prefix="atlas-map") as pool:
                    chunks = list(pool.map(
                        lambda r: self._map_range(adata, r[0], r[1], modalities, params, max_bytes, advance), ranges))
        parts = [part for chunk in chunks for part in chunk]
        return result_to_anndata(concat_results(parts), obs_names=adata.obs_names)

    def _map_range(self, adata: Any, start: int, stop: int, modalities: list[str], params: dict[str, Any],
                   max_bytes: int | None, advance: Any) -> list[Any]:
        """Results of cells ``start:stop``; halves the range while its body is too large."""
        from atlas.mapping.align import query_matrix
        from atlas.wire import decode_result, encode_request

        chunk = adata[start:stop]
        payload = QueryPayload([str(c) for c in chunk.obs_names], {}, params)
        for m in modalities:
            counts, features = query_matrix(chunk, m)
            payload.modalities[m] = (features, counts)
        body = encode_request(payload, self.content_type)
        del payload, chunk
        too_large = max_bytes is not None and len(body) > max_bytes
        if not too_large:
            try:
                response = self._request("POST", "/v1/map", content=body,
                                         headers={"Content-Type": self.content_type, "Accept": self.content_type})
            except RequestRejected as e:
                if e.status != 413 or stop - start == 1:
                    raise
                too_large = True  # the server's limits are lower than it said: split further
            else:
                del body
                result = decode_result(response.content, response.headers.get("content-type", self.content_type))
                if result.n_cells != stop - start:
                    raise WireError(f"the service answered {result.n_cells} cells for {stop - start}")
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
