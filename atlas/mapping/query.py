"""Map query cells onto an atlas: align → embed → coarse-to-fine kNN vote → missing modalities.

One implementation for the offline path (``map_query``) and the Serve deployments (which call
the same helpers on their own shard).

Labels are voted coarse to fine through the index's shard hierarchy (:mod:`atlas.mapping.labels`).

Every stage is a separate function so the Serve app runs the same code split over deployments:
:func:`prepare_query` (align + normalise; ingress), :func:`embed_prepared` (the frozen model;
encoder deployment, which batches requests), :func:`assign_labels` and :func:`predict_profiles`
(over a :class:`~atlas.mapping.search.Searcher`: local shards offline, shard deployments in
Serve), :func:`assemble` (the contract's AnnData).

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

from atlas.mapping.align import (
    MappingError,
    align_query,
    normalize_aligned,
    query_modalities,
)
from atlas.mapping.composition import embed_by_mix
from atlas.mapping.confidence import confidence_rule
from atlas.mapping.domains import FixedDomains, QueryDomains, batch_labels, query_domains
from atlas.mapping.embedding import embed_prepared, local_embed, max_features_of
from atlas.mapping.labels import assign_labels
from atlas.mapping.params import PREDICT_METHODS, MapParams  # noqa: F401 (PREDICT_METHODS: re-exported)
from atlas.mapping.search import Hits, LocalSearcher, Searcher
from atlas.mapping.vote import balance_weights
from atlas.names import (
    EMBEDDING,
    NEIGHBORS_JOINID,
    NEIGHBORS_SIMILARITY,
    NEIGHBORS_UNS,
    decoder_key,
    probabilities_key,
    profile_key,
)
from atlas.timing import StageClock

MODELS = ("concerto", "cvqvae")


def _as_atlas(atlas: Any) -> Any:
    if isinstance(atlas, (str, Path)):
        from atlas.artifact import load_atlas

        return load_atlas(atlas)
    return atlas


def model_modalities(manifest: Mapping[str, Any]) -> list[str]:
    """The modalities the atlas's model reads, in its order."""
    config = manifest["model"]["config"]
    if config.get("model") not in MODELS:
        raise MappingError(f"atlas holds a {config.get('model')!r} model; mapping supports {list(MODELS)}")
    return list(config.get("modalities", ["RNA"]))


def prepare_query(adata: Any, atlas: Any, *, min_fraction: float = 0.5
                  ) -> tuple[dict[str, sp.csr_matrix], np.ndarray, dict[str, Any]]:
    """Align and normalise the query for the atlas's model.

    Returns ``(aligned, has_data, reports)``: per model modality a normalised CSR over the atlas
    vocabulary (all-empty for modalities the query lacks), which cells hold any data, and the
    alignment report of each modality the query has.
    """
    modalities = model_modalities(atlas.manifest)
    have = [m for m in modalities if m in query_modalities(adata)]
    if not have:
        raise MappingError(f"the query holds none of the modalities the atlas model uses ({modalities}); "
                           "put RNA counts in adata.X or other modalities in adata.obsm as DataFrames")
    n = adata.n_obs
    aligned, reports = {}, {}
    for m in modalities:
        if m in have:
            counts, reports[m] = align_query(adata, atlas, m, min_fraction)
            aligned[m] = normalize_aligned(counts, atlas, m)
        else:
            aligned[m] = sp.csr_matrix((n, len(atlas.vocabulary[m])), dtype=np.float32)
    has_data = np.zeros(n, dtype=bool)
    for m in have:
        has_data |= np.diff(aligned[m].indptr) > 0
    return aligned, has_data, reports


def decodable(manifest: Mapping[str, Any], have: Sequence[str]) -> dict[str, str]:
    """Modalities a CVQVAE decoder can predict from what the query has: ``{target: source}``."""
    config = manifest["model"]["config"]
    if config.get("model") != "cvqvae":
        return {}
    a, b = list(config["modalities"])
    out = {}
    if a in have and b not in have:
        out[b] = a
    if b in have and a not in have:
        out[a] = b
    return out


