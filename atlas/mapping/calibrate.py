"""Unknown-rejection thresholds, calibrated at build time on held-out reference cells.

A query cell whose confidence (the vote share; with label heads also the head's probability and
the relative similarity, :mod:`atlas.mapping.confidence`) at a level falls below that level's
threshold is flagged
``{level}_unknown``. The threshold is set so that about ``rejection_rate`` of *known* cells —
reference cells mapped as if they were queries — would be rejected: the rate of false "unknown"
calls a user accepts to catch cell types the atlas does not hold.

Held out how: each sampled reference cell is searched against the built index with its own entry
excluded (leave-one-out), through the same coarse-to-fine code the mapper runs. The index is not
rebuilt and the model is not retrained without these cells; their embedding comes from a model
that saw them, so their neighbourhoods are, if anything, a little cleaner than a new query's and
the thresholds a little strict rather than lax. Recorded in the manifest's ``mapping`` section
together with the leave-one-out accuracy per level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from atlas.mapping.confidence import typical_similarity
from atlas.mapping.labels import assign_labels
from atlas.mapping.params import K_COARSE, K_FINE
from atlas.mapping.search import Searcher
from atlas.mapping.vote import balance_weights
from atlas.names import UNKNOWN, confidence_key, pred_key

METHOD = "leave-one-out confidence quantile"


def calibrate_thresholds(
    embeddings: np.ndarray,
    joinids: np.ndarray,
    labels: Mapping[str, np.ndarray],
    searcher: Searcher,
    layout: Any,
    levels: Sequence[str],
    *,
    rejection_rate: float = 0.05,
    max_cells: int = 5000,
    k_coarse: int = K_COARSE,
    k_fine: int = K_FINE,
    seed: int = 0,
    heads: Any = None,
    vote_balance: float = 0.0,
    relative_similarity: bool = True,
    head_inputs: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-level thresholds from up to ``max_cells`` reference cells mapped leave-one-out.

    ``labels``: level → str [n] of the reference cells (``""`` = unlabelled, not used at that
    level); ``heads``: the model's label heads, so the confidence is scored as mapping scores it
    (then also, with ``relative_similarity``, ``typical_similarity``: the first level's label →
    the median similarity of its cells to their ``k_coarse`` nearest other reference cells, which
    puts the cell's distance to the reference into the confidence).
    Returns the manifest's ``mapping`` section: ``thresholds`` (level → float, None when
    no labelled cell was sampled), ``loo_accuracy`` (level → accuracy of the leave-one-out vote
    before rejection), ``rejection_rate``, ``n_cells``, ``k_coarse``, ``k_fine``, ``method`` and,
    with ``vote_balance`` > 0, ``vote_balance`` (``{"power", "counts": level → label → labelled
    reference cells}``: each neighbour's vote is weighted by ``(n_c / n_max) ** -power``, here
    and at mapping) and ``composition`` (level → label → labelled reference cells: the mix
    ``domain_statistics="auto"`` compares a query batch's with). ``head_inputs``: what the heads
    read when the index holds other vectors (rows: the same cells; the embedding of an atlas that
    votes in its profile space).
    """
    if not 0.0 <= rejection_rate < 1.0:
        raise ValueError(f"rejection_rate must be in [0, 1), got {rejection_rate}")
    if not vote_balance >= 0:
        raise ValueError(f"vote_balance must be >= 0 (0: a plain vote), got {vote_balance}")
    n = embeddings.shape[0]
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, max_cells), replace=False))
    queries = np.ascontiguousarray(embeddings[sample], dtype=np.float32)
    exclude = np.asarray(joinids, np.int64)[sample]
    typical = None
    if heads is not None and levels and relative_similarity:  # a supervised embedding: compact types
        first = layout.levels[0] if getattr(layout, "levels", None) else levels[0]
        hits = searcher.search(layout.root.shards, queries, k_coarse, exclude=exclude)
        typical = {"level": first, "k": int(k_coarse),
                   "values": typical_similarity(hits.similarity, np.asarray(labels[first], dtype=str)[sample])}
    balance_entry: dict[str, Any] | None = None
    balance: dict[str, dict[str, float]] | None = None
    counts: dict[str, dict[str, int]] = {}
    for level in levels:
        values, n_cells = np.unique(np.asarray(labels[level], dtype=str), return_counts=True)
        counts[level] = {str(v): int(c) for v, c in zip(values, n_cells) if v != ""}
    if vote_balance > 0 and levels:
        balance_entry = {"power": float(vote_balance), "counts": counts}
        balance = {lv: balance_weights(c, vote_balance) for lv, c in counts.items()}
    probabilities = None
    if heads is not None and head_inputs is not None:
        probabilities = heads.probabilities(np.ascontiguousarray(head_inputs[sample], dtype=np.float32))
    obs, _ = assign_labels(
        queries, np.ones(sample.size, bool), searcher, layout, list(levels), k_coarse=k_coarse, k_fine=k_fine,
        thresholds=None, exclude=exclude, heads=heads, typical=typical, balance=balance, probabilities=probabilities,
    )
    thresholds: dict[str, float | None] = {}
    accuracy: dict[str, float | None] = {}
    for level in levels:
        truth = np.asarray(labels[level], dtype=str)[sample]
        labelled = truth != ""
        if not labelled.any():
            thresholds[level] = accuracy[level] = None
            continue
        conf = obs[confidence_key(level)].to_numpy()[labelled]
        pred = obs[pred_key(level)].to_numpy()[labelled]
        # Strict "<" at mapping time: at most ~rejection_rate of these cells fall below.
        thresholds[level] = float(np.quantile(conf, rejection_rate, method="lower")) if rejection_rate > 0 else 0.0
        accuracy[level] = float(np.mean((pred == truth[labelled]) & (pred != UNKNOWN)))
    return {
        "method": METHOD,
        "rejection_rate": float(rejection_rate),
        "n_cells": int(sample.size),
        "k_coarse": int(k_coarse),
        "k_fine": int(k_fine),
        "thresholds": thresholds,
        "loo_accuracy": accuracy,
        **({"composition": counts} if counts else {}),
        **({"typical_similarity": typical} if typical else {}),
        **({"vote_balance": balance_entry} if balance_entry else {}),
    }
