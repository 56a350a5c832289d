"""Map a query too large for one process onto an atlas with Ray Data, without the service.

::

    query (.h5ad / AnnData-zarr / atlas store)
      │  read tasks: each reads its own block of rows (atlas.mapping.query_source)
      ▼
    map_batches over an actor pool: each actor loads the atlas once (model + shards) and runs
      │  atlas.mapping.map_query on every block — the very code the SDK and the service run
      ▼
    write_parquet: OUTPUT/cells/*.parquet, one row per cell, written by the workers

Ray Data fuses the read into the actor operator (``ReadAtlasQuery->MapBatches(BlockMapper)``),
so an actor reads the block it maps, with no copy through the object store; the written rows
(embedding, labels, predictions) are much smaller than the counts they come from.

The driver reads only shapes and ids up front and, at the end, the label columns of the
written files (streamed, to count labels); it never holds the query or the results, so the
query's size is bounded by the disk, not by memory. Every worker holds a few blocks.

Output folder (assembled beside ``output`` and renamed into place only when complete)::

    OUTPUT/cells/*.parquet   row (int64, position in the query), cell_id (string),
                             {level}_pred (string, "unknown" when rejected), {level}_confidence
                             (float32), {level}_unknown (bool), X_atlas (fixed-size list<float32>,
                             the embedding), {modality}_pred (fixed-size list<float32>, one value
                             per feature of features.json) — pandas: pd.read_parquet("OUTPUT/cells")
    OUTPUT/features.json     {"protein_pred": [feature ids, in list order], ...}
    OUTPUT/summary.json      cells, seconds, cells/s, per-level label counts and unknown
                             fractions, the atlas version, alignment report, parameters

:func:`read_mapping` reads the folder back as the AnnData :func:`~atlas.mapping.map_query`
returns (cells in query order).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from atlas.errors import AtlasError
from atlas.mapping.align import MappingError
from atlas.mapping.domains import describe_domains, domains_report
from atlas.mapping.offline_domains import exact_query_domains
from atlas.mapping.offline_output import (  # noqa: F401 - CELLS_DIR, SUMMARY, read_mapping: public here too
    CELLS_DIR,
    FEATURES,
    FEATURES_KEY,
    SUMMARY,
    count_labels,
    features_of,
    fixed_list,
    json_default,
    read_mapping,
    result_table,
)
from atlas.mapping.offline_progress import MappingProgress
from atlas.mapping.params import MapParams
from atlas.mapping.query_source import (
    QueryBlock,
    QuerySource,
    block_schema,
    block_to_anndata,
    open_query,
    plan_query_blocks,
    read_query_block,
    with_batch_key,
)
from atlas.staging import staged_output

_PREFLIGHT_CELLS = 256


@dataclass
class OfflineSummary:
    """What :func:`map_offline` wrote (also ``OUTPUT/summary.json``)."""

    output: str
    query: str
    atlas_version: str
    cells: int
    seconds: float
    """Wall time of the whole call, the start of Ray's workers included."""
    cells_per_s: float
    blocks: int
    block_cells: int
    actors: int
    levels: dict[str, dict[str, Any]]
    """level → ``labels`` ({label: cells}, most frequent first) and ``unknown_fraction``."""
    predicted: dict[str, int] = field(default_factory=dict)
    """obsm key → number of features (``protein_pred``: 14)."""
    atlas: dict[str, Any] = field(default_factory=dict)
    """What ``uns["atlas"]`` of :func:`~atlas.mapping.map_query` holds (no ``n_no_data``)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Ray Data pieces
# ---------------------------------------------------------------------------------------------


def _read_task(source: QuerySource, block: QueryBlock) -> list[pa.Table]:
    return [read_query_block(source, block)]


class QueryDatasource(Datasource):
    """One Ray Data read task per block of rows of a query (each reads only its rows)."""

    def __init__(self, source: QuerySource, blocks: Sequence[QueryBlock]):
        super().__init__()
        self._source = source
        self._blocks = list(blocks)

    def get_name(self) -> str:
        return "AtlasQuery"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        schema = block_schema(self._source)
        return [
            ReadTask(
                # Each task carries the small source description and its own block only.
                functools.partial(_read_task, self._source, block),
                BlockMetadata(num_rows=block.n_cells, size_bytes=None, input_files=None, exec_stats=None),
                schema=schema,
                per_task_row_limit=per_task_row_limit,
            )
            for block in self._blocks
        ]


class BlockMapper:
    """A Ray Data actor: loads the atlas (model, shards) once, then maps block after block."""

    def __init__(self, atlas_dir: str, features: dict[str, list[str]], params: MapParams, batch_size: int = 1024,
                 use_gpu: bool = False, progress: Any = None, domains: Any = None):
        import torch

        from atlas.artifact import load_atlas
        from atlas.mapping.search import LocalSearcher

        self.atlas = load_atlas(atlas_dir, verify="lazy")
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = self.atlas.model(self.device)
        self.fixed = None
        if domains is not None:  # the whole query's statistics (atlas.mapping.offline_domains)
            from atlas.models.recalibrate import add_query_domains, set_query_statistics

            self.fixed, statistics = domains
            self.model, _ = add_query_domains(self.model, len(self.fixed.names))
            set_query_statistics(self.model, self.fixed.offset, statistics, keep=np.array(self.fixed.own))
        shard_kwargs = {"use_gpu": True} if self.device == "cuda" else {}
        self.searcher = LocalSearcher(self.atlas, **shard_kwargs)
        self.features = features
        self.params = params
        self.batch_size = batch_size
        self.progress = progress

    def __call__(self, table: pa.Table) -> pa.Table:
        from atlas.mapping.query import map_query

        result = map_query(block_to_anndata(table, self.features, self.params.batch_key), self.atlas, self.params,
                           batch_size=self.batch_size, device=self.device, searcher=self.searcher, model=self.model,
                           fixed_domains=self.fixed)
        if self.progress is not None:
            self.progress.add.remote(table.num_rows)  # fire and forget: progress only
        return result_table(result, table.column("row").to_numpy())


def mapping_dataset(source: QuerySource, blocks: Sequence[QueryBlock], atlas_dir: str | os.PathLike,
                    params: MapParams, *, batch_size: int = 1024, actors: int = 1, cpus_per_actor: float = 1.0,
                    use_gpu: bool = False, progress: Any = None, domains: Any = None) -> ray.data.Dataset:
    """The lazy Ray Data pipeline: read tasks over ``blocks`` → mapping actor pool."""
    return ray.data.read_datasource(QueryDatasource(source, blocks), override_num_blocks=len(blocks)).map_batches(
        BlockMapper,
        fn_constructor_kwargs={"atlas_dir": str(Path(atlas_dir).resolve()), "features": source.features,
                               "params": params, "batch_size": batch_size, "use_gpu": use_gpu,
                               "progress": progress, "domains": domains},
        batch_size=None,  # one read block = one call: a worker holds a few blocks, never more
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def init_ray(actors: int, cpus_per_actor: float = 1.0) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (a submitted job), or start a local Ray with a
    logical CPU per actor plus room for the read tasks."""
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        need = int(np.ceil(actors * cpus_per_actor)) + 2
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False)  # as build


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists():
        if output.is_file():
            raise MappingError(f"output {output} is a file; the offline mapper writes a folder — choose another path")
        if any(output.iterdir()) and not overwrite:
            raise MappingError(f"output {output} already exists; choose another folder or pass --overwrite "
                               "(overwrite=True) to replace it")


