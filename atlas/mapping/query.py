"""Map query cells onto an atlas: align → embed → coarse-to-fine kNN vote → missing modalities.

One implementation for the offline path (``map_query``) and the Serve deployments (which call
the same helpers on their own shard).

Hierarchy: every cell is searched in the ``coarse`` shard (``k_coarse`` neighbours) to vote the
first level; it then goes to the fine shard of its predicted level-1 group (``k_fine``
neighbours) to vote level 2, and so on. A cell is routed by its voted label even when that label
is rejected as unknown (its deeper votes are still computed), but a cell unknown at a level is
unknown at every deeper level. A cell whose voted group has no deeper shard (no reference cell
there carries the next level) is unknown at the deeper levels.

Missing-modality prediction uses the coarse neighbours: the coarse shard holds every reference
cell, so every query cell gets the same number of candidates drawn from the whole reference
(fine shards are subsets chosen by a vote that may be wrong, and their k is small), and the
profiles are read from one shard only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from atlas.data.batches import csr_to_batch
from atlas.index.faiss_index import merge_topk, search
from atlas.mapping.align import (
    MappingError,
    align_query,
    normalize_aligned,
    query_modalities,
)
from atlas.mapping.vote import mean_profile, weighted_vote

UNKNOWN = "unknown"


def _as_atlas(atlas: Any) -> Any:
    if isinstance(atlas, (str, Path)):
        from atlas.artifact import load_atlas

        return load_atlas(atlas)
    return atlas


def embed_query(adata: Any, atlas: Any, *, min_fraction: float = 0.5, batch_size: int = 1024,
                device: str = "cpu", model: Any = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Embed the query with the atlas's frozen model.

    Returns ``(embedding float32 [cells, d], has_data bool [cells], alignment reports)``.
    Every model modality the query holds is aligned and normalised as the reference was; the
    others enter as absent. Cells are embedded ``batch_size`` at a time (bounded memory) as an
    unseen domain (-1: the model uses the mean of its reference domains' statistics).
    """
    config = atlas.manifest["model"]["config"]
    if config.get("model") != "concerto":
        raise MappingError(f"mapping supports Concerto atlases; atlas {atlas.version} holds a "
                           f"{config.get('model')!r} model")
    model_modalities = list(config.get("modalities", ["RNA"]))
    have = [m for m in model_modalities if m in query_modalities(adata)]
    if not have:
        raise MappingError(f"the query holds none of the modalities the atlas model uses ({model_modalities}); "
                           "put RNA counts in adata.X or other modalities in adata.obsm as DataFrames")
    n = adata.n_obs
    aligned, reports = {}, {}
    for m in model_modalities:
        if m in have:
            counts, reports[m] = align_query(adata, atlas, m, min_fraction)
            aligned[m] = normalize_aligned(counts, atlas, m)
        else:
            aligned[m] = sp.csr_matrix((n, len(atlas.vocabulary[m])), dtype=np.float32)
    has_data = np.zeros(n, dtype=bool)
    for m in have:
        has_data |= np.diff(aligned[m].indptr) > 0
    max_features = (atlas.manifest.get("build_config", {}).get("data", {}) or {}).get("max_features")

    model = model if model is not None else atlas.model(device)
    chunks = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            batch = csr_to_batch({m: x[start:stop] for m, x in aligned.items()},
                                 domain=np.full(stop - start, -1), normalize=False,
                                 max_features=max_features)
            batch = {k: v.to(device) for k, v in batch.items()}
            chunks.append(model.embed(batch).float().cpu().numpy())
    d = int(config.get("embed_dim", 0))
    emb = np.concatenate(chunks) if chunks else np.zeros((0, d), np.float32)
    return emb.astype(np.float32), has_data, reports


def search_node(atlas: Any, shard_names: Sequence[str], queries: np.ndarray, k: int,
                **shard_kwargs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Any]]:
    """Search one layout node (one or several shards, merged).

    Returns ``(similarities [m, k'], positions [m, k'], shard_number [m, k'], shards)``;
    positions are rows of ``shards[shard_number]`` (-1 for a missing hit).
    """
    shards = [atlas.shard(name, **shard_kwargs) for name in shard_names]
    results = [search(s.index, queries, k) for s in shards]
    if len(results) == 1:
        sims, pos = results[0]
        return sims, pos, np.zeros(pos.shape, np.int64), shards
    sims, pos, src = merge_topk(results, k)
    return sims, pos, src, shards


