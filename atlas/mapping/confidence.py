"""What a mapped cell's confidence is made of, beside the neighbours' vote share.

For an atlas whose model learned the reference labels (label heads), two more signals separate
cells of a type the reference lacks from the rest: the head's probability of the voted label
(:mod:`atlas.mapping.heads`) and how close the cell sits to its nearest reference cells compared
with how close reference cells of the voted type sit to theirs (:func:`relative_similarity`). The
build measures the latter per type on reference cells mapped leave-one-out
(:func:`typical_similarity`, stored in the manifest's ``mapping.typical_similarity``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def neighbour_similarity(similarity: np.ndarray) -> np.ndarray:
    """Mean cosine similarity of each row's found neighbours (missing hits: -inf, skipped; 0 if none)."""
    found = np.isfinite(similarity)
    total = np.where(found, similarity, 0.0).sum(axis=1)
    return np.where(found.any(axis=1), total / np.maximum(found.sum(axis=1), 1), 0.0)


def relative_similarity(closeness: np.ndarray, labels: np.ndarray, typical: Mapping[str, float]) -> np.ndarray:
    """``min(1, closeness / typical[label])`` per cell (1 where the label has no typical value)."""
    reference = np.array([typical.get(str(lv), np.nan) for lv in labels], dtype=np.float64)
    known = np.isfinite(reference) & (reference > 0)
    out = np.ones(closeness.shape[0])
    out[known] = np.clip(closeness[known] / reference[known], 0.0, 1.0)
    return out


def typical_similarity(similarity: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per label (``""`` skipped): the median of :func:`neighbour_similarity` over reference cells
    of that label, from their leave-one-out neighbours ``similarity`` [n, k]."""
    closeness = neighbour_similarity(similarity)
    labels = np.asarray(labels, dtype=str)
    return {str(lv): float(np.median(closeness[labels == lv])) for lv in np.unique(labels) if lv != ""}


def confidence_rule(levels: Sequence[str], heads: Any, typical: Mapping[str, Any] | None) -> dict[str, str]:
    """What each level's confidence is, in words (``uns["atlas"]["confidence"]``)."""
    out = {}
    for lv in levels:
        parts = ["vote share"]
        if heads is not None and lv in heads.levels:
            parts.append("head probability")
        if typical:
            parts.append(f"similarity relative to the {typical['level']} type")
        out[lv] = " x ".join(parts)
    return out
