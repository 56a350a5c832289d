"""Stream cells from the atlas store with Ray Data.

``build_plan`` (driver, light) → ``make_dataset`` (a Ray Data dataset whose read tasks each read
one block of cells from SOMA in parallel) → ``iter_batches`` (on a training worker: padded
index-value tensors). Nothing here collects the expression matrix on the driver, and a worker
holds at most a few blocks.

With Ray Train, pass the dataset in ``TorchTrainer(datasets={"train": ds},
dataset_config=ExactlyOnceDataConfig())`` and iterate ``ray.train.get_dataset_shard("train")``
with :func:`iter_batches`: every cell reaches exactly one worker once per epoch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
from pydantic import ConfigDict, with_config
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.data.collate_fn import ArrowBatchCollateFn

from atlas.data.batches import idf_from_counts
from atlas.data.collate import table_to_batch
from atlas.data.plan import ReadPlan, plan_blocks
from atlas.data.reader import open_experiment, output_schema, read_block, read_csr
from atlas.data.snapshot import default_location, ensure_snapshot, epoch_blocks, snapshot_plan
from atlas.store.versions import current_version, is_store

UNKNOWN_DOMAIN = -1
_log = logging.getLogger(__name__)


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True)
class StreamConfig:
    """How cells are streamed to training (stored in the build config)."""

    modalities: tuple[str, ...] = ("RNA",)
    """Measurements read and joined by cell."""
    domain_key: str = "batch"
    """obs column whose values are the domains of domain-specific normalisation (``batch``:
    the dataset id and batch together, since batch names recur across datasets)."""
    batch_size: int = 256
    """Cells per minibatch."""
    block_size: int = 8192
    """Cells per read task; a worker's memory is bounded by a few blocks."""
    shuffle: bool = True
    """Shuffle chunks, blocks, cells within blocks, and (mixed mode) a local buffer."""
    shuffle_chunk_size: int = 1024
    """Consecutive cells kept together when shuffling. TileDB reads cost grows with the number
    of disjoint ranges per read (measured here: 64-cell chunks read ~3x slower than 1024-cell
    chunks), so chunks are large and the local shuffle buffer does the fine mixing."""
    shuffle_buffer: int = 8192
    """Cells in the consumer's local shuffle buffer (mixed mode only)."""
    single_domain: bool | None = None
    """Every minibatch from one domain (Concerto's domain-specific BatchNorm). None: a build
    resolves it from the model (:func:`atlas.train.config.default_single_domain`)."""
    normalization: dict = field(default_factory=dict)
    """Per modality ``log1p`` (default), ``tfidf`` or ``none``."""
    max_features: int | None = None
    """Cap on features per cell (top-k by value); off by default."""
    seed: int = 0
    obs_filter: str | None = None
    """A SOMA value filter on obs selecting the cells (e.g. ``"dataset_id == 'pbmc10k'"``)."""
    snapshot: bool | None = None
    """Shuffled reads come from a preshuffled zarr snapshot of the selected cells
    (:mod:`atlas.data.snapshot`), written on first use and reused while their counts and the
    selection stand, instead of point reads of the store. None: a build resolves it
    (:func:`atlas.build.resolve_snapshot`: on when training on GPUs from a local store); off
    elsewhere."""
    snapshot_dir: str | None = None
    """Where snapshots are written; None: ``STORE/snapshots`` (a local store)."""
    snapshot_chunk_size: int = 512
    """Consecutive snapshot rows kept together when an epoch is re-blocked (reads of a snapshot
    cost little per range, so these can be smaller than ``shuffle_chunk_size``; 256 / 512 / 1,024
    read at 81k / 114k / 135k cells/s per process on the 33k-gene loader benchmark)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.block_size < 1 or self.snapshot_chunk_size < 1:
            raise ValueError("batch_size, block_size and snapshot_chunk_size must be positive")


def resolve_uri(store: str | os.PathLike) -> str:
    """A store folder → the Experiment URI of its current version; a SOMA URI is kept as is."""
    return current_version(store).uri if is_store(store) else str(store)


def select_cells(
    uri: str,
    domain_key: str,
    obs_filter: str | None = None,
    joinids: Sequence[int] | np.ndarray | None = None,
    domain_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Joinids and domain codes of the selected cells (reads two obs columns, not X).

    With ``domain_names`` (a trained model's domains) cells of other domains get code -1.
    """
    exp = open_experiment(uri)
    if domain_key not in exp.obs.schema.names:
        raise KeyError(f"obs has no column {domain_key!r}; columns: {exp.obs.schema.names}")
    # Batch names are only unique within a dataset ("1", "2", ... recur): a batch domain is
    # "<dataset_id>/<batch>".
    columns = ["soma_joinid", domain_key] + (["dataset_id"] if domain_key == "batch" else [])
    obs = exp.obs.read(column_names=columns, value_filter=obs_filter).concat()
    ids = obs.column("soma_joinid").to_numpy()
    values = np.asarray(obs.column(domain_key).to_pylist(), dtype=object).astype(str)
    if domain_key == "batch":
        datasets = np.asarray(obs.column("dataset_id").to_pylist(), dtype=object).astype(str)
        values = np.char.add(np.char.add(datasets, "/"), values)
    if joinids is not None:
        wanted = np.asarray(joinids, dtype=np.int64)
        keep = np.isin(ids, wanted)
        if keep.sum() != np.unique(wanted).size:
            raise KeyError("some requested soma_joinids are not in the store (or not selected by obs_filter)")
        ids, values = ids[keep], values[keep]
    if domain_names is None:
        domain_names = tuple(sorted(set(values.tolist())))
    lookup = {name: code for code, name in enumerate(domain_names)}
    codes = np.array([lookup.get(v, UNKNOWN_DOMAIN) for v in values], dtype=np.int32)
    return ids.astype(np.int64), codes, tuple(domain_names)