def gather(shards: list[Any], pos: np.ndarray, src: np.ndarray, get: Any, fill: Any) -> np.ndarray:
    """``get(shard)[pos]`` for hits spread over ``shards`` (``fill`` where pos = -1)."""
    first = get(shards[0])
    out = np.full(pos.shape, fill, dtype=first.dtype if first.dtype.kind != "U" else object)
    for i, shard in enumerate(shards):
        hit = (src == i) & (pos >= 0)
        if hit.any():
            out[hit] = get(shard)[pos[hit]]
    return out.astype(str) if first.dtype.kind == "U" else out


def _threshold(thresholds: float | Mapping[str, float] | None, level: str) -> float | None:
    if thresholds is None:
        return None
    if isinstance(thresholds, Mapping):
        value = thresholds.get(level)
        return None if value is None else float(value)
    return float(thresholds)


def map_query(
    adata: Any,
    atlas: Any,
    levels: Sequence[str] | None = None,
    predict: Sequence[str] | None = None,
    k_coarse: int = 25,
    k_fine: int = 5,
    thresholds: float | Mapping[str, float] | None = None,
    return_neighbors: bool = False,
    *,
    min_fraction: float = 0.5,
    batch_size: int = 1024,
    device: str = "cpu",
) -> ad.AnnData:
    """Map the query's cells onto an atlas (an :class:`~atlas.artifact.Atlas` or its folder).

    Returns an AnnData with the query's ``obs_names`` and no X, holding per level of ``levels``
    (default: every level of the atlas) ``obs[f"{level}_pred"]`` (``"unknown"`` when rejected),
    ``obs[f"{level}_confidence"]`` (weighted vote share in [0, 1]) and ``obs[f"{level}_unknown"]``;
    ``obsm["X_atlas"]`` (the embedding); for each modality of ``predict`` (default: every profile
    modality of the atlas the query lacks) ``obsm[f"{m}_pred"]``, a DataFrame with the reference
    feature names as columns (mean of the ``k_coarse`` nearest reference cells' normalised
    values); ``uns["atlas"]`` (version, alignment reports, parameters). ``thresholds``: a minimum
    confidence per level (dict) or one for all levels (float); below it a cell is unknown. With
    ``return_neighbors``: ``obsm["atlas_neighbors_soma_joinid"]`` (int64, -1 = none),
    ``obsm["atlas_neighbors_similarity"]`` and ``uns["atlas_neighbors"]["dataset_id"]`` (str
    [cells, k]) of the coarse neighbours.
    """
    atlas = _as_atlas(atlas)
    layout = atlas.layout
    if layout is None:
        raise MappingError(f"atlas {atlas.version} has no index shards; rebuild it with index levels")
    if k_coarse < 1 or k_fine < 1:
        raise ValueError("k_coarse and k_fine must be ≥ 1")
    root = layout.root
    root_shard = atlas.shard(root.shards[0])
    available = list(layout.levels) if layout.mode == "hierarchy" else list(root_shard.labels)
    levels = list(available if levels is None else levels)
    unknown_levels = [lv for lv in levels if lv not in available]
    if unknown_levels:
        raise MappingError(f"atlas {atlas.version} has no label level(s) {unknown_levels}; it has {available}")
    if isinstance(thresholds, Mapping):
        extra = sorted(set(thresholds) - set(available))
        if extra:
            raise MappingError(f"thresholds name unknown level(s) {extra}; levels are {available}")

    emb, has_data, reports = embed_query(adata, atlas, min_fraction=min_fraction,
                                         batch_size=batch_size, device=device)
    n = emb.shape[0]
    obs = pd.DataFrame(index=pd.Index(adata.obs_names, name=adata.obs_names.name))
    out_preds: dict[str, np.ndarray] = {}

    # Coarse search: the first level, the profiles and the reported neighbours.
    c_sims, c_pos, c_src, c_shards = search_node(atlas, root.shards, emb, k_coarse)

    if layout.mode == "hierarchy":
        depth_levels = list(layout.levels[: max((layout.levels.index(lv) for lv in levels), default=-1) + 1])
        node_of = np.full(n, root.name, dtype=object)
        parent_unknown = np.zeros(n, dtype=bool)
        for depth, level in enumerate(depth_levels):
            pred = np.full(n, "", dtype=object)
            conf = np.zeros(n, np.float32)
            for node_name in pd.unique(node_of[node_of != None]):  # noqa: E711
                rows = np.flatnonzero(node_of == node_name)
                node = layout.node(node_name)
                if depth == 0:
                    sims, pos, src, shards = c_sims, c_pos, c_src, c_shards
                else:
                    sims, pos, src, shards = search_node(atlas, node.shards, emb[rows], k_fine)
                labels = gather(shards, pos, src, lambda s, lv=level: s.labels[lv], "")
                p, c = weighted_vote(labels, sims, positions=pos)
                pred[rows], conf[rows] = p, c
            no_route = node_of == None  # noqa: E711
            threshold = _threshold(thresholds, level)
            rejected = (pred == "") | no_route | parent_unknown | ~has_data
            if threshold is not None:
                rejected |= conf < threshold
            obs[f"{level}_pred"] = np.where(rejected, UNKNOWN, pred).astype(str)
            obs[f"{level}_confidence"] = conf
            obs[f"{level}_unknown"] = rejected
            out_preds[level] = pred
            parent_unknown = rejected
            if depth + 1 < len(depth_levels):
                nxt = np.full(n, None, dtype=object)
                for node_name in pd.unique(node_of[~no_route]):
                    rows = np.flatnonzero(node_of == node_name)
                    for value in pd.unique(pred[rows]):
                        child = layout.child(node_name, value) if value else None
                        if child is not None:
                            nxt[rows[pred[rows] == value]] = child.name
                node_of = nxt
        drop = [c for lv in depth_levels if lv not in levels for c in (f"{lv}_pred", f"{lv}_confidence", f"{lv}_unknown")]
        obs = obs.drop(columns=drop)
    else:  # hash layout: flat mapping, every level voted from the same neighbours
        for level in levels:
            labels = gather(c_shards, c_pos, c_src, lambda s, lv=level: s.labels[lv], "")
            pred, conf = weighted_vote(labels, c_sims, positions=c_pos)
            threshold = _threshold(thresholds, level)
            rejected = (pred == "") | ~has_data
            if threshold is not None:
                rejected |= conf < threshold
            obs[f"{level}_pred"] = np.where(rejected, UNKNOWN, pred).astype(str)
            obs[f"{level}_confidence"] = conf
            obs[f"{level}_unknown"] = rejected

    result = ad.AnnData(obs=obs)
    result.obsm["X_atlas"] = emb

    have = set(query_modalities(adata))
    profile_modalities = list(root_shard.profiles)
    if predict is None:
        predict = [m for m in profile_modalities if m not in have]
    for m in predict:
        if m not in profile_modalities:
            raise MappingError(f"atlas {atlas.version} stores no {m} profiles to predict from; "
                               f"it has {profile_modalities}")
        features = list(c_shards[0].profiles[m][0])
        sums = np.zeros((n, len(features)), np.float64)
        counts = np.zeros((n, 1), np.float64)
        for i, shard in enumerate(c_shards):  # a hash root spans several shards: pool their hits
            part, cnt = mean_profile(shard.profiles[m][1], np.where(c_src == i, c_pos, -1), return_counts=True)
            sums += np.nan_to_num(part) * cnt[:, None]
            counts[:, 0] += cnt
        values = np.full((n, len(features)), np.nan, np.float32)
        has = counts[:, 0] > 0
        values[has] = (sums[has] / counts[has]).astype(np.float32)
        result.obsm[f"{m}_pred"] = pd.DataFrame(values, index=obs.index, columns=features)

    if return_neighbors:
        result.obsm["atlas_neighbors_soma_joinid"] = gather(c_shards, c_pos, c_src, lambda s: s.soma_joinid, -1)
        result.obsm["atlas_neighbors_similarity"] = c_sims
        result.uns["atlas_neighbors"] = {
            "dataset_id": gather(c_shards, c_pos, c_src, lambda s: s.dataset_id, ""),
            "shard": root.name,
        }
    result.uns["atlas"] = {
        "version": atlas.version,
        "alignment": reports,
        "levels": levels,
        "k_coarse": int(k_coarse),
        "k_fine": int(k_fine),
        "thresholds": dict(thresholds) if isinstance(thresholds, Mapping) else thresholds,
        "n_no_data": int((~has_data).sum()),
    }
    return result

