"""Every name the outputs and the wire share, declared once.

A mapped AnnData (offline, served, or read back from the offline job's Parquet) has, per label
level, the obs columns :func:`pred_key`, :func:`confidence_key` and :func:`unknown_key`; the
embedding in ``obsm[EMBEDDING]``; per predicted modality ``obsm[profile_key(m)]`` (and
``obsm[decoder_key(m)]`` when both kNN and the decoder predicted it); with label heads, per
level the class probabilities in ``obsm[probabilities_key(level)]``. Build code writes the
reference embedding back to the store as ``obsm[store_embedding(name)]`` of the first modality.
Nothing here imports anything heavy: the SDK, the service and the benchmarks use it.
"""

from __future__ import annotations

MODALITIES = ("RNA", "protein", "ATAC")
"""Measurement names, in canonical order."""

UNKNOWN = "unknown"
"""The label of a rejected cell (below its level's threshold, no data, or no parent)."""

EMBEDDING = "X_atlas"
"""obsm key of a mapped cell's embedding."""

NEIGHBORS_JOINID = "atlas_neighbors_soma_joinid"
NEIGHBORS_SIMILARITY = "atlas_neighbors_similarity"
NEIGHBORS_UNS = "atlas_neighbors"

_PRED, _CONFIDENCE, _UNKNOWN = "_pred", "_confidence", "_unknown"


def pred_key(level: str) -> str:
    """obs column of the predicted label of ``level`` (``UNKNOWN`` when rejected)."""
    return f"{level}{_PRED}"


def confidence_key(level: str) -> str:
    """obs column of the confidence in [0, 1] behind :func:`pred_key`."""
    return f"{level}{_CONFIDENCE}"


def unknown_key(level: str) -> str:
    """obs column (bool): the cell was rejected at ``level``."""
    return f"{level}{_UNKNOWN}"


def level_keys(level: str) -> tuple[str, str, str]:
    """The three obs columns of one level, in output order."""
    return pred_key(level), confidence_key(level), unknown_key(level)


def level_of(column: str, kind: str = "pred") -> str | None:
    """The level a ``kind`` (``pred`` / ``confidence`` / ``unknown``) column belongs to, else None."""
    suffix = {"pred": _PRED, "confidence": _CONFIDENCE, "unknown": _UNKNOWN}[kind]
    return column[: -len(suffix)] if column.endswith(suffix) and len(column) > len(suffix) else None


def is_level_column(column: str) -> bool:
    """True for any of the per-level obs columns."""
    return any(level_of(column, kind) is not None for kind in ("pred", "confidence", "unknown"))


def probabilities_key(level: str) -> str:
    """obsm key (a DataFrame, one column per class) of the label heads' class probabilities at
    ``level`` (atlases whose model has heads; NaN rows for cells without counts)."""
    return f"{level}_probabilities"


def profile_key(modality: str) -> str:
    """obsm key of a modality predicted from the reference (kNN mean, or the decoder alone)."""
    return f"{modality}{_PRED}"


def decoder_key(modality: str) -> str:
    """obsm key of the decoder's prediction when kNN predicted the same modality too."""
    return f"{modality}{_PRED}_decoder"


def csr_columns(modality: str) -> tuple[str, str]:
    """The two list columns holding one modality's sparse values per cell, in every Arrow table
    of cells (store reads, training batches, query blocks): ``(feature ids, values)``."""
    return f"{modality}_ids", f"{modality}_values"


def store_embedding(build_name: str) -> str:
    """obsm name under which a build writes its reference embedding back to the store."""
    return f"atlas_{build_name}"
