"""The label heads of an atlas, applied to query embeddings without the model (numpy).

A build whose model has label heads (:mod:`atlas.models.heads`) writes their weights to
``heads.npz`` in the artifact and lists the levels and class names in the manifest's model
section (``heads: {levels, classes, file}``). Mapping turns a query's embedding into class
probabilities with them, in the driver or the Serve ingress alike: neither needs torch for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HEADS_FILE = "heads.npz"


def head_probabilities(embedding: np.ndarray, weights: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Class probabilities per level ([n, C] float32) from an embedding and each head's
    ``(weight [C, D], bias [C])`` (numpy: the service applies heads without torch)."""
    out = []
    z = np.asarray(embedding, dtype=np.float32)
    for weight, bias in weights:
        logits = z @ np.asarray(weight, dtype=np.float32).T + np.asarray(bias, dtype=np.float32)
        if logits.shape[1] == 0:
            out.append(logits)
            continue
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        out.append((p / p.sum(axis=1, keepdims=True)).astype(np.float32))
    return out


@dataclass(frozen=True)
class Heads:
    """Per level: class names and the linear head ``(weight [C, D], bias [C])``."""

    levels: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]
    weights: tuple[tuple[np.ndarray, np.ndarray], ...]

    def probabilities(self, embedding: np.ndarray) -> dict[str, np.ndarray]:
        """Level → class probabilities [n, C] (columns in :attr:`classes` order); a level whose
        head has no class (no labelled reference cell) is left out."""
        return {lv: p for lv, p in zip(self.levels, head_probabilities(embedding, self.weights)) if p.shape[1]}

    def probability_of(self, level: str, probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The probability each cell's head gives to ``labels`` (0 for a label it has no class for)."""
        classes = self.classes[self.levels.index(level)]
        index = {c: i for i, c in enumerate(classes)}
        codes = np.array([index.get(str(v), -1) for v in labels], dtype=np.int64)
        rows = np.arange(codes.size)
        return np.where(codes >= 0, probabilities[rows, np.maximum(codes, 0)], 0.0).astype(np.float32)


def write_heads(folder: Path, weights: Sequence[tuple[np.ndarray, np.ndarray]], levels: Sequence[str],
                classes: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Save each level's head over the cell embedding, ``(weight [C, D], bias [C])`` (the model's
    ``embedding_head_weights``), to ``folder/heads.npz``; returns the manifest entry."""
    if len(weights) != len(levels):
        raise ValueError(f"{len(weights)} heads for {len(levels)} levels")
    arrays = {}
    for i, (weight, bias) in enumerate(weights):
        arrays[f"weight_{i}"] = np.asarray(weight, dtype=np.float32)
        arrays[f"bias_{i}"] = np.asarray(bias, dtype=np.float32)
        if arrays[f"weight_{i}"].shape[0] != len(classes[i]):
            raise ValueError(f"head {levels[i]} has {arrays[f'weight_{i}'].shape[0]} outputs for {len(classes[i])} classes")
    np.savez(Path(folder) / HEADS_FILE, **arrays)
    return {"levels": list(levels), "classes": [list(c) for c in classes], "file": HEADS_FILE}


def read_heads(root: Path, manifest: Mapping[str, Any]) -> Heads | None:
    """The heads an artifact's manifest lists (None: an atlas without heads)."""
    entry = (manifest.get("model") or {}).get("heads")
    if not entry or "file" not in entry:
        return None
    with np.load(Path(root) / entry["file"]) as data:
        weights = tuple((data[f"weight_{i}"], data[f"bias_{i}"]) for i in range(len(entry["levels"])))
    return Heads(tuple(entry["levels"]), tuple(tuple(c) for c in entry["classes"]), weights)