def _preflight(source: QuerySource, blocks: list[QueryBlock], atlas: Any, options: MapParams
               ) -> tuple[dict[str, Any], list[str] | None, Any]:
    """Fail fast, before any worker starts, on what a user must fix: the query's features,
    species and counts (checked on its first cells), levels, thresholds and options.
    Returns ``(alignment reports, resolved levels or None, resolved thresholds)``."""
    from atlas.mapping.query import prepare_query, resolve_thresholds

    if atlas.layout is None:
        raise MappingError(f"atlas {atlas.version} has no index shards; rebuild it with index levels")
    first = blocks[0]
    head = QueryBlock(first.start, min(first.stop, first.start + _PREFLIGHT_CELLS),
                      None if first.joinids is None else first.joinids[:_PREFLIGHT_CELLS])
    _, _, reports = prepare_query(block_to_anndata(read_query_block(source, head), source.features,
                                                   options.batch_key), atlas, min_fraction=options.min_fraction)
    levels = None
    if atlas.layout.mode == "hierarchy":  # hash layouts name their levels in the shards: actors check
        available = list(atlas.layout.levels)
        levels = list(available if options.levels is None else options.levels)
        missing = [lv for lv in levels if lv not in available]
        if missing:
            raise MappingError(f"atlas {atlas.version} has no label level(s) {missing}; it has {available}")
    else:
        available = list(options.levels or [])
        if isinstance(options.thresholds, Mapping):
            available += list(options.thresholds)
    thresholds = resolve_thresholds(options.thresholds, atlas.manifest, available)
    return reports, levels, thresholds


