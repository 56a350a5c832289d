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


def mix_chooser(heads: Any, reference: ReferenceMix, min_overlap: float = MIN_OVERLAP) -> Any:
    """``choose(embedding, codes, n_domains) -> (overlap, deep)``: each query domain's mix
    estimated by the heads on its input-statistics embedding, and whether it adapts every layer
    (what :func:`atlas.mapping.embedding.embed_auto` asks)."""

    def choose(emb: np.ndarray, codes: np.ndarray, n_domains: int) -> tuple[np.ndarray, np.ndarray]:
        sums, cells = batch_mix(heads.probabilities(emb)[reference.level], codes, n_domains)
        overlap = overlaps(sums, cells, reference)
        return overlap, choose_layers(overlap, min_overlap)

    return choose


def embed_by_mix(aligned: Any, decode: Mapping[str, str], domains: Any, embed: Any, heads: Any,
                 manifest: Mapping[str, Any], report: dict[str, Any], min_overlap: float = MIN_OVERLAP
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], Any]:
    """``domain_statistics="auto"`` for one query: one call of ``embed`` (the encoder embeds with
    input statistics, estimates each batch's mix with the heads and adapts every layer of the
    batches whose mix is the reference's, :func:`atlas.mapping.embedding.embed_auto`), or input
    statistics where the atlas cannot estimate a mix. Returns ``(embedding, decoded, the
    QueryDomains used)`` and writes each batch's choice into ``report["batches"]``."""
    from atlas.mapping.domains import QueryDomains

    reference = ReferenceMix.of(manifest, heads)
    n = domains.n_domains()
    if reference is None:
        emb, decoded, used = embed(aligned, decode, QueryDomains(domains.codes, "input"))
        report["auto"] = "input statistics only: the atlas has no label heads or reference composition to compare with"
        record_choice(report, np.full(n, np.nan), np.zeros(n, dtype=bool), None, min_overlap)
        return emb, decoded, used
    emb, decoded, used = embed(aligned, decode, QueryDomains(domains.codes, "auto", min_overlap=min_overlap))
    if used.overlap is None or len(used.overlap) != n:
        raise RuntimeError(f"the encoder resolved domain_statistics='auto' without an overlap for each of {n} batches")
    deep = np.zeros(n, dtype=bool) if used.deep is None else np.asarray(used.deep, dtype=bool)
    record_choice(report, np.asarray(used.overlap), deep, reference, min_overlap)
    return emb, decoded, used


def record_choice(report: dict[str, Any], overlap: np.ndarray, deep: np.ndarray, reference: ReferenceMix | None,
                  min_overlap: float = MIN_OVERLAP) -> None:
    """Add each own-statistics batch's choice to ``report["batches"]`` (in code order: the batches
    with own statistics, by name); the others keep the reference average."""
    batches = report.get("batches", {})
    own = [name for name, b in batches.items() if b.get("own_statistics")]
    report["min_overlap"] = float(min_overlap)
    for name, entry in mix_report(own, overlap, deep, reference).items():
        batches[name].update(entry)
