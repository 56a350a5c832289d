"""Neighbour search over index shards, in a form both the offline mapper and Serve can run.

:func:`search_shard` is what one shard holder does (a local :class:`~atlas.index.shards.Shard`
or a Serve shard replica): search, then look up what the mapper needs about every hit (labels,
store ids, datasets). :func:`merge_hits` combines several shards of one layout node, exactly as
the offline mapper does, so served and offline results are the same arrays.

A *searcher* answers two questions for the mapper (:class:`LocalSearcher` reads shards from an
:class:`~atlas.artifact.Atlas`; ``serve/`` implements the same two methods with deployment
handles):

* ``search(shard_names, queries, k, exclude=None, space="embedding") -> Hits``
  (optionally ``search_many(requests) -> [Hits]``, several searches at once: :func:`search_all`)
* ``profile_sums(shard_name, modality, positions, weights=None) -> (features, sums [m, f], counts [m])``

``space="profiles"`` searches the root shards' second index, over profile-space vectors
(:mod:`atlas.index.profile_space`), instead of the embedding's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from atlas.index.faiss_index import search, topk_order
from atlas.mapping.vote import mean_profile


@dataclass
class Hits:
    """The ``k`` nearest reference cells of ``m`` queries, best first (row i = query i).

    A missing hit (fewer than ``k`` cells) has ``position`` -1, similarity -inf, label ``""``,
    ``soma_joinid`` -1 and ``dataset_id`` ``""``.
    """

    similarity: np.ndarray
    """float32 [m, k]: cosine similarity."""
    shard: np.ndarray
    """int64 [m, k]: which of ``shard_names`` holds the hit."""
    position: np.ndarray
    """int64 [m, k]: the hit's row in its shard."""
    labels: dict[str, np.ndarray]
    """level → str [m, k]."""
    soma_joinid: np.ndarray
    """int64 [m, k]."""
    dataset_id: np.ndarray
    """str [m, k]."""
    shard_names: list[str]

    @property
    def k(self) -> int:
        return int(self.position.shape[1])

    def rows(self, rows: np.ndarray) -> Hits:
        """The hits of a subset of the queries."""
        return Hits(self.similarity[rows], self.shard[rows], self.position[rows],
                    {lv: v[rows] for lv, v in self.labels.items()}, self.soma_joinid[rows],
                    self.dataset_id[rows], list(self.shard_names))

    def positions_in(self, shard_name: str) -> np.ndarray:
        """``position`` where the hit lies in ``shard_name``, -1 elsewhere."""
        if shard_name not in self.shard_names:
            return np.full(self.position.shape, -1, np.int64)
        return np.where(self.shard == self.shard_names.index(shard_name), self.position, -1)


def _take(values: np.ndarray, pos: np.ndarray, fill: Any) -> np.ndarray:
    out = np.asarray(values)[np.where(pos >= 0, pos, 0)] if len(values) else np.full(pos.shape, fill)
    return np.where(pos >= 0, out, fill)


def search_shard(shard: Any, queries: np.ndarray, k: int, *, exclude: np.ndarray | None = None,
                 space: str = "embedding") -> Hits:
    """The ``k`` nearest cells of ``shard`` for each query, with their labels and ids.

    ``exclude`` (int64 [m]) drops, per query, the reference cell with that ``soma_joinid`` —
    leave-one-out search of reference cells against their own index (build-time calibration).
    ``space``: ``"embedding"`` (the shard's index) or ``"profiles"`` (its profile index).
    """
    if space == "embedding":
        index = shard.index
    elif space == "profiles":
        index = getattr(shard, "profile_index", None)
        if index is None:
            raise KeyError(f"shard {shard.name} has no profile index (the atlas has no profile space)")
    else:
        raise ValueError(f"unknown search space {space!r}; expected 'embedding' or 'profiles'")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    extra = 1 if exclude is not None else 0
    sims, pos = search(index, queries, k + extra)
    pos = pos.astype(np.int64)
    if exclude is not None:
        own = _take(shard.soma_joinid, pos, -1) == np.asarray(exclude, np.int64)[:, None]
        # Stable: push the query's own cell to the end, then cut back to k.
        order = np.argsort(own, axis=1, kind="stable")[:, :k]
        sims, pos = np.take_along_axis(sims, order, axis=1), np.take_along_axis(pos, order, axis=1)
    sims = np.where(pos >= 0, sims, -np.inf).astype(np.float32)
    return Hits(
        similarity=sims,
        shard=np.zeros(pos.shape, np.int64),
        position=pos,
        labels={lv: _take(v, pos, "").astype(str) for lv, v in shard.labels.items()},
        soma_joinid=_take(shard.soma_joinid, pos, -1).astype(np.int64),
        dataset_id=_take(shard.dataset_id, pos, "").astype(str),
        shard_names=[shard.name],
    )


