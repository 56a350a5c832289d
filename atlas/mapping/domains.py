"""Which query cells share normalisation statistics (the query's *domains*).

A Concerto model normalises each reference batch by its own statistics (domain-specific
BatchNorm). A query batch from another study or protocol is shifted the same way, so each query
batch of at least ``min_domain_cells`` cells gets its own exact statistics: for the normalisation
of its measured values (``domain_statistics="input"``), in every layer (``"all"``: see
:func:`atlas.models.recalibrate.with_query_domains` for when that helps and when it harms), or
either per batch by its estimated cell-type mix (``"auto"``, the default,
:mod:`atlas.mapping.composition`); a smaller batch, a cell with no data, or
``domain_statistics="reference"`` uses the average of the reference's. A batch is the query's
``obs[batch_key]`` value, or ``batch`` (one name for the whole query). With neither, no batch is
known and every cell uses the reference average: on held-out reference studies, pooling a sorted
T-cell study with a blood sample as "one batch" cost 2.4 points of level-1 accuracy, while
per-batch statistics gained 0.5. What was done is reported in ``uns["atlas"]["query_domains"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from atlas.errors import MappingError


def batch_labels(adata: Any, batch_key: str | None, batch: str | None = None) -> np.ndarray | None:
    """Each cell's batch name (str): ``obs[batch_key]``, or ``batch`` for every cell; None when
    neither is given (the query's batches are unknown)."""
    if batch_key is None:
        return None if batch is None else np.full(adata.n_obs, batch, dtype=object)
    if batch_key not in adata.obs.columns:
        raise MappingError(f"batch_key {batch_key!r} is not a column of the query's obs; it has "
                           f"{list(adata.obs.columns)[:20]}")
    values = adata.obs[batch_key]
    if values.isna().any():
        raise MappingError(f"obs[{batch_key!r}] has {int(values.isna().sum())} missing value(s); give every cell "
                           "a batch (or map without batch_key)")
    return values.astype(str).to_numpy(dtype=object)


def query_domains(batches: np.ndarray | None, has_data: np.ndarray, *, statistics: str, min_cells: int,
                  batch_key: str | None = None, batch: str | None = None
                  ) -> tuple[QueryDomains | None, dict[str, Any]]:
    """Domain code per cell (``0..q-1``; ``-1``: the reference average) and the report.

    A batch gets its own statistics when ``statistics`` is not ``"reference"`` and at least
    ``min_cells`` of its cells hold data. Returns ``(None, report)`` when no cell gets query
    statistics (``batches`` None: no batch known)."""
    report = domains_report(statistics, batch_key, batch, min_cells)
    if batches is None or len(batches) == 0:
        return None, report
    names, codes = np.unique(np.asarray(batches, dtype=str), return_inverse=True)
    cells = np.bincount(codes, minlength=len(names))
    with_data = np.bincount(codes[has_data], minlength=len(names))
    own = (with_data >= min_cells) & (statistics != "reference")
    renumber = np.full(len(names), -1)
    renumber[own] = np.arange(int(own.sum()))
    domains = np.where(has_data, renumber[codes], -1)
    report["batches"] = {str(n): {"cells": int(c), "own_statistics": bool(o)} for n, c, o in zip(names, cells, own)}
    return (QueryDomains(domains, statistics) if own.any() else None), report


@dataclass(frozen=True)
class QueryDomains:
    """What the encoder needs: each cell's query domain (``-1``: the reference average) and which
    layers adapt (``"input"`` or ``"all"``, see :func:`atlas.models.recalibrate.with_query_domains`;
    ``"auto"``: the encoder chooses per batch by its cell-type mix and returns the domains it
    used, :mod:`atlas.mapping.composition`); ``deep`` (with ``"all"``, bool per query domain;
    None: every one): the domains whose deeper layers adapt too."""

    codes: np.ndarray
    layers: str = "input"
    deep: tuple[bool, ...] | None = None
    min_overlap: float | None = None
    """With ``"auto"`` handed to an encoder: the least mix overlap for every layer to adapt."""
    overlap: tuple[float, ...] | None = None
    """Where an encoder resolved ``"auto"``: each query domain's estimated mix overlap."""

    def n_domains(self) -> int:
        return int(self.codes.max()) + 1 if self.codes.size and self.codes.max() >= 0 else 0


def domains_report(statistics: str, batch_key: str | None, batch: str | None, min_cells: int) -> dict[str, Any]:
    """The ``uns["atlas"]["query_domains"]`` skeleton (``batches``: name → cells, own_statistics;
    empty when no batch is known)."""
    return {"statistics": statistics, "batch_key": batch_key, "batch": batch, "min_cells": int(min_cells),
            "batches": {}}


@dataclass(frozen=True)
class FixedDomains:
    """Query statistics computed beforehand over the whole query (the offline mapper's passes
    over all blocks), for mapping it a block at a time: every block of a batch gets the same
    statistics, so the result does not depend on the blocks. The model the mapper uses must be
    the copy from :func:`atlas.models.recalibrate.add_query_domains` holding them."""

    names: tuple[str, ...]
    """Batch names, in query domain order."""
    own: tuple[bool, ...]
    """Which batches have their own statistics."""
    offset: int
    """The model's code of the first query domain."""
    report: dict[str, Any] = field(default_factory=dict)
    """``uns["atlas"]["query_domains"]`` of the whole query."""

    def codes(self, batches: np.ndarray, has_data: np.ndarray) -> np.ndarray | None:
        """The model's domain code per cell (``-1``: the reference average), or None if all are."""
        lookup = {n: self.offset + i for i, (n, o) in enumerate(zip(self.names, self.own)) if o}
        codes = np.array([lookup.get(str(b), -1) for b in batches], dtype=np.int64)
        codes[~np.asarray(has_data, dtype=bool)] = -1
        return codes if (codes >= 0).any() else None


def describe_domains(report: dict[str, Any]) -> str:
    """One line for a person: which normalisation statistics each query batch got (``""`` when
    no batch was given)."""
    batches = report.get("batches") or {}
    if not batches:
        return ""
    words = {"all": "every layer", "input": "input layer"}
    parts = []
    for name, entry in batches.items():
        if not entry.get("own_statistics"):
            parts.append(f"{name} reference average")
            continue
        layers = entry.get("layers", report.get("statistics"))
        text = f"{name} {words.get(str(layers), str(layers))}"
        if entry.get("composition_overlap") is not None:
            text += f" (mix overlap {entry['composition_overlap']:.2f})"
        parts.append(text)
    return f"query statistics ({report.get('statistics')}): " + ", ".join(parts)