def embed_query(adata: Any, atlas: Any, *, min_fraction: float = 0.5, batch_size: int = 1024,
                device: str = "cpu", model: Any = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(embedding float32 [cells, d], has_data bool [cells], alignment reports)`` of the query."""
    aligned, has_data, reports = prepare_query(adata, atlas, min_fraction=min_fraction)
    model = model if model is not None else atlas.model(device)
    emb, _ = embed_prepared(aligned, model, max_features=max_features_of(atlas.manifest),
                            batch_size=batch_size, device=device)
    return emb, has_data, reports


def available_levels(layout: Any, root_labels: Sequence[str]) -> list[str]:
    """Label levels an atlas can map: the hierarchy's, or (hash layout) the root shard's."""
    return list(layout.levels) if layout.mode == "hierarchy" else list(root_labels)


def resolve_thresholds(thresholds: Any, manifest: Mapping[str, Any], levels: Sequence[str]
                       ) -> float | dict[str, float] | None:
    """``"calibrated"`` → the build's per-level thresholds (none recorded: no rejection)."""
    if isinstance(thresholds, str):
        if thresholds != "calibrated":
            raise MappingError(f"thresholds must be 'calibrated', a number, a dict per level or None; got {thresholds!r}")
        calibrated = (manifest.get("mapping") or {}).get("thresholds") or {}
        return {lv: float(v) for lv, v in calibrated.items() if v is not None}
    if isinstance(thresholds, Mapping):
        extra = sorted(set(thresholds) - set(levels))
        if extra:
            raise MappingError(f"thresholds name unknown level(s) {extra}; levels are {list(levels)}")
        return {str(k): float(v) for k, v in thresholds.items()}
    return None if thresholds is None else float(thresholds)


def profile_coordinates(atlas: Any, aligned: Mapping[str, sp.csr_matrix], reports: Mapping[str, Any]
                        ) -> tuple[Any, np.ndarray | None, str]:
    """``(profile space or None, the query's coordinates in its PCA or None, how)``.

    The coordinates exist when the atlas has a profile space (:mod:`atlas.index.profile_space`)
    and the query has at least ``MIN_GENE_FRACTION`` of its genes (``how = "embedding+pca"``);
    otherwise ``how`` says why the embedding alone places the query."""
    from atlas.index.profile_space import MIN_GENE_FRACTION

    space = atlas.profile_space() if hasattr(atlas, "profile_space") else None
    if space is None:
        return None, None, "embedding"
    report = reports.get(space.modality)
    if report is None or report["fraction"] < MIN_GENE_FRACTION:
        have = 0.0 if report is None else report["fraction"]
        return space, None, (f"embedding (the query has {have:.0%} of the {space.modality} features the "
                              f"profile space needs, < {MIN_GENE_FRACTION:.0%})")
    return space, space.project(aligned[space.modality]), "embedding+pca"


def labels_in_profile_space(manifest: Mapping[str, Any]) -> bool:
    """Whether the atlas's shards index profile-space vectors (``index.label_space: profiles``)."""
    return bool(((manifest.get("mapping") or {}).get("profile_space") or {}).get("labels"))


def search_vectors(space: Any, coords: np.ndarray | None, emb: np.ndarray) -> np.ndarray:
    """What an atlas that votes in its profile space is searched with: the profile-space vectors,
    or, without coordinates, the embedding with a zero PCA block — whose similarities to the
    indexed vectors rank the reference exactly as the embedding's cosine does."""
    if coords is None:
        coords = np.zeros((emb.shape[0], space.components.shape[0]), np.float32)
    return space.vectors(emb, coords)


def profile_neighbours(atlas: Any, space: Any, coords: np.ndarray | None, emb: np.ndarray, coarse: Hits,
                       searcher: Searcher, k: int) -> tuple[Hits, np.ndarray | None]:
    """The reference cells each query's profiles are pooled over, and their weights: with
    coordinates in the profile space, the ``k`` nearest cells there, softmax-weighted (the coarse
    hits themselves when labels are voted in that space); otherwise the coarse neighbours, equally."""
    if space is None or coords is None:
        return coarse, None
    if labels_in_profile_space(atlas.manifest):
        return coarse, space.neighbour_weights(coarse.similarity)
    hits = searcher.search(list(atlas.layout.root.shards), space.vectors(emb, coords), k, space="profiles")
    return hits, space.neighbour_weights(hits.similarity)


def predict_profiles(coarse: Hits, searcher: Searcher, modalities: Sequence[str],
                     weights: np.ndarray | None = None) -> dict[str, pd.DataFrame]:
    """Per modality: the mean normalised profile of each query's measured neighbours in ``coarse``
    (weighted by ``weights`` [m, k] when given; NaN row: none of them measured it), pooled exactly
    over the shards the hits lie in."""
    n = coarse.position.shape[0]
    out = {}
    names = coarse.shard_names
    if not names:
        raise ValueError("predict_profiles: the coarse hits name no shard to pool profiles over")
    for m in modalities:
        features, sums, counts = searcher.profile_sums(names[0], m, coarse.positions_in(names[0]), weights)
        for name in names[1:]:
            _, s, c = searcher.profile_sums(name, m, coarse.positions_in(name), weights)
            sums, counts = sums + s, counts + c
        values = np.full((n, len(features)), np.nan, np.float32)
        has = counts > 0
        values[has] = (sums[has] / counts[has, None]).astype(np.float32)
        out[m] = pd.DataFrame(values, columns=features)
    return out


def assemble(obs_names: Any, emb: np.ndarray, labels: pd.DataFrame, profiles: Mapping[str, pd.DataFrame],
             decoded: Mapping[str, pd.DataFrame], coarse: Hits | None, uns: dict[str, Any],
             probabilities: Mapping[str, pd.DataFrame] | None = None) -> ad.AnnData:
    """The contract's AnnData (see :func:`map_query`)."""
    index = pd.Index([str(x) for x in obs_names], name=getattr(obs_names, "name", None))
    obs = labels.set_axis(index, axis=0)
    result = ad.AnnData(obs=obs)
    result.obsm[EMBEDDING] = emb
    for level, frame in (probabilities or {}).items():
        result.obsm[probabilities_key(level)] = frame.set_axis(index, axis=0)
    for m, frame in profiles.items():
        result.obsm[profile_key(m)] = frame.set_axis(index, axis=0)
    for m, frame in decoded.items():
        key = decoder_key(m) if m in profiles else profile_key(m)
        result.obsm[key] = frame.set_axis(index, axis=0)
    if coarse is not None:
        result.obsm[NEIGHBORS_JOINID] = coarse.soma_joinid
        result.obsm[NEIGHBORS_SIMILARITY] = coarse.similarity
        uns = {**uns, NEIGHBORS_UNS: {"dataset_id": coarse.dataset_id}}
    result.uns.update(uns)
    return result


def map_query(
    adata: Any,
    atlas: Any,
    params: MapParams | Mapping[str, Any] | None = None,
    *,
    batch_size: int = 1024,
    device: str = "cpu",
    searcher: Searcher | None = None,
    model: Any = None,
    fixed_domains: FixedDomains | None = None,
    **options: Any,
) -> ad.AnnData:
    """Map the query's cells onto an atlas (an :class:`~atlas.artifact.Atlas` or its folder).

    The mapping options are the fields of :class:`~atlas.mapping.params.MapParams`, given as
    ``params`` and/or keywords (``map_query(adata, atlas, levels=["cell_type_l1"], k_coarse=30)``):
    ``levels``, ``predict``, ``predict_method``, ``k_coarse``, ``k_fine``, ``thresholds``,
    ``return_neighbors``, ``min_fraction``, ``batch_key``, ``batch``, ``domain_statistics``,
    ``min_domain_cells`` (see that class for each one's meaning and default).

    Returns an AnnData with the query's ``obs_names`` and no X, holding per level of ``levels``
    (default: every level of the atlas) ``obs[f"{level}_pred"]`` (``"unknown"`` when rejected),
    ``obs[f"{level}_confidence"]`` (weighted vote share in [0, 1]) and ``obs[f"{level}_unknown"]``;
    ``obsm["X_atlas"]`` (the embedding); for each modality of ``predict`` (default: every
    modality the atlas can predict that the query lacks) ``obsm[f"{m}_pred"]``, a DataFrame with
    the reference feature names as columns. ``predict_method``: ``"knn"`` (the mean of the
    ``k_coarse`` nearest reference cells' normalised values: in the atlas's profile space, the
    embedding beside a PCA of RNA, softmax-weighted by similarity, when it has one and the query
    has ≥ 90% of its genes; else in the embedding, equally weighted; ``uns["atlas"]
    ["profile_neighbours"]`` says which), ``"decoder"`` (CVQVAE atlases: the
    cross-modal decoder) or ``"both"`` (kNN in ``{m}_pred``, decoder in ``{m}_pred_decoder``).
    With an atlas whose model has label heads, ``obsm[f"{level}_probabilities"]`` per level: a
    DataFrame of the heads' class probabilities (columns: the level's reference classes; NaN
    rows for cells without counts); the label itself is the kNN vote's.
    ``thresholds``: ``"calibrated"`` (default: the per-level minimum confidence calibrated at
    build time on held-out reference cells), a dict per level, one float for all, or None (no
    rejection); below it a cell is ``{level}_unknown`` and labelled ``"unknown"``. Each query
    batch (``obs[batch_key]``, or ``batch`` for the whole query) of at least ``min_domain_cells``
    cells is normalised by its own statistics (:mod:`atlas.mapping.domains`); without either,
    every cell by the reference's average.
    ``uns["atlas"]`` holds the version, alignment reports, parameters and ``query_domains``. With
    ``return_neighbors``: ``obsm["atlas_neighbors_soma_joinid"]`` (int64, -1 = none),
    ``obsm["atlas_neighbors_similarity"]`` and ``uns["atlas_neighbors"]["dataset_id"]`` (str
    [cells, k]) of the coarse neighbours (in the space labels are voted in: for an RNA Concerto
    atlas its profile space, see ``uns["atlas"]["label_neighbours"]``). ``fixed_domains`` (with ``model`` holding them): query
    statistics computed beforehand over a larger query this one is a block of.
    """
    params = MapParams.parse(params, **options)
    atlas = _as_atlas(atlas)
    if atlas.layout is None:
        raise MappingError(f"atlas {atlas.version} has no index shards; rebuild it with index levels")
    root_shard = atlas.shard(atlas.layout.root.shards[0])
    model = model if model is not None else atlas.model(device)
    embed = local_embed(model, atlas.manifest, batch_size=batch_size, device=device,
                        domains_set=fixed_domains is not None, heads=atlas.heads())
    return run_mapping(adata, atlas, params, root_levels=list(root_shard.labels),
                       root_profiles=list(root_shard.profiles), embed=embed,
                       searcher=searcher if searcher is not None else LocalSearcher(atlas),
                       fixed_domains=fixed_domains)


def run_mapping(
    adata: Any,
    atlas: Any,
    params: MapParams,
    *,
    root_levels: Sequence[str],
    root_profiles: Sequence[str],
    embed: Any,
    searcher: Searcher,
    obs_names: Any = None,
    fixed_domains: FixedDomains | None = None,
    clock: StageClock | None = None,
) -> ad.AnnData:
    """:func:`map_query` with the model and the shards behind callables — the Serve ingress runs
    this with the encoder deployment as ``embed(aligned, decode, domains) -> (embedding, decoded, domains used)``
    and a searcher over shard deployments; ``root_levels`` / ``root_profiles`` describe the root
    shard (label levels it carries, modalities it stores profiles of) so the caller need not load it;
    ``clock`` (optional) gets the seconds of each stage: prepare, embed, labels, profiles, assemble."""
    clock = clock if clock is not None else StageClock()
    layout = atlas.layout
    if layout is None:
        raise MappingError(f"atlas {atlas.version} has no index shards; rebuild it with index levels")
    available = available_levels(layout, list(root_levels))
    levels = list(available if params.levels is None else params.levels)
    missing_levels = [lv for lv in levels if lv not in available]
    if missing_levels:
        raise MappingError(f"atlas {atlas.version} has no label level(s) {missing_levels}; it has {available}")
    thresholds = resolve_thresholds(params.thresholds, atlas.manifest, available)
    batches = batch_labels(adata, params.batch_key, params.batch)

    with clock("prepare"):
        aligned, has_data, reports = prepare_query(adata, atlas, min_fraction=params.min_fraction)
        knn_targets, decode = plan_predictions(atlas.manifest, list(root_profiles), list(reports), params.predict,
                                               params.predict_method)
        if fixed_domains is not None:
            codes = fixed_domains.codes(batches, has_data) if batches is not None else None
            domains = None if codes is None else QueryDomains(codes, params.domain_statistics)
            domain_report = fixed_domains.report
        else:
            domains, domain_report = query_domains(batches, has_data, statistics=params.domain_statistics,
                                                   min_cells=params.min_domain_cells, batch_key=params.batch_key,
                                                   batch=params.batch)
    heads = atlas.heads()
    with clock("embed"):
        if domains is not None and domains.layers == "auto" and fixed_domains is None:
            emb, decoded, domains = embed_by_mix(aligned, decode, domains, embed, heads, atlas.manifest, domain_report,
                                                 params.min_mix_overlap)
        else:
            emb, decoded, _ = embed(aligned, decode, domains)
    with clock("labels"):
        typical = (atlas.manifest.get("mapping") or {}).get("typical_similarity")
        balance = vote_balance(atlas.manifest)
        head_probabilities = heads.probabilities(emb) if heads is not None else {}
        # The query's PCA coordinates only when something reads them: labels voted in the profile
        # space, or kNN profiles (a labels-only request to an embedding-voting atlas skips them).
        space, coords, placed_by = (profile_coordinates(atlas, aligned, reports)
                                    if knn_targets or labels_in_profile_space(atlas.manifest)
                                    else (None, None, "embedding"))
        in_space = space is not None and labels_in_profile_space(atlas.manifest)
        queries = search_vectors(space, coords, emb) if in_space else emb
        labels, coarse = assign_labels(queries, has_data, searcher, layout, levels, k_coarse=params.k_coarse,
                                       k_fine=params.k_fine, thresholds=thresholds, heads=heads, typical=typical,
                                       balance=balance, probabilities=head_probabilities)
    with clock("profiles"):
        profile_hits, profile_weights = (profile_neighbours(atlas, space, coords, emb, coarse, searcher, params.k_coarse)
                                         if knn_targets else (coarse, None))
        profiles = predict_profiles(profile_hits, searcher, knn_targets, profile_weights)
    with clock("assemble"):
        decoded_frames = {m: pd.DataFrame(v, columns=atlas.vocabulary[m]) for m, v in decoded.items()}
        class_probabilities = {} if heads is None else {
            lv: pd.DataFrame(p, columns=list(heads.classes[heads.levels.index(lv)]))
            for lv, p in head_probabilities.items() if lv in levels}
        empty = np.flatnonzero(~has_data)
        for frame in (*profiles.values(), *decoded_frames.values(), *class_probabilities.values()):
            frame.iloc[empty] = np.nan  # predicted from nothing: not measured, not a prediction
        uns = {"atlas": {**mapping_uns(atlas.manifest, reports, levels, params, thresholds, int((~has_data).sum())),
                         "query_domains": domain_report,
                         "confidence": confidence_rule(levels, heads, typical),
                         "vote_balance": (atlas.manifest.get("mapping") or {}).get("vote_balance", {}).get("power", 0.0),
                         "profile_neighbours": placed_by if knn_targets else None,
                         "label_neighbours": placed_by if in_space else "embedding"}}
        out = assemble(adata.obs_names if obs_names is None else obs_names, emb, labels, profiles, decoded_frames,
                       coarse if params.return_neighbors else None, uns, class_probabilities)
    return out


def vote_balance(manifest: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Level → label → vote factor from the manifest's ``mapping.vote_balance`` (``{"power",
    "counts": {level: {label: cells}}}``, written at build time); empty: a plain vote."""
    entry = (manifest.get("mapping") or {}).get("vote_balance") or {}
    power = float(entry.get("power", 0.0))
    return {lv: balance_weights(counts, power) for lv, counts in (entry.get("counts") or {}).items()} if power else {}


def plan_predictions(manifest: Mapping[str, Any], profile_modalities: Sequence[str], have: Sequence[str],
                     predict: Sequence[str] | None, method: str) -> tuple[list[str], dict[str, str]]:
    """Which modalities to predict by kNN and which by the decoder (``{target: source}``)."""
    decoder_can = decodable(manifest, have)
    possible = set(profile_modalities) | (set(decoder_can) if method != "knn" else set())
    if predict is None:
        predict = [m for m in ("RNA", "protein", "ATAC") if m in possible and m not in have]
    knn, decode = [], {}
    for m in predict:
        if method in ("knn", "both"):
            if m not in profile_modalities:
                raise MappingError(f"the atlas stores no {m} profiles to predict from by kNN; "
                                   f"it has {list(profile_modalities)}")
            knn.append(m)
        if method in ("decoder", "both"):
            if m not in decoder_can:
                why = ("its model is not a CVQVAE" if manifest["model"]["config"].get("model") != "cvqvae"
                       else f"the query must hold the other modality of {manifest['model']['config']['modalities']} "
                            f"and lack {m}")
                raise MappingError(f"cannot predict {m} with the decoder: {why}")
            decode[m] = decoder_can[m]
    return knn, decode


def mapping_uns(manifest: Mapping[str, Any], reports: Mapping[str, Any], levels: Sequence[str],
                params: MapParams, thresholds: Any, n_no_data: int) -> dict[str, Any]:
    return {
        "version": manifest["atlas_version"],
        "alignment": dict(reports),
        "levels": list(levels),
        "k_coarse": int(params.k_coarse),
        "k_fine": int(params.k_fine),
        "thresholds": dict(thresholds) if isinstance(thresholds, Mapping) else thresholds,
        "predict_method": params.predict_method,
        "n_no_data": int(n_no_data),
    }
