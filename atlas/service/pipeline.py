"""What the ingress runs for one request: :func:`atlas.mapping.map_query`'s stages, with the
frozen model and the index shards behind callables.

Offline, ``map_query`` runs every stage in one process. Here the ingress keeps the cheap ones
(parameter checks, :func:`~atlas.mapping.query.prepare_query`, voting and assembly) and hands
the embedding to the encoder deployment (an ``embed`` callable) and the neighbour searches to
the shard deployments (a :class:`~atlas.mapping.search.Searcher`). Both paths run the library's
:func:`~atlas.mapping.query.run_mapping`, so served and offline results are the same arrays.
Nothing here imports Ray: tests run it with a local model and a ``LocalSearcher``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from atlas.mapping.align import MappingError
from atlas.mapping.domains import QueryDomains
from atlas.mapping.query import (
    available_levels,
    decodable,
    model_modalities,
    run_mapping,
)
from atlas.mapping.search import Searcher
from atlas.timing import StageClock
from atlas.wire import MapParams

#: ``embed(aligned, decode, domains) -> (embedding float32 [cells, d], {target: decoded float32 [cells, f]},
#: domains used)`` (``domains``: :class:`~atlas.mapping.domains.QueryDomains` or None; ``"auto"``
#: comes back resolved, :func:`atlas.mapping.embedding.embed_auto`)
Embed = Callable[[Mapping[str, sp.csr_matrix], Mapping[str, str], "QueryDomains | None"],
                 tuple[np.ndarray, dict[str, np.ndarray], "QueryDomains | None"]]


@dataclass(frozen=True)
class RootShardInfo:
    """What the mapper needs to know about the root shard without loading its index."""

    levels: list[str]
    """Label levels the root shard carries (a hash layout maps exactly these)."""
    profiles: dict[str, list[str]]
    """Modality → feature names of the profiles it stores (what kNN can predict)."""
    labels: dict[str, list[str]] = field(default_factory=dict)
    """Level → sorted label values (for ``GET /v1/atlas``)."""
    n_cells: int = 0


def root_info(descriptions: Sequence[Mapping[str, Any]]) -> RootShardInfo:
    """Combine the descriptions of the root node's shards (several for a hash layout)."""
    first = descriptions[0]
    labels = {lv: sorted(set().union(*(set(d["labels"].get(lv, [])) for d in descriptions)))
              for lv in first["levels"]}
    return RootShardInfo(levels=list(first["levels"]), profiles=dict(first["profiles"]), labels=labels,
                         n_cells=int(sum(d["n_cells"] for d in descriptions)))


class MappingPipeline:
    """Maps decoded requests onto one atlas (the ingress holds one per replica)."""

    def __init__(self, atlas: Any, root: RootShardInfo):
        if atlas.layout is None:
            raise MappingError(f"atlas {atlas.version} has no index shards; rebuild it with index levels")
        self.atlas = atlas
        self.root = root
        self.levels = available_levels(atlas.layout, root.levels)

    def predictable(self) -> dict[str, list[str]]:
        """Modality → methods that can predict it (``knn`` from stored profiles, ``decoder``)."""
        out: dict[str, list[str]] = {m: ["knn"] for m in self.root.profiles}
        modalities = model_modalities(self.atlas.manifest)
        for have in modalities:
            for target in decodable(self.atlas.manifest, [have]):
                out.setdefault(target, []).append("decoder")
        return out

    def map(self, adata: Any, obs_names: Any, params: MapParams, embed: Embed, searcher: Searcher,
            clock: StageClock | None = None) -> Any:
        """The contract's AnnData for ``adata`` (see :func:`atlas.mapping.map_query`).

        A request carries no obs columns: ``batch_key`` is the client's (it sends each batch in
        requests of its own, with ``batch`` naming it)."""
        if params.batch_key is not None:
            raise MappingError("batch_key names a column of the client's obs; send each batch's cells in requests "
                               "of their own with batch=NAME (AtlasClient.map(batch_key=...) does)")
        return run_mapping(adata, self.atlas, params, root_levels=self.root.levels,
                           root_profiles=list(self.root.profiles), embed=embed, searcher=searcher,
                           obs_names=obs_names, clock=clock)
