"""Query mapping: align a query to an atlas, embed it with the frozen model, vote labels
coarse-to-fine over the index shards, and predict the modalities it lacks.

* :mod:`atlas.mapping.align` — feature alignment, raw-count / species / coverage checks, and the
  reference's normalisation (:class:`MappingError` for what a user must fix).
* :mod:`atlas.mapping.vote` — similarity-weighted kNN vote and neighbour-mean profiles (numpy).
* :mod:`atlas.mapping.search` — shard search and merging behind a searcher (local or Serve).
* :mod:`atlas.mapping.query` — :func:`map_query`, used by the offline path and the service.
"""

from atlas.mapping.align import MappingError, align_query, normalize_aligned, query_modalities
from atlas.mapping.query import (
    UNKNOWN,
    assign_labels,
    embed_prepared,
    embed_query,
    map_query,
    predict_profiles,
    prepare_query,
)
from atlas.mapping.search import Hits, LocalSearcher, merge_hits, search_shard
from atlas.mapping.vote import mean_profile, weighted_vote

__all__ = [
    "UNKNOWN",
    "Hits",
    "LocalSearcher",
    "MappingError",
    "align_query",
    "assign_labels",
    "embed_prepared",
    "embed_query",
    "map_query",
    "mean_profile",
    "merge_hits",
    "normalize_aligned",
    "predict_profiles",
    "prepare_query",
    "query_modalities",
    "search_shard",
    "weighted_vote",
]
