"""Integration scores with the scIB definitions, computed by scib-metrics (JAX, runs on CPU).

Bio conservation (higher = cell types kept apart): NMI and ARI of k-means clusters against the
labels, label silhouette, isolated-label silhouette, cLISI. Batch correction (higher = batches
mixed within a cell type): batch silhouette, iLISI, kBET per label, graph connectivity, PCR
comparison (variance explained by batch before vs after). Each group is the mean of its metrics;
overall = 0.6 · bio + 0.4 · batch (Luecken et al. 2022), without min–max scaling across methods,
so a score does not change when a method is added to or removed from a table.

The neighbour graph is built the way :class:`scib_metrics.benchmark.Benchmarker` builds it
(pynndescent, 90 neighbours, random_state 0, subsets of 15/50/90), so the numbers agree with a
Benchmarker run on the same embedding (tested). Batch silhouette is the scIB batch ASW
(``silhouette_batch``), which Benchmarker 0.5 replaced by BRAS; BRAS is reported beside it but
not averaged in.

Needs the ``eval`` extra (``pip install -e '.[eval]'``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from atlas.errors import AtlasError

BIO = ("nmi", "ari", "silhouette_label", "isolated_labels", "clisi")
BATCH = ("silhouette_batch", "ilisi", "kbet", "graph_connectivity", "pcr_comparison")
EXTRA = ("bras",)
BIO_WEIGHT = 0.6


def _scib():
    try:
        import scib_metrics
        from scib_metrics.nearest_neighbors import pynndescent
    except ImportError as err:  # pragma: no cover - depends on the installed extras
        raise AtlasError(
            f"integration scores need scib-metrics ({err}); install the eval extra: pip install -e '.[eval]'"
        ) from err
    return scib_metrics, pynndescent


def pre_integration_pca(normalised: np.ndarray, n_comps: int = 50) -> np.ndarray:
    """The unintegrated reference for PCR comparison: PCA of the log-normalised input.

    scib (and Benchmarker.prepare) run ``sc.tl.pca`` with the arpack solver on all features.
    """
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(np.asarray(normalised, dtype=np.float32))
    n_comps = min(n_comps, min(adata.shape) - 1)
    sc.tl.pca(adata, n_comps=n_comps, svd_solver="arpack")
    return np.asarray(adata.obsm["X_pca"])


def aggregate(scores: Mapping[str, float]) -> dict[str, float]:
    """Bio, batch and overall from the ten metrics (each group's plain mean)."""
    missing = [name for name in BIO + BATCH if name not in scores]
    if missing:
        raise AtlasError(f"cannot aggregate integration scores: missing {missing}")
    bio = float(np.mean([scores[name] for name in BIO]))
    batch = float(np.mean([scores[name] for name in BATCH]))
    return {"bio": bio, "batch": batch, "overall": BIO_WEIGHT * bio + (1 - BIO_WEIGHT) * batch}


def integration_scores(
    embedding: np.ndarray,
    labels: Sequence | np.ndarray,
    batch: Sequence | np.ndarray,
    pre_integrated: np.ndarray,
    *,
    n_jobs: int = 1,
) -> dict[str, float]:
    """The ten scIB metrics (plus BRAS) and the bio / batch / overall aggregates of one embedding.

    ``labels`` and ``batch`` are per-cell; cells without a label must be removed by the caller
    (scIB scores annotated cells only). ``pre_integrated`` is the unintegrated PCA (same cells),
    e.g. :func:`pre_integration_pca`.
    """
    scib, pynndescent = _scib()
    x = np.ascontiguousarray(np.asarray(embedding, dtype=np.float32))
    labels = np.asarray(pd.Series(labels).astype(str).to_numpy())
    batch = np.asarray(pd.Series(batch).astype(str).to_numpy())
    if not (len(x) == len(labels) == len(batch) == len(pre_integrated)):
        raise AtlasError(
            f"integration scores: {len(x)} embedding rows, {len(labels)} labels, {len(batch)} batches, "
            f"{len(pre_integrated)} pre-integration rows; they must be the same cells"
        )
    if not np.isfinite(x).all():
        raise AtlasError("integration scores: the embedding has NaN or infinite values")
    if len(np.unique(batch)) < 2:
        raise AtlasError("integration scores need at least two batches")
    neighbours = pynndescent(x, n_neighbors=90, random_state=0, n_jobs=n_jobs)
    nn15, nn50, nn90 = (neighbours.subset_neighbors(n=n) for n in (15, 50, 90))
    clusters = scib.nmi_ari_cluster_labels_kmeans(x, labels)
    scores = {
        "nmi": clusters["nmi"],
        "ari": clusters["ari"],
        "silhouette_label": scib.silhouette_label(x, labels),
        "isolated_labels": scib.isolated_labels(x, labels, batch),
        "clisi": scib.clisi_knn(nn90, labels),
        "silhouette_batch": scib.silhouette_batch(x, labels, batch),
        "ilisi": scib.ilisi_knn(nn90, batch),
        "kbet": scib.kbet_per_label(nn50, batch, labels),
        "graph_connectivity": scib.graph_connectivity(nn15, labels),
        "pcr_comparison": scib.pcr_comparison(pre_integrated, x, batch, categorical=True),
        "bras": scib.bras(x, labels, batch),
    }
    scores = {name: float(value) for name, value in scores.items()}
    scores.update(aggregate(scores))
    return scores


def integration_table(
    embeddings: Mapping[str, np.ndarray],
    labels: Sequence | np.ndarray,
    batch: Sequence | np.ndarray,
    pre_integrated: np.ndarray,
) -> pd.DataFrame:
    """One row per method, columns = the metrics and aggregates, in the order of the paper's table."""
    rows = {name: integration_scores(x, labels, batch, pre_integrated) for name, x in embeddings.items()}
    columns = ["overall", "bio", "batch", *BIO, *BATCH, *EXTRA]
    return pd.DataFrame.from_dict(rows, orient="index")[columns]


# -- the six-metric mean of the NeurIPS 2021 multimodal benchmark (CVQVAE's paper code) ----------

SIX_METRICS = ("nmi", "silhouette_label", "cell_cycle_conservation", "trajectory_conservation",
               "silhouette_batch", "graph_connectivity")


def cell_cycle_conservation(pre: np.ndarray, post: np.ndarray, phase: Sequence | np.ndarray,
                            batch: Sequence | np.ndarray, n_comps: int = 50) -> float:
    """scIB's cell-cycle conservation, with the cells' cell-cycle *phase* as the covariate.

    Per batch: the variance of the embedding explained by the covariate (principal component
    regression), before (``pre``, the unintegrated PCA) and after; score ``1 − |after − before|
    / before`` (0 when negative), averaged over batches. scIB regresses on S and G2M scores it
    computes from Tirosh et al.'s genes; a panel lacking those genes (the NeurIPS 2021 starter
    set has 2 of 97) cannot give scores, so the data set's own ``phase`` column is the covariate
    (categorical).
    """
    from scib_metrics.utils import principal_component_regression

    phase = np.asarray(pd.Series(phase).astype(str).to_numpy())
    batch = np.asarray(pd.Series(batch).astype(str).to_numpy())
    scores = []
    for b in np.unique(batch):
        rows = batch == b
        if len(np.unique(phase[rows])) < 2:
            continue  # one phase in this batch: nothing to conserve
        k_pre, k_post = (min(n_comps, int(rows.sum()) - 1, x.shape[1]) for x in (pre, post))
        before = principal_component_regression(np.asarray(pre[rows], np.float32), phase[rows], categorical=True,
                                                n_components=k_pre)
        after = principal_component_regression(np.asarray(post[rows], np.float32), phase[rows], categorical=True,
                                               n_components=k_post)
        scores.append(max(0.0, 1.0 - abs(after - before) / before) if before > 0 else 0.0)
    return float(np.mean(scores)) if scores else float("nan")


def trajectory_conservation(embedding: np.ndarray, pre: np.ndarray, pseudotime: Sequence | np.ndarray,
                            labels: Sequence | np.ndarray, batch: Sequence | np.ndarray,
                            n_neighbors: int = 15) -> float:
    """scIB's trajectory conservation: Spearman r (scaled to (r + 1) / 2) between the given
    pseudotime and the diffusion pseudotime on the embedding's neighbour graph, per batch, mean.

    Only cells with a pseudotime take part. The root is scIB's: among the cells of the label
    with the lowest mean pseudotime, in the graph's largest connected component, the most
    extreme cell of the first three diffusion components (majority vote). Cells outside that
    component get pseudotime 0, as in scIB. ``pre`` is unused by the rule and kept for symmetry
    with :func:`cell_cycle_conservation` (scIB reads its labels and pseudotime from it).
    """
    import anndata as ad
    import scanpy as sc
    from scipy.sparse.csgraph import connected_components

    del pre
    pseudotime = np.asarray(pseudotime, dtype=float)
    keep = np.isfinite(pseudotime)
    if keep.sum() < 3:
        return float("nan")
    labels = np.asarray(pd.Series(labels).astype(str).to_numpy())[keep]
    batch = np.asarray(pd.Series(batch).astype(str).to_numpy())[keep]
    truth = pseudotime[keep]
    adata = ad.AnnData(np.zeros((int(keep.sum()), 1), np.float32))
    adata.obsm["X_emb"] = np.asarray(embedding, np.float32)[keep]
    sc.pp.neighbors(adata, use_rep="X_emb", n_neighbors=min(n_neighbors, int(keep.sum()) - 1), random_state=0)
    component = np.asarray(connected_components(adata.obsp["connectivities"], directed=False, return_labels=True)[1])
    largest = component == np.bincount(component).argmax()
    start_label = pd.Series(truth).groupby(labels).mean().idxmin()
    candidates = np.flatnonzero(largest & (labels == start_label))
    dpt = np.zeros(len(truth))
    if len(candidates):
        sub = adata[largest].copy()
        sc.pp.neighbors(sub, use_rep="X_emb", n_neighbors=min(n_neighbors, sub.n_obs - 1), random_state=0)
        sc.tl.diffmap(sub, n_comps=min(15, sub.n_obs - 2))
        local = np.asarray(np.searchsorted(np.flatnonzero(largest), candidates), dtype=np.int64)
        votes = np.zeros(len(local))
        for dim in range(min(3, sub.obsm["X_diffmap"].shape[1])):
            values = sub.obsm["X_diffmap"][:, dim]
            pick = np.argmin if values[local].mean() < values.mean() else np.argmax
            votes[pick(values[local])] += 1
        sub.uns["iroot"] = int(local[int(np.argmax(votes))])
        sc.tl.dpt(sub)
        inner = np.asarray(sub.obs["dpt_pseudotime"], dtype=float)
        inner[~np.isfinite(inner) | (inner > 1)] = 0.0
        dpt[largest] = inner
    per_batch = []
    for b in np.unique(batch):
        rows = batch == b
        if rows.sum() < 3:
            continue
        r = pd.Series(truth[rows]).corr(pd.Series(dpt[rows]), method="spearman")
        if np.isfinite(r):
            per_batch.append(r)
    return float((np.mean(per_batch) + 1) / 2) if per_batch else float("nan")


def six_metric_scores(embedding: np.ndarray, labels: Sequence | np.ndarray, batch: Sequence | np.ndarray,
                      pre_integrated: np.ndarray, phase: Sequence | np.ndarray,
                      pseudotime: Sequence | np.ndarray) -> dict[str, float]:
    """The six metrics the CVQVAE paper's code averages (NeurIPS 2021 multimodal integration
    benchmark): NMI, cell-type ASW, cell-cycle conservation, trajectory conservation, batch ASW,
    graph connectivity, and their plain mean (``six_mean``); NMI, the silhouettes and graph
    connectivity as :func:`integration_scores` computes them."""
    scib, pynndescent = _scib()
    x = np.ascontiguousarray(np.asarray(embedding, dtype=np.float32))
    labels = np.asarray(pd.Series(labels).astype(str).to_numpy())
    batch = np.asarray(pd.Series(batch).astype(str).to_numpy())
    neighbours = pynndescent(x, n_neighbors=min(90, len(x) - 1), random_state=0, n_jobs=1)
    scores = {
        "nmi": float(scib.nmi_ari_cluster_labels_kmeans(x, labels)["nmi"]),
        "silhouette_label": float(scib.silhouette_label(x, labels)),
        "cell_cycle_conservation": cell_cycle_conservation(pre_integrated, x, phase, batch),
        "trajectory_conservation": trajectory_conservation(x, pre_integrated, pseudotime, labels, batch),
        "silhouette_batch": float(scib.silhouette_batch(x, labels, batch)),
        "graph_connectivity": float(scib.graph_connectivity(neighbours.subset_neighbors(n=15), labels)),
    }
    scores["six_mean"] = float(np.nanmean([scores[k] for k in SIX_METRICS]))
    return scores