def _atlas_error(err: BaseException) -> str | None:
    """The message of the user-facing error a worker raised, found in Ray's wrapping of it
    (``RayTaskError(MappingError)`` whose ``cause`` is the worker's own exception)."""
    seen = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, AtlasError) and not isinstance(e, ray.exceptions.RayTaskError):
            # Ray Data appends its retry advice to the message: not the user's business here.
            return str(e).split("\nFailed to apply UDF transform")[0]
        stack += [e.__context__, e.__cause__, getattr(e, "cause", None)]
    return None


def map_offline(
    query: str | os.PathLike,
    atlas_dir: str | os.PathLike,
    output: str | os.PathLike,
    params: MapParams | Mapping[str, Any] | None = None,
    *,
    block_cells: int = 8192,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    batch_size: int = 1024,
    use_gpu: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    **options: Any,
) -> OfflineSummary:
    """Map every cell of a query file onto an atlas with Ray Data; write Parquet + a summary.

    ``query``: an ``.h5ad`` file, an AnnData-zarr folder or an atlas store (see
    :mod:`atlas.mapping.query_source`); it is read ``block_cells`` cells per read task and never
    loaded whole. ``actors`` mapping actors (each ``cpus_per_actor`` CPUs, or a GPU with
    ``use_gpu``) each load the atlas once and run :func:`~atlas.mapping.map_query` on one block
    at a time with the mapping options (:class:`~atlas.mapping.params.MapParams`, as ``params``
    and/or keywords, same meaning as there). Given ``batch_key`` or ``batch`` (and unless
    ``domain_statistics="reference"``) the actors first pass over every block to take each query batch's normalisation statistics
    (:mod:`atlas.mapping.offline_domains`), so the result equals ``map_query`` on the whole
    query whatever the blocks. Results go to
    ``output/cells/*.parquet`` (see the module docstring); read them back with
    :func:`read_mapping`. Ray is started locally unless already initialised or ``RAY_ADDRESS``
    names a cluster (then ``output`` must be on storage every node shares).

    Raises :class:`MappingError` (an :class:`~atlas.errors.AtlasError`) for a missing or
    unreadable query, a query the atlas cannot map, bad options, or an ``output`` that exists
    (unless ``overwrite``); the atlas's own errors are :class:`~atlas.artifact.ArtifactError`.
    """
    from atlas.artifact import load_atlas
    from atlas.mapping.query import model_modalities

    started = time.perf_counter()
    params = MapParams.parse(params, **options)
    output = Path(output)
    _check_output(output, overwrite)
    if actors < 1:
        raise MappingError(f"actors must be ≥ 1, got {actors}")
    atlas = load_atlas(atlas_dir, verify="lazy")
    modalities = model_modalities(atlas.manifest)
    source = open_query(query, modalities)
    if not source.matrices:
        raise MappingError(f"query {query} holds none of the modalities the atlas model uses ({modalities}); "
                           "put RNA counts in X (or layers['counts']) and other modalities in obsm as DataFrames")
    if source.n_cells == 0:
        raise MappingError(f"query {query} has no cells")
    if params.batch_key is not None:
        source = with_batch_key(source, params.batch_key)
    blocks = plan_query_blocks(source, block_cells)
    reports, resolved_levels, resolved_thresholds = _preflight(source, blocks, atlas, params)
    log(f"[map] query {query} ({source.format}): {source.n_cells:,} cells in {len(blocks)} blocks of "
        f"≤ {block_cells:,}; atlas {atlas.version}; {actors} actor(s)"
        + (" on GPU" if use_gpu else f" × {cpus_per_actor:g} CPU"))

    if not ray.is_initialized():
        init_ray(actors, cpus_per_actor)
    context = ray.data.DataContext.get_current()
    before = (context.enable_progress_bars, context.raise_original_map_exception)
    context.enable_progress_bars = False  # ours counts cells; Ray's per-operator bars would interleave
    # A worker's MappingError must reach the caller as one (not as a bare UserCodeException).
    context.raise_original_map_exception = True

    with staged_output(output) as staging:
        tracker = None
        try:
            domains = exact_query_domains(source, blocks, atlas, atlas_dir, params, actors=actors,
                                          cpus_per_actor=cpus_per_actor, batch_size=batch_size, use_gpu=use_gpu,
                                          log=log)
            tracker = MappingProgress(source.n_cells, log) if progress else None
            ds = mapping_dataset(source, blocks, atlas_dir, params, batch_size=batch_size, actors=actors,
                                 cpus_per_actor=cpus_per_actor, use_gpu=use_gpu,
                                 progress=tracker.counter if tracker else None, domains=domains)
            with tracker if tracker else contextlib.nullcontext():
                ds.write_parquet(str((staging / CELLS_DIR).resolve()))
        except Exception as err:
            user_error = _atlas_error(err)
            if user_error is not None:
                raise MappingError(f"mapping failed in a worker: {user_error}") from err
            raise
        finally:
            context.enable_progress_bars, context.raise_original_map_exception = before
            if tracker:
                tracker.close()
        features = features_of(staging / CELLS_DIR)
        (staging / FEATURES).write_text(json.dumps(features, indent=1) + "\n")
        cells, level_counts = count_labels(staging / CELLS_DIR)
        if cells != source.n_cells:
            raise RuntimeError(f"wrote {cells:,} cells for a query of {source.n_cells:,}; the output is incomplete")
        seconds = time.perf_counter() - started
        summary = OfflineSummary(
            output=str(output), query=str(query), atlas_version=atlas.version, cells=cells,
            seconds=round(seconds, 3), cells_per_s=round(cells / seconds, 1), blocks=len(blocks),
            block_cells=block_cells, actors=actors, levels=level_counts,
            predicted={k: len(v) for k, v in features.items()},
            atlas={"version": atlas.version, "alignment": reports,
                   "levels": resolved_levels if resolved_levels is not None else sorted(level_counts),
                   "k_coarse": params.k_coarse, "k_fine": params.k_fine,
                   "thresholds": dict(resolved_thresholds) if isinstance(resolved_thresholds, Mapping)
                   else resolved_thresholds,
                   "predict_method": params.predict_method,
                   "query_domains": domains[0].report if domains is not None else
                   domains_report(params.domain_statistics, params.batch_key, params.batch, params.min_domain_cells)},
        )
        (staging / SUMMARY).write_text(json.dumps(summary.to_dict(), indent=1, default=json_default) + "\n")
    log(format_summary(summary))
    return summary


def format_summary(summary: OfflineSummary, top: int = 5) -> str:
    lines = [f"[map] {summary.cells:,} cells mapped onto atlas {summary.atlas_version} in {summary.seconds:.1f} s "
             f"({summary.cells_per_s:,.0f} cells/s) -> {summary.output}"]
    for level, info in summary.levels.items():
        shown = ", ".join(f"{k} {v:,}" for k, v in list(info["labels"].items())[:top])
        lines.append(f"[map]   {level}: unknown {info['unknown_fraction']:.1%}; {shown}")
    if summary.predicted:
        lines.append("[map]   predicted: " + ", ".join(f"{k} ({n} features)" for k, n in summary.predicted.items()))
    domains = describe_domains(summary.atlas.get("query_domains") or {})
    if domains:
        lines.append(f"[map]   {domains}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reading results back
# ---------------------------------------------------------------------------------------------

