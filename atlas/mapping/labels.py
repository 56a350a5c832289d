"""Vote each query cell's labels, level by level, from its nearest reference cells.

Hierarchy: every cell is searched in the ``coarse`` shard (``k_coarse`` neighbours) to vote the
first level; it then goes to the fine shard of its predicted level-1 group (``k_fine``
neighbours) to vote level 2, and so on. A cell is routed by its voted label even when that label
is rejected as unknown (its deeper votes are still computed), but a cell unknown at a level is
unknown at every deeper level. A cell whose voted group has no deeper shard (no reference cell
there carries the next level) is unknown at the deeper levels. A hash layout votes every level
from the same neighbours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from atlas.mapping.confidence import neighbour_similarity, relative_similarity
from atlas.mapping.heads import Heads
from atlas.mapping.params import K_COARSE, K_FINE
from atlas.mapping.search import Hits, Searcher, SearchRequest, search_all
from atlas.mapping.vote import weighted_vote
from atlas.names import UNKNOWN, confidence_key, level_keys, pred_key, unknown_key


def _threshold(thresholds: float | Mapping[str, float] | None, level: str) -> float | None:
    if thresholds is None:
        return None
    if isinstance(thresholds, Mapping):
        value = thresholds.get(level)
        return None if value is None else float(value)
    return float(thresholds)


def assign_labels(emb: np.ndarray, has_data: np.ndarray, searcher: Searcher, layout: Any,
                  levels: Sequence[str], *, k_coarse: int = K_COARSE, k_fine: int = K_FINE,
                  thresholds: float | Mapping[str, float] | None = None,
                  exclude: np.ndarray | None = None, heads: Heads | None = None,
                  typical: Mapping[str, Any] | None = None,
                  balance: Mapping[str, Mapping[str, float]] | None = None,
                  probabilities: Mapping[str, np.ndarray] | None = None) -> tuple[pd.DataFrame, Hits]:
    """Vote every level of ``levels`` (coarse → fine in a hierarchy; flat for hash layouts).

    Returns the obs columns (``{level}_pred``, ``_confidence``, ``_unknown``; default index)
    and the coarse hits (profiles and reported neighbours use them). ``exclude``: leave-one-out
    (each query is a reference cell whose own ``soma_joinid`` is skipped).

    With the atlas's label ``heads``, a level's confidence is the vote share times the
    probability the head gives the voted label; with ``typical`` (``{"level", "values": {label:
    similarity}}``: how similar reference cells of each type are to their own nearest neighbours)
    it is also scaled by ``min(1, s / typical[label])``, ``s`` the cell's mean similarity to its
    ``k_coarse`` nearest reference cells. Neighbours of a type the reference lacks agree on one
    wrong label (a high vote share); the head is less sure of it and the cell sits farther from
    that type's cells than they sit from each other. Leave-one-type-out validation on the
    reference (``benchmarks/validate_heads.py``): AUROC 0.90 against 0.59 for the vote share alone.

    ``balance`` (level → label → vote factor, :func:`~atlas.mapping.vote.balance_weights`)
    weights each neighbour's vote by how rare its label is in the reference. ``probabilities``:
    ``heads.probabilities(emb)`` when the caller already has them (computed here otherwise).
    """
    balance = balance or {}
    n = emb.shape[0]
    root = layout.root
    obs = pd.DataFrame(index=pd.RangeIndex(n))
    coarse = searcher.search(root.shards, emb, k_coarse, exclude=exclude)
    if probabilities is None:
        probabilities = heads.probabilities(emb) if heads is not None else {}
    closeness: np.ndarray = np.zeros(n)
    relative_to: dict[str, float] | None = None
    if typical:
        closeness = neighbour_similarity(coarse.similarity)
        relative_to = {str(k): float(v) for k, v in typical["values"].items()}
    factor = np.ones(n)

    def decide(level: str, pred: np.ndarray, conf: np.ndarray, rejected: np.ndarray) -> np.ndarray:
        nonlocal factor
        threshold = _threshold(thresholds, level)
        rejected = rejected | (pred == "") | ~has_data
        if heads is not None and level in probabilities:
            conf = conf * heads.probability_of(level, probabilities[level], pred)
        if relative_to is not None and typical is not None and level == typical["level"] and layout.mode == "hierarchy":
            factor = relative_similarity(closeness, pred, relative_to)
        conf = conf * factor
        conf = np.where(has_data, conf, 0.0)  # a cell with no counts carries no evidence for any label
        if threshold is not None:
            rejected = rejected | (conf < threshold)
        obs[pred_key(level)] = np.where(rejected, UNKNOWN, pred).astype(str)
        obs[confidence_key(level)] = conf.astype(np.float32)
        obs[unknown_key(level)] = rejected
        return rejected

    if layout.mode != "hierarchy":  # hash layout: every level voted from the same neighbours
        if relative_to is not None and typical is not None and typical["level"] in coarse.labels:
            first, _ = weighted_vote(coarse.labels[typical["level"]], coarse.similarity, positions=coarse.position,
                                     label_weight=balance.get(typical["level"]))
            factor = relative_similarity(closeness, first, relative_to)
        for level in levels:
            pred, conf = weighted_vote(coarse.labels[level], coarse.similarity, positions=coarse.position,
                                       label_weight=balance.get(level))
            decide(level, pred, conf, np.zeros(n, bool))
        return obs, coarse

    depth_levels = list(layout.levels[: max((layout.levels.index(lv) for lv in levels), default=-1) + 1])
    node_of = np.full(n, root.name, dtype=object)
    parent_unknown = np.zeros(n, dtype=bool)
    for depth, level in enumerate(depth_levels):
        pred = np.full(n, "", dtype=object)
        conf = np.zeros(n, np.float32)
        routed = node_of != None  # noqa: E711
        groups = [np.flatnonzero(node_of == name) for name in pd.unique(node_of[routed])]
        if depth == 0:
            found = [coarse]  # every cell sits at the root: one group, the coarse hits as they are
        else:  # every node's search at once: the service's shard replicas answer them in parallel
            found = search_all(searcher, [
                SearchRequest(layout.node(node_of[rows[0]]).shards, emb[rows], k_fine,
                              exclude=None if exclude is None else exclude[rows]) for rows in groups])
        for rows, hits in zip(groups, found):
            p, c = weighted_vote(hits.labels[level], hits.similarity, positions=hits.position,
                                 label_weight=balance.get(level))
            pred[rows], conf[rows] = p, c
        parent_unknown = decide(level, pred.astype(str), conf, ~routed | parent_unknown)
        if depth + 1 < len(depth_levels):
            nxt = np.full(n, None, dtype=object)
            for node_name in pd.unique(node_of[routed]):
                rows = np.flatnonzero(node_of == node_name)
                for value in pd.unique(pred[rows]):
                    child = layout.child(node_name, value) if value else None
                    if child is not None:
                        nxt[rows[pred[rows] == value]] = child.name
            node_of = nxt
    drop = [c for lv in depth_levels if lv not in levels for c in level_keys(lv)]
    return obs.drop(columns=drop), coarse
