"""Query mapping: align a query to an atlas, embed it with the frozen model, vote labels
coarse-to-fine over the index shards, and predict the modalities it lacks.

* :mod:`atlas.mapping.align` — feature alignment, raw-count / species / coverage checks, and the
  reference's normalisation (:class:`MappingError` for what a user must fix).
* :mod:`atlas.mapping.vote` — similarity-weighted kNN vote and neighbour-mean profiles (numpy).
* :mod:`atlas.mapping.search` — shard search and merging behind a searcher (local or Serve).
* :mod:`atlas.mapping.query` — :func:`map_query`, used by the offline path and the service.
* :mod:`atlas.mapping.calibrate` — unknown-rejection thresholds calibrated at build time.
* :mod:`atlas.mapping.params` — :class:`MapParams`, the mapping options declared once (and their
  text forms for command lines and query strings).
* :mod:`atlas.mapping.domains` — which query cells share normalisation statistics.
* :mod:`atlas.mapping.offline` / :mod:`atlas.mapping.query_source` — millions of cells with Ray
  Data (``jobs/map_query.py``); :mod:`atlas.mapping.offline_output` — its Parquet output and
  :func:`read_mapping`. Not imported here, so ``import atlas.mapping`` needs no Ray.
"""

from importlib import import_module

# Lazy: a Serve shard replica imports atlas.mapping.search only, and must not pay for torch
# (atlas.mapping.query imports the model code).
_EXPORTS = {
    "MappingError": "align", "align_query": "align", "normalize_aligned": "align", "query_modalities": "align",
    "UNKNOWN": "query", "assign_labels": "labels", "embed_prepared": "query", "embed_query": "query",
    "map_query": "query", "predict_profiles": "query", "prepare_query": "query", "run_mapping": "query",
    "MapParams": "params",
    "Hits": "search", "LocalSearcher": "search", "merge_hits": "search", "search_shard": "search",
    "mean_profile": "vote", "weighted_vote": "vote",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"atlas.mapping.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'atlas.mapping' has no attribute {name!r}")