def label_codes(
    uri: str, joinids: np.ndarray, levels: Sequence[str], classes: Sequence[Sequence[str]] | None = None
) -> tuple[np.ndarray, tuple[tuple[str, ...], ...]]:
    """Codes ([cells, levels] int32, -1 = no label) of the obs label columns of ``joinids``, and the
    class names of each level (sorted labels present, unless ``classes`` are given)."""
    exp = open_experiment(uri)
    missing = [lv for lv in levels if lv not in exp.obs.schema.names]
    if missing:
        raise KeyError(f"obs has no label column(s) {missing}")
    obs = exp.obs.read(coords=(np.sort(joinids),), column_names=["soma_joinid", *levels]).concat().to_pandas()
    obs = obs.set_index("soma_joinid").loc[joinids]
    codes: np.ndarray = np.full((joinids.size, len(levels)), -1, dtype=np.int32)
    names = []
    for i, level in enumerate(levels):
        values = obs[level].astype(object).where(obs[level].notna(), "").astype(str).to_numpy()
        level_classes = tuple(classes[i]) if classes is not None else tuple(sorted(set(values.tolist()) - {""}))
        lookup = {name: code for code, name in enumerate(level_classes)}
        codes[:, i] = [lookup.get(v, -1) for v in values]
        names.append(level_classes)
    return codes, tuple(names)


