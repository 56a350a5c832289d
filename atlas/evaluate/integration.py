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
