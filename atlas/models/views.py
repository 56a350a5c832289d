"""Input views for CVQVAE: what an encoder reads and what a decoder reconstructs.

* :class:`PCAView` — PCA of log-normalised expression (RNA, protein). Fitted once on reference
  count matrices (a random sample of cells is enough), stored as module buffers so the fitted
  projection travels with the model's weights.
* :class:`LSIView` — latent semantic indexing of chromatin accessibility: TF-IDF then truncated
  SVD (no centring), the first component dropped by default because it tracks sequencing depth.
* :class:`LearnedView` — no fitting: a learned sparse input layer (a dense layer over all
  features computed from the non-zeros), and reconstruction of the full feature vector.

Every view applies to index-value batches directly: a projection ``x @ Cᵀ`` is the sum of the
columns of ``C`` for the cell's measured features scaled by their values, so cells are never
densified. ``inverse`` maps a view vector back to feature space (same value scale as the
batches: log-normalised), so a predicted missing modality can name its features.

Fitting uses numpy/scipy only (a seeded randomized SVD, implicit centring, sparse throughout).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from atlas.models.layers import SparseLinear

TARGET_SUM = 1e4  # library size used by the batch pipeline (atlas.data.batches)


def lognorm_counts(csr: sp.spmatrix, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """Library-size normalise each row of a count matrix to ``target_sum`` then log1p (the same
    arithmetic the batch pipeline applies; empty rows stay empty)."""
    csr = sp.csr_matrix(csr, dtype=np.float32, copy=True)
    totals = np.asarray(csr.sum(1)).ravel()
    totals[totals == 0] = 1.0
    csr.data = np.log1p(csr.data * np.repeat(np.float32(target_sum) / totals, np.diff(csr.indptr)))
    return csr


def reference_idf(csr: sp.spmatrix) -> np.ndarray:
    """Inverse document frequency per feature: ``n_cells / (1 + cells with the feature)``."""
    csr = sp.csr_matrix(csr)
    present = np.bincount(csr.indices, minlength=csr.shape[1])
    return (csr.shape[0] / (1.0 + present)).astype(np.float32)


def tfidf_counts(csr: sp.spmatrix, idf: np.ndarray, scale: float = TARGET_SUM) -> sp.csr_matrix:
    """TF-IDF as Signac's method 1: ``log1p(x / row total · idf · scale)``."""
    csr = sp.csr_matrix(csr, dtype=np.float32, copy=True)
    totals = np.asarray(csr.sum(1)).ravel()
    totals[totals == 0] = 1.0
    tf = csr.data / np.repeat(totals, np.diff(csr.indptr))
    csr.data = np.log1p(tf * idf[csr.indices] * np.float32(scale)).astype(np.float32)
    return csr


