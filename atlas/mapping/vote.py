"""Similarity-weighted kNN vote and neighbour-mean profiles (pure numpy).

``weighted_vote``: each neighbour votes for its label with weight ``max(similarity, 0)``;
neighbours with the ignored label (``""``: unlabelled reference cell), a missing hit (position
-1, similarity -inf) or a non-finite similarity do not vote. The prediction is the label with the
largest total weight; confidence is its share of the voting weight (in [0, 1]). Ties go to the
label of the most similar neighbour among the tied labels, then to the first label in sorted
order (deterministic). When every voting neighbour has a similarity ≤ 0 the neighbours count
equally. A cell without any voting neighbour gets the ignored label and confidence 0.

``label_weight`` (label → factor, 1 for a label it lacks) also scales each neighbour's vote by its
label's factor: :func:`balance_weights` gives ``(n_c / n_max) ** -power`` from the reference's
cells per label, so a rare type's few cells are not outvoted by an abundant neighbour type.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp


def balance_weights(counts: Mapping[str, int], power: float) -> dict[str, float]:
    """Vote factor per label, ``(n_c / n_max) ** -power`` (0: plain vote, 1: each type's cells
    count as if every type had as many), from the reference's labelled cells per label."""
    have = {str(k): int(v) for k, v in counts.items() if int(v) > 0}
    if not have or power == 0:
        return {k: 1.0 for k in have}
    top = max(have.values())
    return {k: float((v / top) ** -float(power)) for k, v in have.items()}


def weighted_vote(
    neighbor_labels: np.ndarray,
    similarities: np.ndarray,
    ignore: str = "",
    positions: np.ndarray | None = None,
    label_weight: Mapping[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(pred str [n], confidence float32 [n])`` from ``[n, k]`` labels and similarities."""
    labels = np.asarray(neighbor_labels, dtype=str)
    sims = np.asarray(similarities, dtype=np.float64)
    if labels.shape != sims.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and similarities {sims.shape} must be the same [n, k] shape")
    n = labels.shape[0]
    valid = np.isfinite(sims) & (labels != ignore)
    if positions is not None:
        valid &= np.asarray(positions) >= 0
    if n == 0 or labels.shape[1] == 0:
        return np.full(n, ignore, dtype=object).astype(str), np.zeros(n, np.float32)
    weights = np.where(valid, np.clip(np.nan_to_num(sims, neginf=0.0, posinf=0.0), 0.0, None), 0.0)
    total = weights.sum(axis=1)
    flat = valid & (total[:, None] <= 0)  # only non-positive similarities: count neighbours equally
    weights = np.where(flat, 1.0, weights)
    total = weights.sum(axis=1)

    classes, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(labels.shape)
    n_classes = classes.size
    if label_weight:
        factor = np.array([float(label_weight.get(str(c), 1.0)) for c in classes])
        weights = weights * factor[codes]
        total = np.where(valid, weights, 0.0).sum(axis=1)
    rows: np.ndarray = np.repeat(np.arange(n), labels.shape[1])
    score = np.zeros((n, n_classes))
    np.add.at(score, (rows, codes.ravel()), np.where(valid, weights, 0.0).ravel())
    best_sim = np.full((n, n_classes), -np.inf)
    np.maximum.at(best_sim, (rows, codes.ravel()), np.where(valid, sims, -np.inf).ravel())
    best = score.max(axis=1, keepdims=True)
    tied = (score >= best - 1e-9 * np.maximum(best, 1.0)) & (best > 0)
    choice = np.argmax(np.where(tied, best_sim, -np.inf), axis=1)  # first in sorted order on equal sims
    has_vote = valid.any(axis=1)
    pred = np.where(has_vote, classes[choice], ignore).astype(str)
    conf = np.where(has_vote, score[np.arange(n), choice] / np.where(total > 0, total, 1.0), 0.0)
    return pred, np.clip(conf, 0.0, 1.0).astype(np.float32)


def mean_profile(values: np.ndarray | sp.spmatrix, positions: np.ndarray, *,
                 return_counts: bool = False, weights: np.ndarray | None = None
                 ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Mean of the neighbours' rows of ``values`` (``[N, f]`` dense or CSR) → float32 ``[n, f]``.

    ``positions`` ``[n, k]`` are rows of ``values``; -1 (missing hit) is skipped, and so are dense
    rows of NaN (reference cells without a measurement of that modality). A query cell with no
    measured neighbour gets a NaN row. ``weights`` ``[n, k]`` (≥ 0; default 1 each) make it a
    weighted mean. ``return_counts`` also returns the total weight each mean is over (float32
    [n]; with unit weights, how many neighbours).
    """
    pos = np.asarray(positions, dtype=np.int64)
    n, k = pos.shape
    n_features = values.shape[1]
    ok = pos >= 0
    w = np.ones((n, k), np.float32) if weights is None else np.asarray(weights, np.float32)
    if w.shape != (n, k):
        raise ValueError(f"weights have shape {w.shape}, positions {pos.shape}")
    if sp.issparse(values):
        csr = sp.csr_matrix(values)
        rows = np.repeat(np.arange(n), k)[ok.ravel()]
        pick = sp.csr_matrix((w.ravel()[ok.ravel()], (rows, pos.ravel()[ok.ravel()])),
                             shape=(n, csr.shape[0]))
        counts = np.where(ok, w, 0).sum(axis=1).astype(np.float32)
        sums = np.asarray((pick @ csr).todense(), dtype=np.float32)
    else:
        dense = np.asarray(values, dtype=np.float32)
        gathered = dense[np.where(ok, pos, 0)]  # [n, k, f]
        measured = ok & ~np.isnan(gathered).all(axis=2)
        gathered = np.where(measured[:, :, None], np.nan_to_num(gathered, nan=0.0), 0.0)
        sums = (gathered * w[:, :, None]).sum(axis=1, dtype=np.float32)
        counts = np.where(measured, w, 0).sum(axis=1).astype(np.float32)
    out = np.full((n, n_features), np.nan, dtype=np.float32)
    has = counts > 0
    out[has] = sums[has] / counts[has, None]
    return (out, counts) if return_counts else out