def fit_store_idf(uri: str, modality: str, joinids: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Inverse document frequency of every feature over ``joinids``, streamed in chunks."""
    n_features = open_experiment(uri).ms[modality].var.count
    present = np.zeros(n_features, dtype=np.int64)
    for start in range(0, joinids.size, chunk):
        csr = read_csr(uri, modality, np.sort(joinids[start : start + chunk]))
        present += np.bincount(csr.indices, minlength=n_features)
    return idf_from_counts(joinids.size, present)


def build_plan(
    store: str | os.PathLike,
    config: StreamConfig,
    *,
    joinids: Sequence[int] | np.ndarray | None = None,
    domain_names: Sequence[str] | None = None,
    idf: dict | None = None,
    label_levels: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> ReadPlan:
    """Plan the read of the selected cells of a store (its current version, pinned); with
    ``label_levels`` every cell also carries its label codes of those obs columns. With
    ``config.snapshot`` (and shuffling) the plan reads a training snapshot, written first if
    needed (``log`` gets its progress)."""
    uri = resolve_uri(store)
    exp = open_experiment(uri)
    missing = [m for m in config.modalities if m not in exp.ms]
    if missing:
        raise KeyError(f"store has no measurement {missing}; it has {sorted(exp.ms.keys())}")
    ids, codes, names = select_cells(uri, config.domain_key, config.obs_filter, joinids, domain_names)
    if ids.size == 0:
        raise ValueError("no cells selected")
    labels, label_classes = label_codes(uri, ids, label_levels) if label_levels else (None, ())
    block_size = config.block_size
    if config.single_domain:  # whole minibatches per block, so only a domain's last one is short
        block_size = max(config.batch_size, block_size // config.batch_size * config.batch_size)
    blocks = plan_blocks(
        ids,
        codes,
        block_size=block_size,
        shuffle=config.shuffle,
        seed=config.seed,
        single_domain=bool(config.single_domain),
        shuffle_chunk_size=config.shuffle_chunk_size,
        labels=labels,
    )
    idf = dict(idf or {})
    for m in config.modalities:
        if config.normalization.get(m) == "tfidf" and m not in idf:
            idf[m] = fit_store_idf(uri, m, ids)
    plan = ReadPlan(
        uri=uri,
        modalities=tuple(config.modalities),
        blocks=tuple(blocks),
        domain_names=names,
        batch_size=config.batch_size,
        single_domain=bool(config.single_domain),
        normalization=dict(config.normalization),
        idf=idf,
        max_features=config.max_features,
        rows_per_block=min(4096, block_size),
        shuffle=config.shuffle,
        seed=config.seed,
        label_levels=tuple(label_levels),
        label_classes=label_classes,
    )
    if config.snapshot and config.shuffle:
        location = config.snapshot_dir or default_location(uri)
        if location is None:
            raise ValueError(f"data.snapshot: {uri} is not a version of a local atlas store, so there is no "
                             "default place for the training snapshot; give data.snapshot_dir")
        path = ensure_snapshot(plan, location, log=log or _log.info)
        plan = snapshot_plan(plan, path, block_size=block_size, chunk_size=config.snapshot_chunk_size)
    return plan


class SomaCellsDatasource(Datasource):
    """A Ray Data datasource with one read task per block of a :class:`ReadPlan`."""

    def __init__(self, plan: ReadPlan):
        super().__init__()
        self._plan = plan
        self._executions = 0

    def get_name(self) -> str:
        return "SomaCells"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        schema = output_schema(self._plan.modalities, len(self._plan.label_levels))
        blocks = list(self._plan.blocks)
        if self._plan.snapshot is not None:
            # A snapshot is read in contiguous runs, so each epoch re-blocks it from scratch:
            # new chunks in every block, new cells in every minibatch.
            blocks = epoch_blocks(self._plan, self._executions)
        elif self._plan.shuffle:
            # Ray Data plans the read anew for every execution (epoch): give each a new task
            # order, seeded from the plan. (Ray's randomize_block_order would instead hold every
            # block of the epoch in the object store before emitting the first one.)
            rng = np.random.default_rng([self._plan.seed, self._executions])
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        self._executions += 1
        tasks = []
        for block in blocks:
            # Each task carries only its own block, not the whole plan.
            task_plan = replace(self._plan, blocks=(block,))
            meta = BlockMetadata(num_rows=len(block), size_bytes=None, input_files=None, exec_stats=None)
            tasks.append(
                ReadTask(
                    lambda p=task_plan, b=block: read_block(p, b),
                    meta,
                    schema=schema,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks


def make_dataset(plan: ReadPlan, *, read_concurrency: int | None = None) -> ray.data.Dataset:
    """A Ray Data dataset of normalised cells (one row per cell) over a plan."""
    return ray.data.read_datasource(
        SomaCellsDatasource(plan),
        override_num_blocks=len(plan.blocks),
        concurrency=read_concurrency,
    )


class IndexValueCollate(ArrowBatchCollateFn):
    """Collate Arrow blocks into padded index-value tensors on the consuming worker."""

    def __init__(self, modalities: Sequence[str], device: str | torch.device | None = None):
        super().__init__()
        self.modalities = tuple(modalities)
        self.device = device

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        out = table_to_batch(batch, self.modalities)
        if self.device is not None:
            out = {k: v.to(self.device, non_blocking=True) for k, v in out.items()}
        return out


def iter_batches(
    source: ray.data.Dataset | ray.data.DataIterator,
    plan: ReadPlan,
    *,
    epoch: int = 0,
    shuffle_buffer: int = 0,
    seed: int = 0,
    device: str | torch.device | None = None,
    prefetch_batches: int = 2,
) -> Iterator[dict[str, torch.Tensor]]:
    """Minibatches of one epoch from a dataset or a Ray Train dataset shard.

    Single-domain plans slice blocks (which never mix domains) into minibatches, and so do
    snapshot plans; other mixed plans rebatch rows through a local shuffle buffer seeded by
    ``seed + epoch``.
    """
    collate = IndexValueCollate(plan.modalities, device)
    if plan.single_domain or plan.snapshot is not None:
        # A block never spans read tasks, and a read task holds one domain: slicing blocks
        # into minibatches keeps every minibatch single-domain. A snapshot block is already a
        # shuffled sample of the whole selection: no local buffer needed either.
        for block in source.iter_batches(
            batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_batches
        ):
            for start in range(0, block.num_rows, plan.batch_size):
                yield collate(block.slice(start, plan.batch_size))
        return
    yield from source.iter_torch_batches(
        batch_size=plan.batch_size,
        collate_fn=collate,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=(seed + epoch) if shuffle_buffer else None,
        prefetch_batches=prefetch_batches,
    )


def vocabulary_sizes(store: str | os.PathLike, modalities: Sequence[str]) -> dict[str, int]:
    """Size of each modality's feature vocabulary (embedding tables index by var soma_joinid)."""
    exp = open_experiment(resolve_uri(store))
    return {m: int(exp.ms[m].var.count) for m in modalities}


class ExactlyOnceDataConfig(ray.train.DataConfig):
    """Ray Train data config that splits without dropping rows.

    Ray Train's default splits with ``equal=True``, which drops up to ``world_size - 1`` rows
    per epoch; here every cell is seen exactly once per epoch, and the training loop handles
    uneven shards (DDP ``join``).
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output
