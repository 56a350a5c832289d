"""The encoder and index-shard deployments of the mapping service.

Each loads what it serves once, in ``__init__``, from the artifact opened with
``verify="lazy"``: the files it reads (the model weights, or its one shard) are hashed against
the manifest right before they are loaded, so a replica never serves a changed or half-copied
file, and a shard replica never reads the other shards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp
from ray import serve

log = logging.getLogger("ray.serve")


@serve.deployment(name="encoder")
class Encoder:
    """The frozen model: embeds the prepared cells of several requests at once (``@serve.batch``).

    Requests that arrive together are concatenated into one matrix per modality, embedded by
    :func:`~atlas.mapping.query.embed_prepared` ``batch_cells`` cells per forward pass, and split
    back. Runs on the GPU when the replica has one.
    """

    def __init__(self, artifact: str, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
                 batch_cells: int = 1024, device: str = "auto"):
        import torch

        from atlas.artifact import load_atlas
        from atlas.mapping.embedding import max_features_of

        self.atlas = load_atlas(artifact, verify="lazy")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model = self.atlas.model(device)  # hashes the weights first
        self.label_heads = self.atlas.heads()  # what "auto" estimates each batch's mix with (None: unlabelled)
        self.max_features = max_features_of(self.atlas.manifest)
        self.batch_cells = batch_cells
        self.embed.set_max_batch_size(max_batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._warm_up()
        log.info("encoder for atlas %s on %s", self.atlas.version, device)

    def _warm_up(self) -> None:
        """One tiny forward pass before the replica counts as started: torch's first call (thread
        pools, kernels, ~1 s on CPU) is paid here instead of by the first request."""
        from atlas.mapping.query import embed_prepared, model_modalities

        cell = {}
        for m in model_modalities(self.atlas.manifest):
            k = min(16, len(self.atlas.vocabulary[m]))
            cell[m] = sp.csr_matrix((np.ones(k, np.float32), (np.zeros(k, int), np.arange(k))),
                                    shape=(1, len(self.atlas.vocabulary[m])))
        try:
            embed_prepared(cell, self.model, max_features=self.max_features, batch_size=1, device=self.device)
        except Exception:  # noqa: BLE001 - a warm-up must not keep the replica from starting
            log.warning("warm-up forward pass of the encoder failed; the first request will pay for it",
                        exc_info=True)

    def ready(self) -> str:
        """The device it embeds on (a cheap call: the ingress warms its handle with it)."""
        return self.device

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def embed(self, items: list[tuple[Mapping[str, sp.csr_matrix], Mapping[str, str], Any]]
                    ) -> list[tuple[np.ndarray, dict[str, np.ndarray], Any, float]]:
        """Per item ``(aligned CSR per modality, {target: source} to decode, QueryDomains or None)``
        → ``(embedding, decoded, QueryDomains used, seconds)``: ``"auto"`` comes back resolved per
        batch (:func:`~atlas.mapping.embedding.embed_auto`); ``seconds`` is the model time of the
        batch that held it (the rest of the caller's wait is queueing and transfer)."""
        # Off the event loop: the replica keeps answering health checks while the model runs.
        start = time.perf_counter()
        out = await asyncio.to_thread(self._embed_many, items)
        seconds = time.perf_counter() - start
        return [(emb, decoded, used, seconds) for emb, decoded, used in out]

    def _embed_many(self, items: list[tuple[Mapping[str, sp.csr_matrix], Mapping[str, str], Any]]
                    ) -> list[tuple[np.ndarray, dict[str, np.ndarray], Any]]:
        # Requests that adapt different layers (or choose them by another overlap) are embedded
        # apart; the others together, each request's query domains kept its own (codes offset
        # past the previous request's).
        layers = {(d.layers, d.min_overlap) for _, _, d in items if d is not None}
        if len(layers) > 1:
            return [out for item in items for out in self._embed_together([item])]
        return self._embed_together(items)

    def _embed_together(self, items: list[tuple[Mapping[str, sp.csr_matrix], Mapping[str, str], Any]]
                        ) -> list[tuple[np.ndarray, dict[str, np.ndarray], Any]]:
        from atlas.mapping.domains import QueryDomains
        from atlas.mapping.embedding import embed_resolving
        from atlas.mapping.query import embed_prepared

        sizes = [next(iter(aligned.values())).shape[0] for aligned, _, _ in items]
        modalities = list(items[0][0])
        stacked = {m: sp.vstack([aligned[m] for aligned, _, _ in items], format="csr") for m in modalities}
        decode: dict[str, str] = {}
        for _, wanted, _ in items:
            decode.update(wanted)
        codes, offset, layers = [], 0, "input"
        deep: list[bool] = []
        firsts, min_overlap = [], None
        for size, (_, _, domains) in zip(sizes, items):
            firsts.append(offset)
            if domains is None:  # the reference average for every cell of this request
                codes.append(np.full(size, -1))
                continue
            d, count = np.asarray(domains.codes), domains.n_domains()
            layers = domains.layers
            min_overlap = domains.min_overlap if domains.min_overlap is not None else min_overlap
            codes.append(np.where(d >= 0, d + offset, -1))
            deep.extend(domains.deep if domains.deep is not None else [True] * count)
            offset += count
        options: dict[str, Any] = {"max_features": self.max_features, "batch_size": self.batch_cells,
                                   "device": self.device, "decode": decode}
        resolved = None
        if layers == "auto" and offset:  # every request's batches chosen on their own mixes, in one go
            emb, decoded, resolved = embed_resolving(
                stacked, self.model, QueryDomains(np.concatenate(codes), "auto", min_overlap=min_overlap),
                self.label_heads, self.atlas.manifest, **options)
        else:
            emb, decoded = embed_prepared(stacked, self.model, domains=np.concatenate(codes) if offset else None,
                                          layers=layers, deep=np.asarray(deep, dtype=bool) if offset else None,
                                          **options)
        out = []
        bounds = np.cumsum([0] + sizes)
        for (_, wanted, domains), first, start, stop in zip(items, firsts, bounds[:-1], bounds[1:]):
            used = domains if resolved is None or domains is None else _own_part(resolved, domains, first)
            out.append((emb[start:stop], {m: decoded[m][start:stop] for m in wanted}, used))
        return out


def _own_part(resolved: Any, asked: Any, first: int) -> Any:
    """One request's share of the domains resolved for a batch of requests (its domains are
    ``first …`` there)."""
    from atlas.mapping.domains import QueryDomains

    count = asked.n_domains()
    overlap = tuple(resolved.overlap[first : first + count]) if resolved.overlap is not None else None
    deep = tuple(resolved.deep[first : first + count]) if resolved.deep is not None else (False,) * count
    return QueryDomains(asked.codes, "all" if any(deep) else "input", deep if any(deep) else None,
                        min_overlap=asked.min_overlap, overlap=overlap)


@serve.deployment(name="shard")
class IndexShard:
    """Index shards of the atlas: answers neighbour searches and profile sums for them.

    Normally one deployment per shard of the layout (``coarse`` and every ``fine/...``, or every
    ``hash/<i>``), so each replica holds one shard in memory and shards scale independently. A
    small atlas's shards are packed into one deployment (``ServiceArgs.pack_shards_below``): one
    process instead of one per shard. Every method takes the shard's name (``shard``; may be
    left out when the replica holds one shard).
    """

    def __init__(self, artifact: str, shard_names: str | list[str], use_gpu: bool = False):
        from atlas.artifact import load_atlas
        from atlas.mapping.search import search_shard

        atlas = load_atlas(artifact, verify="lazy")
        self.version = atlas.version
        names = [shard_names] if isinstance(shard_names, str) else list(shard_names)
        # Each shard's files are hashed right before it is loaded.
        self.shards = {n: atlas.shard(n, use_gpu=None if use_gpu else False) for n in names}
        for shard in self.shards.values():  # warm up (imports, faiss): the first query does not pay
            search_shard(shard, np.zeros((1, shard.index.d), np.float32), 1)
        log.info("shard(s) %s of atlas %s: %d cells", names, self.version,
                 sum(s.n_cells for s in self.shards.values()))

    def _shard(self, name: str | None) -> Any:
        if name is None and len(self.shards) == 1:
            return next(iter(self.shards.values()))
        try:
            return self.shards[name]  # type: ignore[index]  # None: the KeyError below
        except KeyError:
            raise KeyError(f"this replica serves shard(s) {sorted(self.shards)}, not {name!r}") from None

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
               space: str = "embedding", shard: str | None = None) -> Any:
        """:func:`~atlas.mapping.search.search_shard` on ``shard``."""
        from atlas.mapping.search import search_shard

        return search_shard(self._shard(shard), queries, k, exclude=exclude, space=space)

    def profile_sums(self, modality: str, positions: np.ndarray, weights: np.ndarray | None = None,
                     shard: str | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
        """:func:`~atlas.mapping.search.shard_profile_sums` on ``shard``."""
        from atlas.mapping.search import shard_profile_sums

        return shard_profile_sums(self._shard(shard), modality, positions, weights)

    def describe(self, shard: str | None = None) -> dict[str, Any]:
        """Levels, label values, profile features and size of ``shard``."""
        from atlas.mapping.search import describe_shard

        return {**describe_shard(self._shard(shard)), "atlas_version": self.version}

    def check_health(self) -> None:
        for s in self.shards.values():
            if s.index.ntotal != s.n_cells:
                raise RuntimeError(f"shard {s.name}: index holds {s.index.ntotal} of {s.n_cells} cells")
