"""The read plan: which cells each read task reads, in which order.

A plan is a plain, picklable value computed once on the driver from the cells' ``soma_joinid``
and domain codes (a few bytes per cell, never the expression matrix). Ray Data turns every
:class:`ReadBlock` into one read task; tests inspect plans without Ray.

Shuffling works at two levels, as in tiledbsoma-ml: the selected cells are cut into small
chunks of consecutive joinids (so a read touches few TileDB tiles), chunks are permuted
(seeded), grouped into blocks, and cells are permuted inside each block. The consumer adds a
local shuffle buffer across blocks. In *single-domain* mode chunks never mix domains, each
block holds one domain, and read tasks emit minibatches of that domain only (Concerto's
domain-specific normalisation needs them). A plan over a training snapshot
(:mod:`atlas.data.snapshot`) is re-blocked every epoch instead, from snapshot rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LABELS = "labels"
"""Column (Arrow) and key (batch dict) of a cell's label codes, one per label level (-1: no label)."""


@dataclass(frozen=True)
class ReadBlock:
    """The cells of one read task."""

    joinids: np.ndarray
    """``soma_joinid`` of the cells, in the order the task yields them (int64)."""
    domains: np.ndarray
    """Domain code of each cell (int32), aligned with ``joinids``."""
    labels: np.ndarray | None = None
    """Label code of each cell per label level (int32 [cells, levels], -1: no label), or None."""
    rows: np.ndarray | None = None
    """The cells' rows in the plan's training snapshot (:mod:`atlas.data.snapshot`), or None."""

    def __len__(self) -> int:
        return int(self.joinids.size)


@dataclass(frozen=True)
class ReadPlan:
    """Everything a read task needs, and nothing that depends on Ray."""

    uri: str
    """The TileDB-SOMA Experiment of one committed store version."""
    modalities: tuple[str, ...]
    """Measurements to read and join by cell (e.g. ``("RNA", "protein")``)."""
    blocks: tuple[ReadBlock, ...]
    """One entry per read task."""
    domain_names: tuple[str, ...]
    """Domain name of each domain code (the values of the obs domain column)."""
    batch_size: int
    """Cells per minibatch (read tasks emit whole minibatches in single-domain mode)."""
    single_domain: bool = False
    """Every emitted block (and so every minibatch) holds cells of one domain."""
    normalization: dict = field(default_factory=dict)
    """Per modality: ``"log1p"`` (library size to 1e4, then log1p), ``"tfidf"`` or ``"none"``."""
    idf: dict = field(default_factory=dict)
    """Per modality using TF-IDF: the reference's inverse document frequency per feature."""
    max_features: int | None = None
    """Keep only the top-k values of each cell (per modality); ``None`` keeps all."""
    rows_per_block: int = 4096
    """Cells per emitted Arrow block in mixed mode (bounds a worker's memory)."""
    shuffle: bool = False
    """Whether blocks were shuffled (the dataset then also randomises block order per epoch)."""
    seed: int = 0
    """Seed of the block shuffle and of the per-epoch block order."""
    label_levels: tuple[str, ...] = ()
    """obs columns whose codes the blocks carry (supervised heads); empty: no labels read."""
    label_classes: tuple[tuple[str, ...], ...] = ()
    """Class name of each label code, per level."""
    snapshot: str | None = None
    """A training snapshot folder (:mod:`atlas.data.snapshot`) the blocks read instead of ``uri``."""
    snapshot_chunk: int = 512
    """Consecutive snapshot rows kept together when a snapshot plan is re-blocked each epoch."""
    snapshot_block: int = 8192
    """Cells per read block of a snapshot plan."""

    @property
    def n_cells(self) -> int:
        return sum(len(b) for b in self.blocks)


def _chunks(ids: np.ndarray, size: int) -> list[np.ndarray]:
    return [ids[i : i + size] for i in range(0, ids.size, size)]


def plan_blocks(
    joinids: np.ndarray,
    domains: np.ndarray,
    *,
    block_size: int,
    shuffle: bool,
    seed: int = 0,
    single_domain: bool = False,
    shuffle_chunk_size: int = 1024,
    labels: np.ndarray | None = None,
) -> list[ReadBlock]:
    """Split cells into read blocks (see the module docstring for the shuffle scheme);
    ``labels`` ([cells, levels] codes aligned with ``joinids``) travel with their cells."""
    joinids = np.asarray(joinids, dtype=np.int64)
    domains = np.asarray(domains, dtype=np.int32)
    if joinids.shape != domains.shape:
        raise ValueError("joinids and domains must have the same length")
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int32).reshape(joinids.size, -1)
    if np.unique(joinids).size != joinids.size:
        raise ValueError("a cell appears twice in the selection")
    order = np.argsort(joinids, kind="stable")
    joinids, domains = joinids[order], domains[order]
    if labels is not None:
        labels = labels[order]
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(domains == d) for d in np.unique(domains)] if single_domain else [
        np.arange(joinids.size)
    ]
    blocks: list[ReadBlock] = []
    for positions in groups:
        if shuffle:
            chunks = _chunks(positions, shuffle_chunk_size)
            positions = np.concatenate([chunks[i] for i in rng.permutation(len(chunks))])
        for block in _chunks(positions, block_size):
            if shuffle:
                block = block[rng.permutation(block.size)]
            blocks.append(ReadBlock(joinids=joinids[block], domains=domains[block],
                                    labels=None if labels is None else labels[block]))
    if shuffle:
        blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    return blocks

