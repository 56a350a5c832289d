"""The baseline a user would otherwise pick: PCA + cosine kNN on the same genes (Seurat/Azimuth-style).

Everything that could leak the query into the reference is fitted on the reference only:

1. RNA counts are library-size normalised to 1e4 and log1p-transformed (the atlas's own
   :func:`atlas.data.batches.normalize_log1p`, over the reference's genes, as the atlas does).
2. Each gene is centred and scaled with the *reference's* mean and standard deviation and
   clipped at ±10 (scanpy ``pp.scale(max_value=10)``, Seurat ``ScaleData``'s default clip).
3. PCA with 50 components (scikit-learn, ARPACK as in scanpy's default for dense data) is fitted
   on the reference; query cells are projected onto the reference's components.
4. Exact cosine kNN with faiss (``IndexFlatIP`` over L2-normalised PCA coordinates).
5. Labels, coarse to fine, with the atlas's rule (:mod:`atlas.mapping.query`): level 1 from the
   ``k_coarse`` = 25 nearest reference cells; level 2 from the ``k_fine`` = 5 nearest reference
   cells *within the predicted level-1 group* (hierarchical, not flat), and so on. A group none
   of whose reference cells carries the next level (e.g. B cells in pbmc10k, not gated further)
   gives ``unknown`` there. Votes are similarity-weighted
   (:func:`atlas.mapping.vote.weighted_vote`); confidence = the winning label's vote share;
   unlabelled reference cells are neighbours but do not vote.
6. Missing modalities (e.g. proteins of an RNA-only query) = the mean of the ``k_coarse``
   nearest reference cells' normalised values (1e4 + log1p, as the atlas stores profiles).

Optional ``thresholds`` reject low-confidence cells as ``unknown`` exactly as the atlas does
(and a cell unknown at one level is unknown at every deeper level); by default none is applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anndata as ad
import faiss
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA

from atlas.data.batches import normalize_log1p
from atlas.mapping.vote import mean_profile, weighted_vote
from atlas.names import UNKNOWN, confidence_key, pred_key, profile_key, unknown_key


@dataclass(frozen=True)
class PcaKnnConfig:
    """Settings of the PCA + kNN baseline."""

    n_comps: int = 50
    """PCA components fitted on the reference."""
    k_coarse: int = 25
    """Neighbours for the first level and for missing-modality prediction (the atlas's coarse k)."""
    k_fine: int = 5
    """Neighbours for deeper levels, searched within the predicted parent group."""
    max_value: float | None = 10.0
    """Scaled values are clipped to ±max_value (None: no clipping)."""
    seed: int = 0
    """Seed of the PCA solver's start vector."""
    min_fraction: float = 0.5
    """The query must hold at least this fraction of the reference's genes."""


def _log_normalised(counts: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    csr = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    csr.sort_indices()
    csr.data = normalize_log1p(csr.indptr, csr.data)
    return csr


def log_normalise_frame(counts: pd.DataFrame) -> pd.DataFrame:
    """Counts (cells × features, e.g. ``obsm["protein_counts"]``) → 1e4 + log1p per cell, the
    scale the atlas stores profiles on and predicts them in (measured truth for Pearson r)."""
    values = _log_normalised(counts.to_numpy(np.float32)).toarray()
    return pd.DataFrame(values, index=counts.index.astype(str), columns=[str(c) for c in counts.columns])


def _clean_labels(values: Sequence | np.ndarray, unlabeled: Sequence[str]) -> np.ndarray:
    series = pd.Series(np.asarray(values, dtype=object))
    series = series.where(series.notna(), "").astype(str)
    return series.where(~series.isin(list(unlabeled)), "").to_numpy(dtype=str)


class _CosineIndex:
    """Exact cosine search over a set of reference rows (faiss inner product on unit vectors)."""

    def __init__(self, vectors: np.ndarray, rows: np.ndarray):
        x = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        self.rows = rows
        self.index = faiss.IndexFlatIP(x.shape[1])
        self.index.add(x)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(similarity [m, k'], reference row [m, k'])`` with k' = min(k, cells here)."""
        k = min(k, self.index.ntotal)
        sims, pos = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return sims, np.where(pos >= 0, self.rows[np.maximum(pos, 0)], -1)


class PcaKnnBaseline:
    """PCA + cosine kNN label transfer and missing-modality prediction (see the module docstring).

    >>> baseline = PcaKnnBaseline().fit(reference, ["cell_type_l1", "cell_type_l2"],
    ...                                 profiles={"protein": "protein_counts"})
    >>> mapped = baseline.map(query)    # obs cell_type_l1_pred, ..., obsm["protein_pred"]
    """

    def __init__(self, config: PcaKnnConfig | None = None):
        self.config = config or PcaKnnConfig()
        self.levels: list[str] = []
        self.genes: pd.Index | None = None

    # -- fitting (reference only) ---------------------------------------------------------------

    def fit(self, reference: ad.AnnData, levels: Sequence[str], *,
            profiles: Mapping[str, str] | None = None, unlabeled: Sequence[str] = ("undefined",)
            ) -> PcaKnnBaseline:
        """Fit normalisation, scaling and PCA on ``reference`` (raw counts in X) and index it.

        ``levels``: obs columns with the labels, coarse to fine. ``profiles``: modality name →
        obsm key of a counts DataFrame (e.g. ``{"protein": "protein_counts"}``) to predict for
        queries. Values in ``unlabeled`` (and missing values) mean "no label".
        """
        cfg = self.config
        self.levels = list(levels)
        self.genes = pd.Index(reference.var_names.astype(str))
        logn = _log_normalised(reference.X)
        dense = logn.toarray()
        self.mean_ = dense.mean(axis=0)
        std = dense.std(axis=0, ddof=1) if dense.shape[0] > 1 else np.zeros(dense.shape[1], np.float32)
        self.std_ = np.where(std > 0, std, 1.0).astype(np.float32)  # constant genes: centred only
        n_comps = min(cfg.n_comps, *dense.shape)
        # arpack needs fewer components than features (a 9-antibody panel asks for all 9): full SVD then.
        self.pca_ = PCA(n_components=n_comps, svd_solver="arpack" if n_comps < min(dense.shape) else "full",
                        random_state=cfg.seed)
        coords = self.pca_.fit_transform(self._scale(dense))
        self.reference_pca_ = coords.astype(np.float32)
        self._unit = self._l2(self.reference_pca_)
        self.labels_ = {lv: _clean_labels(reference.obs[lv].to_numpy(), unlabeled) for lv in self.levels}
        self.profiles_: dict[str, tuple[list[str], np.ndarray]] = {}
        for modality, key in (profiles or {}).items():
            frame = log_normalise_frame(reference.obsm[key])
            self.profiles_[modality] = (list(frame.columns), frame.to_numpy(np.float32))
        # One index over the whole reference, then one per labelled group at each deeper level.
        self._root = _CosineIndex(self._unit, np.arange(reference.n_obs))
        self._groups: dict[tuple[str, ...], _CosineIndex] = {}
        for depth in range(1, len(self.levels)):
            path = np.stack([self.labels_[lv] for lv in self.levels[:depth]], axis=1)
            answers = self.labels_[self.levels[depth]]
            for group in {tuple(p) for p in path if "" not in p}:
                rows = np.flatnonzero((path == np.array(group)).all(axis=1))
                if (answers[rows] != "").any():  # somebody here can vote on the next level
                    self._groups[group] = _CosineIndex(self._unit, rows)
        return self

    def _scale(self, dense: np.ndarray) -> np.ndarray:
        z = (dense - self.mean_) / self.std_
        if self.config.max_value is not None:
            np.clip(z, -self.config.max_value, self.config.max_value, out=z)
        return z

    @staticmethod
    def _l2(x: np.ndarray) -> np.ndarray:
        out = np.array(x, dtype=np.float32, order="C", copy=True)
        faiss.normalize_L2(out)
        return out

    # -- mapping ----------------------------------------------------------------------------------

    def transform(self, query: ad.AnnData) -> np.ndarray:
        """The query's coordinates on the reference's principal components (float32 [cells, d])."""
        if self.genes is None:
            raise RuntimeError("fit the baseline on a reference first")
        names = pd.Index(query.var_names.astype(str))
        found = self.genes.get_indexer(names)
        shared = int((found >= 0).sum())
        if shared < self.config.min_fraction * len(self.genes):
            raise ValueError(f"the query holds {shared} of the reference's {len(self.genes)} genes "
                             f"(< {self.config.min_fraction:.0%})")
        counts = sp.csr_matrix(query.X, dtype=np.float32)[:, np.flatnonzero(found >= 0)]
        # Reorder onto the reference's genes; genes the query lacks are zero, as in the atlas.
        aligned = sp.csr_matrix((counts.data, found[found >= 0][counts.indices], counts.indptr),
                                shape=(query.n_obs, len(self.genes)))
        return self.pca_.transform(self._scale(_log_normalised(aligned).toarray())).astype(np.float32)

    def map(self, query: ad.AnnData, *, thresholds: float | Mapping[str, float] | None = None) -> ad.AnnData:
        """Labels, confidences and profile predictions for ``query`` (raw counts in X).

        Returns an AnnData with the query's ``obs_names`` and, per level, ``obs[f"{level}_pred"]``
        (``"unknown"`` when rejected), ``_confidence`` (vote share) and ``_unknown``;
        ``obsm["X_pca"]``; and per fitted profile modality ``obsm[f"{m}_pred"]`` (a DataFrame).
        """
        cfg = self.config
        coords = self.transform(query)
        unit = self._l2(coords)
        n = query.n_obs
        obs = pd.DataFrame(index=pd.Index(query.obs_names.astype(str)))
        sims, rows = self._root.search(unit, cfg.k_coarse)
        coarse_rows = rows
        path = np.empty((n, 0), dtype=object)
        rejected = np.zeros(n, dtype=bool)
        for depth, level in enumerate(self.levels):
            pred = np.full(n, "", dtype=object)
            conf = np.zeros(n, np.float32)
            if depth == 0:
                pred[:], conf[:] = self._vote(level, sims, rows)
            else:
                for key in {tuple(p) for p in path}:
                    members = np.flatnonzero((path == np.array(key, dtype=object)).all(axis=1))
                    index = self._groups.get(key)
                    if index is None:  # no reference cell of this group carries this level
                        continue
                    s, r = index.search(unit[members], cfg.k_fine)
                    pred[members], conf[members] = self._vote(level, s, r)
            threshold = thresholds.get(level) if isinstance(thresholds, Mapping) else thresholds
            rejected = rejected | (pred == "")
            if threshold is not None:
                rejected = rejected | (conf < float(threshold))
            obs[pred_key(level)] = np.where(rejected, UNKNOWN, pred).astype(str)
            obs[confidence_key(level)] = conf
            obs[unknown_key(level)] = rejected
            path = np.concatenate([path, pred[:, None]], axis=1)  # routed by the vote, as the atlas
        result = ad.AnnData(obs=obs)
        result.obsm["X_pca"] = coords
        for modality, (features, values) in self.profiles_.items():
            mean = mean_profile(values, coarse_rows)
            result.obsm[profile_key(modality)] = pd.DataFrame(mean, index=obs.index, columns=features)
        result.uns["baseline"] = {"method": "pca_knn", "n_comps": int(self.pca_.n_components_),
                                  "k_coarse": cfg.k_coarse, "k_fine": cfg.k_fine,
                                  "levels": list(self.levels), "hierarchical": True,
                                  "max_value": cfg.max_value}
        return result

    def _vote(self, level: str, sims: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = np.where(rows >= 0, self.labels_[level][np.maximum(rows, 0)], "")
        return weighted_vote(labels, np.where(rows >= 0, sims, -np.inf), positions=rows)