def merge_hits(parts: Sequence[Hits], k: int) -> Hits:
    """One top-``k`` from the hits of the same queries in several shards (in the given order)."""
    if len(parts) == 1:
        return parts[0]
    order = topk_order([p.similarity for p in parts], k)  # the ordering of faiss_index.merge_topk

    def take(arrays: list[np.ndarray]) -> np.ndarray:
        return np.take_along_axis(np.concatenate(arrays, axis=1), order, axis=1)

    names = [n for p in parts for n in p.shard_names]
    offsets = np.cumsum([0] + [len(p.shard_names) for p in parts[:-1]])
    shard = take([p.shard + off for p, off in zip(parts, offsets)])
    levels = parts[0].labels.keys()
    return Hits(
        similarity=take([p.similarity for p in parts]), shard=shard,
        position=take([p.position for p in parts]),
        labels={lv: take([p.labels[lv] for p in parts]) for lv in levels},
        soma_joinid=take([p.soma_joinid for p in parts]),
        dataset_id=take([p.dataset_id for p in parts]),
        shard_names=names,
    )


def shard_profile_sums(shard: Any, modality: str, positions: np.ndarray, weights: np.ndarray | None = None
                       ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per query: the (``weights``-weighted) sum of the measured ``modality`` rows at ``positions``
    (-1 = skip) and their total weight — so profiles of hits spread over several shards pool exactly."""
    if modality not in shard.profiles:
        raise KeyError(f"shard {shard.name} stores no {modality} profiles; it has {sorted(shard.profiles)}")
    features, values = shard.profiles[modality]
    means, counts = mean_profile(values, positions, return_counts=True, weights=weights)
    sums = np.nan_to_num(means).astype(np.float64) * counts[:, None]
    return list(features), sums, counts.astype(np.float64)


@dataclass(frozen=True)
class SearchRequest:
    """One :meth:`Searcher.search` call, for :func:`search_all`."""

    shard_names: Sequence[str]
    queries: np.ndarray
    k: int
    exclude: np.ndarray | None = None
    space: str = "embedding"


class Searcher(Protocol):
    """Where the mapper's neighbours come from (local shards or Serve shard deployments)."""

    def search(self, shard_names: Sequence[str], queries: np.ndarray, k: int,
               exclude: np.ndarray | None = None, space: str = "embedding") -> Hits: ...

    def profile_sums(self, shard_name: str, modality: str, positions: np.ndarray,
                     weights: np.ndarray | None = None) -> tuple[list[str], np.ndarray, np.ndarray]: ...


def search_all(searcher: Searcher, requests: Sequence[SearchRequest]) -> list[Hits]:
    """Every request's hits, in order — at once where the searcher can (``search_many``: Serve
    shard deployments answer them in parallel), else one after another."""
    many = getattr(searcher, "search_many", None)
    if many is not None:
        return list(many(requests))
    return [searcher.search(r.shard_names, r.queries, r.k, exclude=r.exclude, space=r.space) for r in requests]


class ShardFolder:
    """Shards read straight from a shards folder (a build, before its artifact is sealed)."""

    def __init__(self, root: Any):
        from pathlib import Path

        self.root = Path(root)
        self._cache: dict[str, Any] = {}

    def shard(self, name: str, **kwargs: Any) -> Any:
        if name not in self._cache:
            from atlas.index.shards import load_shard

            self._cache[name] = load_shard(self.root / name, **kwargs)
        return self._cache[name]


class LocalSearcher:
    """Searches the shards of an :class:`~atlas.artifact.Atlas` (or a :class:`ShardFolder`)
    in this process."""

    def __init__(self, atlas: Any, **shard_kwargs: Any):
        self.atlas = atlas
        self.shard_kwargs = shard_kwargs

    def search(self, shard_names: Sequence[str], queries: np.ndarray, k: int,
               exclude: np.ndarray | None = None, space: str = "embedding") -> Hits:
        parts = [search_shard(self.atlas.shard(name, **self.shard_kwargs), queries, k, exclude=exclude, space=space)
                 for name in shard_names]
        return merge_hits(parts, k)

    def profile_sums(self, shard_name: str, modality: str, positions: np.ndarray,
                     weights: np.ndarray | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
        return shard_profile_sums(self.atlas.shard(shard_name, **self.shard_kwargs), modality, positions, weights)


def describe_shard(shard: Any) -> dict[str, Any]:
    """A shard's levels, label values, profile features and size (what a shard replica reports;
    here, not beside the pipeline, so that a shard replica never imports torch or anndata)."""
    return {
        "name": shard.name,
        "n_cells": int(shard.n_cells),
        "levels": list(shard.labels),
        "labels": {lv: sorted(set(np.asarray(v).tolist()) - {""}) for lv, v in shard.labels.items()},
        "profiles": {m: list(f) for m, (f, _) in shard.profiles.items()},
    }