def randomized_svd(
    x: sp.spmatrix | np.ndarray,
    k: int,
    mean: np.ndarray | None = None,
    n_iter: int = 2,
    oversample: int = 10,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` right singular vectors (``[k, n_features]``) and singular values of
    ``x − 1 meanᵀ`` (Halko et al.), never densifying ``x``."""
    rng = np.random.default_rng(seed)
    n_features = x.shape[1]
    mu = np.zeros(n_features, np.float64) if mean is None else np.asarray(mean, np.float64)

    def a_mul(m: np.ndarray) -> np.ndarray:  # (X − 1 μᵀ) @ m
        return np.asarray(x @ m) - (mu @ m)[None, :]

    def at_mul(m: np.ndarray) -> np.ndarray:  # (X − 1 μᵀ)ᵀ @ m
        return np.asarray(x.T @ m) - np.outer(mu, m.sum(0))

    width = min(k + oversample, min(x.shape))
    q, _ = np.linalg.qr(a_mul(rng.standard_normal((n_features, width))))
    for _ in range(n_iter):
        q, _ = np.linalg.qr(at_mul(q))
        q, _ = np.linalg.qr(a_mul(q))
    b = at_mul(q).T  # [width, n_features] = Qᵀ A
    _, s, vt = np.linalg.svd(b, full_matrices=False)
    # Fix the sign so the fit is reproducible across LAPACK builds.
    signs = np.sign(vt[np.arange(vt.shape[0]), np.abs(vt).argmax(1)])
    return (vt * signs[:, None])[:k], s[:k]


def _sample_rows(csr: sp.spmatrix, max_cells: int | None, seed: int) -> sp.csr_matrix:
    csr = sp.csr_matrix(csr)
    if max_cells is not None and csr.shape[0] > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(csr.shape[0], max_cells, replace=False))
        csr = csr[rows]
    return csr


class _ProjectionView(nn.Module):
    """Shared machinery: ``coords = (Σ_i w_i C[:, id_i] − offset) / scale``."""

    def __init__(self, n_features: int, n_components: int):
        super().__init__()
        self.n_features = n_features
        self.register_buffer("components", torch.zeros(n_components, n_features))
        self.register_buffer("offset", torch.zeros(n_components))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def out_dim(self) -> int:
        return self.components.shape[0]

    def _entry_weights(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return values

    def forward(self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L] ids/values/mask → view coordinates [B, n_components]."""
        if not bool(self.fitted):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() on reference counts")
        w = (self._entry_weights(ids, values.float()) * mask).float()
        proj = F.embedding_bag(ids, self.components.t(), per_sample_weights=w, mode="sum")
        return (proj - self.offset) / self.scale

    def target(self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What a decoder reconstructs for this modality: the same coordinates, no gradient."""
        with torch.no_grad():
            return self.forward(ids, values, mask)

    def _set(self, components: np.ndarray, offset: np.ndarray, coords: np.ndarray) -> None:
        k = self.components.shape[0]
        comp = np.zeros((k, self.n_features), np.float32)
        comp[: components.shape[0]] = components
        off = np.zeros(k, np.float32)
        off[: offset.shape[0]] = offset
        # One global scale so that coordinates have unit variance on average: keeps the
        # reconstruction loss O(1) for both modalities while preserving the components'
        # relative importance (the leading ones still dominate, as they should).
        scale = float(np.sqrt(np.mean(np.var(coords, axis=0)))) or 1.0
        self.components.copy_(torch.from_numpy(comp))
        self.offset.copy_(torch.from_numpy(off))
        self.scale.fill_(scale)
        self.fitted.fill_(True)


class PCAView(_ProjectionView):
    """PCA of log-normalised values (RNA, protein), fitted on reference counts."""

    def __init__(self, n_features: int, n_components: int):
        super().__init__(n_features, n_components)
        self.register_buffer("mean", torch.zeros(n_features))

    @torch.no_grad()
    def fit(self, counts: sp.spmatrix, max_cells: int | None = 50_000, seed: int = 0) -> PCAView:
        """Fit on a raw-count CSR (cells × vocabulary ids) of reference cells."""
        x = lognorm_counts(_sample_rows(counts, max_cells, seed))
        if x.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {x.shape[1]}")
        mean = np.asarray(x.mean(0)).ravel()
        k = min(self.components.shape[0], min(x.shape) - 1)
        comps, _ = randomized_svd(x, k, mean=mean, seed=seed)
        coords = np.asarray(x @ comps.T) - mean @ comps.T
        self.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        self._set(comps, mean @ comps.T, coords)
        return self

    def inverse(self, coords: torch.Tensor) -> torch.Tensor:
        """View coordinates [B, k] → log-normalised values over all features [B, n_features]
        (negative reconstructions clipped to 0, the floor of log1p counts)."""
        x = (coords.float() * self.scale) @ self.components + self.mean
        return x.clamp_min(0.0)


class LSIView(_ProjectionView):
    """LSI of chromatin accessibility: TF-IDF then truncated SVD (no centring).

    Batches carry log-normalised values ``v = log1p(x / total · 1e4)`` by default; since
    ``expm1(v) = x / total · 1e4`` the TF-IDF value ``log1p(expm1(v) · idf)`` is computed per
    entry, exactly what TF-IDF of the raw counts gives. ``values="tfidf"`` when the pipeline
    already delivers TF-IDF values.
    """

    def __init__(
        self, n_features: int, n_components: int, drop_first: bool = True, values: str = "lognorm"
    ):
        super().__init__(n_features, n_components)
        if values not in ("lognorm", "tfidf"):
            raise ValueError(f"values must be 'lognorm' or 'tfidf', got {values!r}")
        self.drop_first = drop_first
        self.values = values
        self.register_buffer("idf", torch.ones(n_features))
        # The least-squares map from view coordinates back to values (see ``inverse``).
        self.register_buffer("inverse_weights", torch.zeros(n_components, n_features))
        self.register_buffer("profile_mean", torch.zeros(n_features))
        self.register_buffer("coord_mean", torch.zeros(n_components))
        self.register_buffer("least_squares", torch.zeros((), dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Views saved before the least-squares inverse existed keep their TF-IDF inverse.
        if prefix + "idf" in state_dict and prefix + "least_squares" not in state_dict:
            for name in ("inverse_weights", "profile_mean", "coord_mean", "least_squares"):
                state_dict[prefix + name] = getattr(self, name).new_zeros(getattr(self, name).shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _entry_weights(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if self.values == "tfidf":
            return values
        return torch.log1p(torch.expm1(values) * self.idf[ids])

    @torch.no_grad()
    def fit(self, counts: sp.spmatrix, max_cells: int | None = 50_000, seed: int = 0) -> LSIView:
        """Fit on a raw-count CSR (cells × vocabulary ids) of reference cells."""
        x = _sample_rows(counts, max_cells, seed)
        if x.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {x.shape[1]}")
        idf = reference_idf(x)
        t = tfidf_counts(x, idf)
        skip = 1 if self.drop_first else 0
        k = min(self.components.shape[0] + skip, min(t.shape) - 1)
        comps, _ = randomized_svd(t, k, seed=seed)
        comps = comps[skip:]
        coords = np.asarray(t @ comps.T)
        self.idf.copy_(torch.from_numpy(idf))
        self._set(comps, np.zeros(comps.shape[0]), coords)
        self._fit_inverse(x, t, coords / float(self.scale))
        return self

    @torch.no_grad()
    def _fit_inverse(self, counts: sp.csr_matrix, tfidf: sp.csr_matrix, coords: np.ndarray) -> None:
        """Least squares from (centred) view coordinates to the batches' values of every peak.

        The TF-IDF inverse (``Σ_k c_k v_k``, clipped at 0) is a poor predictor of accessibility:
        the depth component is dropped, and clipping a shrunken prediction (a decoder's, which
        regresses towards the mean) zeroes most peaks. On MOp's held-out reference libraries the
        measured cells' own coordinates gave per-cell r 0.240 through it but 0.220 through this
        map, and coordinates shrunk 5× towards the mean still 0.160, against 0.110 for the mean
        profile: a prediction is the mean profile plus what the coordinates say about deviations.
        """
        values = tfidf if self.values == "tfidf" else lognorm_counts(counts)
        c = np.asarray(coords, dtype=np.float64)
        c_mean = c.mean(0)
        centred = c - c_mean
        y_mean = np.asarray(values.mean(0), dtype=np.float64).ravel()
        gram = centred.T @ centred
        gram += 1e-6 * np.trace(gram) / max(len(gram), 1) * np.eye(len(gram))  # rank-deficient views
        rhs = np.asarray((values.T @ centred).T, dtype=np.float64)  # centred sums to 0: Cᵀ(Y − ȳ) = CᵀY
        weights = np.linalg.solve(gram, rhs)
        k = self.components.shape[0]
        full = np.zeros((k, self.n_features), np.float32)
        full[: weights.shape[0]] = weights
        mean_c = np.zeros(k, np.float32)
        mean_c[: c_mean.shape[0]] = c_mean
        self.inverse_weights.copy_(torch.from_numpy(full))
        self.profile_mean.copy_(torch.from_numpy(y_mean.astype(np.float32)))
        self.coord_mean.copy_(torch.from_numpy(mean_c))
        self.least_squares.fill_(True)

    def inverse(self, coords: torch.Tensor) -> torch.Tensor:
        """View coordinates → values over all peaks [B, n_features], in the batches' value
        scale (log-normalised, or TF-IDF when ``values="tfidf"``): the reference's mean profile
        plus the least-squares map of the coordinates' deviation from the reference's mean
        (views fitted before that map existed use the TF-IDF inverse)."""
        if bool(self.least_squares):
            return (self.profile_mean + (coords.float() - self.coord_mean) @ self.inverse_weights).clamp_min(0.0)
        t = ((coords.float() * self.scale) @ self.components).clamp_min(0.0)
        if self.values == "tfidf":
            return t
        return torch.log1p(torch.expm1(t) / self.idf)


class LearnedView(nn.Module):
    """Learned sparse input layer; the decoder reconstructs the full feature vector.

    Encoder input: a dense layer over all features computed from the non-zeros
    (:class:`~atlas.models.layers.SparseLinear`). Reconstruction target: the densified
    normalised values ``[B, n_features]``, so ``inverse`` is the identity.
    """

    def __init__(self, n_features: int, n_components: int):
        super().__init__()
        self.n_features = n_features
        self.input = SparseLinear(n_features, n_components)

    @property
    def out_dim(self) -> int:
        return self.n_features

    @property
    def in_dim(self) -> int:
        return self.input.bag.weight.shape[1]

    def forward(self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.input(ids, values, mask)

    def target(self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(ids.shape[0], self.n_features, device=ids.device)
        return dense.scatter_add_(1, ids, (values * mask).float())

    def inverse(self, coords: torch.Tensor) -> torch.Tensor:
        return coords.float().clamp_min(0.0)
