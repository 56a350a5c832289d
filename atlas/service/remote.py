"""Calls from the ingress to the encoder and shard deployments, with retries.

A replica that dies (a crashed process, a lost node) is replaced by Serve; a call that was in
flight fails with a Ray actor error, and calls made before the replacement is up wait in the
handle's queue. :func:`call` therefore retries such failures a few times with backoff; when
they persist it raises :class:`ServiceUnavailable`, which the ingress answers with 503 and
``Retry-After``. Errors raised by the deployment's own code (a bug, a user error) are not
retried.

These functions block: the ingress runs them in a worker thread (``DeploymentResponse.result``
must not be awaited on the replica's event loop).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from atlas.mapping.search import Hits, SearchRequest, merge_hits

log = logging.getLogger("ray.serve")


class ServiceUnavailable(Exception):
    """A deployment stayed unreachable through the retries (answered with 503 + Retry-After)."""

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _transient_types() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex
    from ray.serve import exceptions as sex

    types: list[type[BaseException]] = [rex.RayActorError, rex.ObjectLostError]
    for name in ("ActorUnavailableError", "OwnerDiedError", "NodeDiedError", "WorkerCrashedError"):
        if hasattr(rex, name):
            types.append(getattr(rex, name))
    for name in ("BackPressureError", "DeploymentUnavailableError", "ReplicaUnavailableError"):
        if hasattr(sex, name):
            types.append(getattr(sex, name))
    return tuple(types)


def is_transient(error: BaseException) -> bool:
    """A failure of the replica (died, restarting, overloaded), not of the code it ran."""
    import ray.exceptions as rex

    transient = _transient_types()
    if isinstance(error, transient):
        return True
    if isinstance(error, rex.RayTaskError):  # the task failed because an actor it used died
        return isinstance(getattr(error, "cause", None), transient)
    return False


class RetryPolicy:
    """How :func:`call` retries: ``retries`` more attempts, waiting ``backoff_s · 2^i`` between."""

    def __init__(self, retries: int = 3, backoff_s: float = 0.5, timeout_s: float = 120.0, retry_after_s: int = 5):
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s


def call(what: str, send: Callable[[], Any], policy: RetryPolicy) -> Any:
    """``send()`` returns a ``DeploymentResponse``; wait for its result, retrying replica failures."""
    return gather(what, [send], policy)[0]


def gather(what: str, senders: Sequence[Callable[[], Any]], policy: RetryPolicy) -> list[Any]:
    """Send every call first (they run in parallel), then collect them; a call whose replica
    failed is re-sent alone, up to ``policy.retries`` times."""
    responses = [send() for send in senders]
    results: list[Any] = [None] * len(senders)
    for i, send in enumerate(senders):
        attempt = 0
        while True:
            try:
                results[i] = responses[i].result(timeout_s=policy.timeout_s)
                break
            except TimeoutError:
                raise ServiceUnavailable(f"{what} did not answer within {policy.timeout_s:.0f} s; try again later",
                                         policy.retry_after_s) from None
            except Exception as e:  # noqa: BLE001 - classified below
                if not is_transient(e):
                    raise
                if attempt >= policy.retries:
                    log.warning("%s still unavailable after %d retries: %r", what, attempt, e)
                    raise ServiceUnavailable(
                        f"{what} is unavailable (a replica is restarting); retry in {policy.retry_after_s} s",
                        policy.retry_after_s) from None
                log.warning("%s failed (%s); retry %d of %d", what, type(e).__name__, attempt + 1, policy.retries)
                time.sleep(policy.backoff_s * 2**attempt)
                attempt += 1
                responses[i] = send()
    return results


class ServeSearcher:
    """A :class:`~atlas.mapping.search.Searcher` whose shards are Serve deployments.

    ``handles``: shard name → the handle of the deployment serving it (several names may share
    one packed deployment; every call names its shard). Its methods ``search`` and
    ``profile_sums`` run :func:`~atlas.mapping.search.search_shard` and
    :func:`~atlas.mapping.search.shard_profile_sums` on that shard.
    """

    def __init__(self, handles: Mapping[str, Any], policy: RetryPolicy):
        self.handles = dict(handles)
        self.policy = policy

    def _handle(self, name: str) -> Any:
        try:
            return self.handles[name]
        except KeyError:
            raise KeyError(f"no deployment serves shard {name!r}") from None

    def search(self, shard_names: Sequence[str], queries: np.ndarray, k: int,
               exclude: np.ndarray | None = None, space: str = "embedding") -> Hits:
        return self.search_many([SearchRequest(shard_names, queries, k, exclude, space)])[0]

    def search_many(self, requests: Sequence[SearchRequest]) -> list[Hits]:
        """Several searches sent at once (e.g. every fine node a request's cells were routed to):
        one round trip of waiting instead of one per node."""
        senders: list[Callable[[], Any]] = []
        spans: list[tuple[int, int]] = []
        for r in requests:
            queries = np.ascontiguousarray(r.queries, dtype=np.float32)
            spans.append((len(senders), len(r.shard_names)))
            senders += [self._search_sender(name, queries, r) for name in r.shard_names]
        names = list(dict.fromkeys(name for r in requests for name in r.shard_names))
        parts = gather(f"index shard(s) {names}", senders, self.policy)
        return [merge_hits(parts[start:start + n], r.k) for (start, n), r in zip(spans, requests)]

    def _search_sender(self, name: str, queries: np.ndarray, request: SearchRequest) -> Callable[[], Any]:
        handle = self._handle(name)
        return lambda: handle.search.remote(queries, request.k, request.exclude, request.space, name)

    def profile_sums(self, shard_name: str, modality: str, positions: np.ndarray,
                     weights: np.ndarray | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
        handle = self._handle(shard_name)
        return call(f"index shard {shard_name}",
                    lambda: handle.profile_sums.remote(modality, positions, weights, shard_name), self.policy)
