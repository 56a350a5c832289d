"""Which query batches adapt every normalisation layer (``domain_statistics="auto"``).

Adapting a query batch's *input* normalisation corrects its protocol's scale; adapting the
deeper layers too (``"all"``) also removes what is left of the batch effect, but those layers
normalise learned features whose mean follows the batch's cell-type mix. Where the mix is the
reference's (a whole-blood sample mapped onto a blood atlas) that is the gain: level-1 accuracy
rose 0.95 → 0.98 on three held-out ADTnorm studies; where it is not (a sorted T-cell study) it
re-centres the T cells onto the reference's average cell: 0.78 → 0.40. ``"auto"`` estimates each
batch's mix from the label heads on its input-adapted embedding and adapts every layer only when
that mix overlaps the reference's by at least ``min_mix_overlap`` (default :data:`MIN_OVERLAP`;
overlap = Σ_c min(p_c, q_c), 1 minus the total-variation distance, at the heads' first level).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_OVERLAP = 0.6
"""Least overlap of a batch's estimated cell-type mix with the reference's for every layer to
adapt (chosen on held-out reference studies, ``benchmarks/validate_query_statistics.py``)."""


@dataclass(frozen=True)
class ReferenceMix:
    """The reference's labelled cells per class at the heads' first level (manifest
    ``mapping.composition``), as the frequencies the query's estimate is compared with."""

    level: str
    classes: tuple[str, ...]
    frequencies: np.ndarray

    @classmethod
    def of(cls, manifest: Mapping[str, Any], heads: Any) -> ReferenceMix | None:
        """None when the atlas cannot estimate a query's mix: no label heads, or a manifest from
        before ``mapping.composition`` was written."""
        composition = (manifest.get("mapping") or {}).get("composition") or {}
        if heads is None or not heads.levels or heads.levels[0] not in composition:
            return None
        level = heads.levels[0]
        classes = tuple(heads.classes[0])
        counts = np.array([float(composition[level].get(c, 0)) for c in classes])
        if counts.sum() <= 0:
            return None
        return cls(level, classes, counts / counts.sum())


def batch_mix(probabilities: np.ndarray, codes: np.ndarray, n_domains: int) -> tuple[np.ndarray, np.ndarray]:
    """``(summed class probabilities [n_domains, C], cells [n_domains])`` of the cells of each
    query domain (``codes`` ≥ 0; ``-1`` cells are left out). Sums, so blocks add up."""
    codes = np.asarray(codes, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    keep = codes >= 0
    sums = np.zeros((n_domains, p.shape[1]))
    np.add.at(sums, codes[keep], p[keep])
    return sums, np.bincount(codes[keep], minlength=n_domains).astype(np.int64)


def overlaps(sums: np.ndarray, cells: np.ndarray, reference: ReferenceMix) -> np.ndarray:
    """Per query domain, Σ_c min(its mean class probability, the reference frequency), in [0, 1]
    (0 for a domain without cells)."""
    cells = np.asarray(cells, dtype=np.float64)
    mean = np.divide(sums, cells[:, None], out=np.zeros_like(sums, dtype=np.float64), where=cells[:, None] > 0)
    return np.minimum(mean, reference.frequencies[None, :]).sum(axis=1)


def choose_layers(overlap: np.ndarray, min_overlap: float = MIN_OVERLAP) -> np.ndarray:
    """Which domains adapt every layer (bool per query domain)."""
    return np.asarray(overlap, dtype=np.float64) >= min_overlap


def mix_report(names: list[str], overlap: np.ndarray, deep: np.ndarray, reference: ReferenceMix | None
               ) -> dict[str, dict[str, Any]]:
    """Per batch name: the layers it adapted and its mix's overlap with the reference's."""
    return {n: {"layers": "all" if d else "input", "composition_overlap": round(float(o), 4),
                "composition_level": None if reference is None else reference.level}
            for n, o, d in zip(names, overlap, deep)}


def embed_by_mix(aligned: Any, decode: Mapping[str, str], domains: Any, embed: Any, heads: Any,
                 manifest: Mapping[str, Any], report: dict[str, Any], min_overlap: float = MIN_OVERLAP
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], Any]:
    """``domain_statistics="auto"`` for one query: embed with input statistics, estimate each
    batch's mix with the heads, embed again adapting every layer of the batches whose mix is the
    reference's (skipped when none is). Returns ``(embedding, decoded, the QueryDomains used)``
    and writes each batch's choice into ``report["batches"]``."""
    from atlas.mapping.domains import QueryDomains

    first = QueryDomains(domains.codes, "input")
    emb, decoded = embed(aligned, decode, first)
    reference = ReferenceMix.of(manifest, heads)
    n = domains.n_domains()
    if reference is None:
        overlap, deep = np.full(n, np.nan), np.zeros(n, dtype=bool)
        report["auto"] = "input statistics only: the atlas has no label heads or reference composition to compare with"
    else:
        sums, cells = batch_mix(heads.probabilities(emb)[reference.level], domains.codes, n)
        overlap = overlaps(sums, cells, reference)
        deep = choose_layers(overlap, min_overlap)
    record_choice(report, overlap, deep, reference, min_overlap)
    if not deep.any():
        return emb, decoded, first
    resolved = QueryDomains(domains.codes, "all", tuple(bool(d) for d in deep))
    emb, decoded = embed(aligned, decode, resolved)
    return emb, decoded, resolved


def record_choice(report: dict[str, Any], overlap: np.ndarray, deep: np.ndarray, reference: ReferenceMix | None,
                  min_overlap: float = MIN_OVERLAP) -> None:
    """Add each own-statistics batch's choice to ``report["batches"]`` (in code order: the batches
    with own statistics, by name); the others keep the reference average."""
    batches = report.get("batches", {})
    own = [name for name, b in batches.items() if b.get("own_statistics")]
    report["min_overlap"] = float(min_overlap)
    for name, entry in mix_report(own, overlap, deep, reference).items():
        batches[name].update(entry)
