"""``atlas ingest``: validate a source, then append it to the store as one new version.

The order matters. Everything that can be wrong with a source is checked first (ids, columns,
species, counts: the count matrix is scanned block by block), so a bad source never starts a
write. Then a staging tree is made (hard links to the current version, see ``versions.py``),
each modality is registered with ``tiledbsoma.io.register_anndatas`` (existing features keep
their ``soma_joinid``, new ones are appended to the vocabulary), its ``obs``/``var`` rows are
written by ``tiledbsoma.io.from_anndata``, and its counts are written block by block through
the same registration mapping. Only a complete ingest is published; anything else (an error, a
kill) leaves the store exactly as it was.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atlas.store import versions
from atlas.store.ingest_plan import (  # noqa: F401 (OBS_FIXED, DATASETS_KEY: re-exported)
    DATASETS_KEY,
    OBS_FIXED,
    Part,
    StoreState,
    batch_values,
    cells_to_keep,
    check_modality,
    collect_parts,
    decide_species,
    default_dataset_id,
    obs_table,
    quiet,
    read_store_state,
)
from atlas.store.sources import Source, open_source
from atlas.store.validate import (
    DEFAULT_CHUNK_ROWS,
    check_columns,
    check_counts,
    check_dataset_id,
    check_same_cells,
    check_unique,
    row_blocks,
    scan_matrix,
)
from atlas.store.versions import StoreError
from atlas.store.vocabulary import check_compatible

X_LAYER = "counts"
LOCK = versions.LOCK
OBS_WRITE_ROWS = 100_000
"""Cells per obs write (bounds tiledbsoma's write buffers; each write is one obs fragment)."""


@dataclass(frozen=True)
class IngestSummary:
    """What one ingest added to the store."""

    store: str
    version: int
    """The store version this ingest committed."""
    dataset_id: str
    cells_ingested: int
    cells_dropped_empty: int
    """Cells with no non-zero count in any modality (dropped, unless refused)."""
    features: dict[str, int]
    """Features per measurement in this dataset."""
    new_features: dict[str, int]
    """Features this dataset added to each measurement's vocabulary."""
    vocabulary_size: dict[str, int]
    """Each written measurement's vocabulary size after the ingest."""
    cells_per_measurement: dict[str, int]
    """Cells with at least one non-zero count in each measurement (the others lack that modality)."""
    species: str
    notes: tuple[str, ...] = ()
    """What was inferred or cleaned up, in words (the CLI prints these)."""


def ingest(
    store: str | os.PathLike,
    source: str | os.PathLike | Any,
    *,
    modality: str = "rna",
    paired: Mapping[str, str | os.PathLike] | None = None,
    obsm_modalities: dict[str, str] | None = None,
    dataset_id: str | None = None,
    batch_key: str | None = None,
    label_keys: dict[str, str] | None = None,
    unlabeled: tuple[str, ...] | list[str] = (),
    species: str | None = None,
    allow_normalized: bool = False,
    drop_empty_cells: bool = True,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
    tenx_feature_ids: str = "id",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> IngestSummary:
    """Add one dataset (all its modalities) to an atlas store as one new version.

    Args:
        store: the store folder (created on the first ingest).
        source: an .h5ad, AnnData-zarr folder, 10x .h5, 10x mtx folder, or an AnnData object.
        modality: what the source's X holds: ``rna``, ``protein`` or ``atac``.
        paired: other modalities of the same cells in separate files, e.g. ``{"atac": "atac.h5ad"}``;
            their cells must be exactly the source's cells (any order).
        obsm_modalities: modalities held in the source's obsm, e.g. ``{"protein": "protein_counts"}``
            (a DataFrame whose columns name the features).
        dataset_id: the dataset's name in the store (default: the file name without suffix).
        batch_key: obs column with the batch of each cell (default: the dataset is one batch).
        label_keys: label level → obs column, e.g. ``{"cell_type_l1": "coarse_cluster"}``.
        unlabeled: label values that mean "no label" in this source (e.g. ``"undefined"`` for
            cells that were not gated); they are stored as missing (""), not as a class.
        species: ``human`` or ``mouse``; inferred from gene ids when not given.
        allow_normalized: accept non-integer / negative values (NaN/inf are always refused).
        drop_empty_cells: drop cells with no counts in any modality (False: refuse them).
        chunk_size: the most cells read, checked and written at once (bounds memory).
        tenx_feature_ids: for 10x sources, use the feature ``id`` (Ensembl) or ``name`` (symbol).
        progress: show progress bars on stderr.
        log: called with each note (what was inferred or cleaned up).

    Raises:
        StoreError: the source or the options are not acceptable; the store is unchanged.
    """
    store = Path(store)
    notes: list[str] = []

    def say(message: str) -> None:
        notes.append(message)
        if log is not None:
            log(message)

    modality = check_modality(modality, "--modality")
    paired = {check_modality(k, "--paired"): v for k, v in (paired or {}).items()}
    obsm_modalities = {check_modality(k, "--obsm-modality"): v for k, v in (obsm_modalities or {}).items()}
    label_keys = dict(label_keys or {})
    if tenx_feature_ids not in ("id", "name"):
        raise StoreError(f"tenx_feature_ids must be 'id' or 'name', not {tenx_feature_ids!r}")
    if chunk_size < 1:
        raise StoreError(f"chunk size must be at least 1 cell, not {chunk_size}")
    if store.exists() and not store.is_dir():
        raise StoreError(f"{store} is a file, not a store folder; pass a folder path for STORE")
    if store.is_dir() and not versions.is_store(store) and any(p.name != LOCK for p in store.iterdir()):
        raise StoreError(f"{store} exists and is not an atlas store (no {versions.RECORD}); "
                         "pass a new or empty folder, or an existing store")

    opened: list[Source] = []
    try:
        with quiet():
            src = open_source(source, tenx_feature_ids=tenx_feature_ids, modality=modality)
        opened.append(src)
        parts = collect_parts(src, modality, paired, obsm_modalities, tenx_feature_ids, opened)
        dataset_id = dataset_id if dataset_id is not None else default_dataset_id(source)

        # Source-only checks: ids, columns, pairing.
        check_unique(src.obs.index, "cell", f"{src.path}",
                     "make the cell ids unique (adata.obs_names_make_unique()) and ingest again")
        for part in parts:
            check_unique(part.modality.feature_ids, "feature", part.modality.origin,
                         "make the feature ids unique (adata.var_names_make_unique()) or drop the duplicates")
            if part.modality.cell_ids is not src.obs.index:
                check_unique(part.modality.cell_ids, "cell", part.modality.origin,
                             "make the cell ids unique and ingest again")
                check_same_cells(src.obs.index, part.modality.cell_ids, part.modality.name, part.modality.origin)
            part.row_pos = src.obs.index.get_indexer(part.modality.cell_ids)
        check_columns(src.obs, src.path, batch_key=batch_key, label_keys=label_keys)
        batch = batch_values(src, batch_key, dataset_id)

        # Checks against the store's current version.
        state = read_store_state(store)
        check_dataset_id(dataset_id, [d["dataset_id"] for d in state.datasets])
        dataset_species = decide_species(parts, species, state, say)
        for part in parts:
            check_compatible(part.measurement, state.measurements.get(part.measurement, {}),
                             dataset_species, part.namespace)

        # The counts, block by block.
        with _progress(progress) as bar:
            for part in parts:
                m = part.modality
                task = bar.add_task(f"checking {part.measurement}", total=m.matrix.shape[0])
                part.scan = scan_matrix(m.matrix, chunk_size=chunk_size,
                                        on_block=functools.partial(bar.advance, task))
                check_counts(part.scan, m.origin, allow_normalized=allow_normalized)
        keep = cells_to_keep(src, parts, drop_empty_cells, say)

        obs = obs_table(src, keep, dataset_id, batch, label_keys, state, tuple(unlabeled))
        new_levels = [lv for lv in label_keys if lv not in state.label_levels]
        if state.exists and new_levels:
            say(f"new label level(s) {new_levels}: the store's earlier cells get '' (no label) for them")

        return _write(store, parts, obs, keep, dataset_id, dataset_species, new_levels, state,
                      source_name=src.path, batch_key=batch_key, label_keys=label_keys,
                      allow_normalized=allow_normalized, chunk_size=chunk_size, progress=progress,
                      say=say, notes=notes)
    finally:
        for s in opened:
            s.close()


# ---------------------------------------------------------------------------------------------
# Writing


def _write(store: Path, parts: list[Part], obs: pd.DataFrame, keep: np.ndarray, dataset_id: str,
           species: str, new_levels: list[str], state: StoreState, *, source_name: str,
           batch_key: str | None, label_keys: dict[str, str], allow_normalized: bool, chunk_size: int,
           progress: bool, say: Callable[[str], None], notes: list[str]) -> IngestSummary:
    created = not store.exists()
    store.mkdir(parents=True, exist_ok=True)
    with versions.writer_lock(store):
        staging = None
        try:
            # Another ingest may have committed between our checks and the lock: check again.
            latest = read_store_state(store)
            if [d["dataset_id"] for d in latest.datasets] != [d["dataset_id"] for d in state.datasets]:
                check_dataset_id(dataset_id, [d["dataset_id"] for d in latest.datasets])
                raise StoreError(f"{store} changed during the checks; run the ingest again")
            removed = versions.remove_stale_staging(store)
            if removed:
                say(f"removed {len(removed)} unfinished ingest(s) left by an earlier process: {', '.join(removed)}")
            staging = versions.begin_version(store)
            uri = str(staging)
            if state.exists and new_levels:
                _add_label_levels(uri, new_levels)
            written = {}
            with _progress(progress) as bar:
                for i, part in enumerate(parts):
                    written[part.measurement] = _write_measurement(
                        uri, part, obs, keep, existing=state.measurements.get(part.measurement),
                        paired=i > 0, species=species, chunk_size=chunk_size, bar=bar)
            record = {
                "dataset_id": dataset_id,
                "source": source_name,
                "cells": len(obs),
                "measurements": {ms: w["cells"] for ms, w in written.items()},
                "species": species,
                "batch_key": batch_key,
                "label_keys": label_keys,
                "values": "normalized" if allow_normalized else "counts",
                "ingested_at": time.time(),
            }
            _write_dataset_record(uri, state.datasets + [record])
            version = versions.publish_version(store, staging, {
                "dataset_id": dataset_id, "source": source_name, "cells": len(obs),
                "measurements": sorted(written)})
        except BaseException:
            if staging is not None:
                versions.abandon_version(staging)
            if created:
                shutil.rmtree(store, ignore_errors=True)
            raise
    return IngestSummary(
        store=str(store), version=version.version, dataset_id=dataset_id, cells_ingested=len(obs),
        cells_dropped_empty=int((~keep).sum()),
        features={ms: w["features"] for ms, w in written.items()},
        new_features={ms: w["new_features"] for ms, w in written.items()},
        vocabulary_size={ms: w["vocabulary"] for ms, w in written.items()},
        cells_per_measurement={ms: w["cells"] for ms, w in written.items()},
        species=species, notes=tuple(notes),
    )


def _write_measurement(uri: str, part: Part, obs: pd.DataFrame, keep: np.ndarray, *,
                       existing: dict | None, paired: bool, species: str, chunk_size: int,
                       bar: Any) -> dict[str, int]:
    """Register and write one modality of the dataset into the staging Experiment."""
    import anndata as ad
    import pyarrow as pa
    import tiledbsoma as soma
    import tiledbsoma.io as sio

    ms_name = part.measurement
    ids = part.modality.feature_ids.astype(str)
    var = pd.DataFrame({"var_id": ids.to_numpy(dtype=object)}, index=pd.Index(ids))
    var.index.name = None
    with quiet():
        skeleton = ad.AnnData(obs=obs.copy(), var=var)  # ids only: X is written block by block below
        ids_kwargs = dict(obs_id_name="obs_id", var_id_name="var_id", X_layer_name=X_LAYER)
        if existing is None:
            # A measurement the store does not have yet: create its (empty) schema first, so that
            # registration and prepare_experiment find it.
            sio.from_anndata(uri, skeleton, measurement_name=ms_name, ingest_mode="schema_only", **ids_kwargs)
        mapping = sio.register_anndatas(uri, skeleton, measurement_name=ms_name, obs_field_name="obs_id",
                                        var_field_name="var_id", allow_duplicate_obs_ids=paired)
        mapping.prepare_experiment(uri)
        # obs rows are written in slices of cells (the registration covers them all), so that
        # tiledbsoma's write buffers stay bounded for atlases of millions of cells.
        for start in range(0, len(obs), OBS_WRITE_ROWS):
            piece = skeleton[start : start + OBS_WRITE_ROWS]
            sio.from_anndata(uri, ad.AnnData(obs=piece.obs.copy(), var=var.copy()), measurement_name=ms_name,
                             registration_mapping=mapping, **ids_kwargs)
    joinids = mapping.id_mappings_for_anndata(skeleton, measurement_name=ms_name)
    obs_joinids = joinids.obs_axis.data.astype(np.int64)
    var_joinids = joinids.var_axes[ms_name].data.astype(np.int64)
    vocabulary = int(mapping.get_var_shapes()[ms_name])

    # matrix row → soma_joinid of its cell (-1: a dropped empty cell)
    position = np.cumsum(keep) - 1  # source-order cell → row of obs (for kept cells)
    cell = part.row_pos
    rowmap = np.where(keep[cell], obs_joinids[position[cell]], -1)

    matrix = part.modality.matrix
    task = bar.add_task(f"writing {ms_name}", total=matrix.shape[0])
    with soma.Experiment.open(uri, "w") as exp:
        ms = exp.ms[ms_name]
        if existing is None:
            ms.metadata["species"] = species
            ms.metadata["id_namespace"] = part.namespace
        X = ms.X
        if X_LAYER not in X:
            X.add_new_sparse_ndarray(X_LAYER, type=pa.float32(),
                                     shape=(mapping.get_obs_shape(), vocabulary))
        counts = X[X_LAYER]
        for start, stop in row_blocks(matrix, chunk_size):
            block = matrix.rows(start, stop).tocoo()
            rows = rowmap[start + block.row]
            ok = (rows >= 0) & (block.data != 0)  # no explicit zeros: a stored value means "has data"
            if ok.any():
                counts.write(pa.Table.from_pydict({
                    "soma_dim_0": rows[ok],
                    "soma_dim_1": var_joinids[block.col[ok]],
                    "soma_data": block.data[ok].astype(np.float32),
                }))
            bar.advance(task, stop - start)
    cells = int(((part.row_nonzero > 0) & (rowmap >= 0)).sum())
    old = existing["features"] if existing else 0
    return {"features": len(ids), "new_features": vocabulary - old, "vocabulary": vocabulary, "cells": cells}


def _add_label_levels(uri: str, levels: list[str]) -> None:
    """Add label columns to the store's obs (earlier cells get ''), via tiledbsoma.io.update_obs."""
    import tiledbsoma as soma
    import tiledbsoma.io as sio

    with soma.Experiment.open(uri) as exp:
        df = exp.obs.read().concat().to_pandas().sort_values("soma_joinid")
    df = df.drop(columns=["soma_joinid"]).reset_index(drop=True)
    for level in levels:
        df[level] = ""
    with quiet(), soma.Experiment.open(uri, "w") as exp:
        sio.update_obs(exp, df, default_index_name="obs_id")


def _write_dataset_record(uri: str, datasets: list[dict]) -> None:
    import tiledbsoma as soma

    with soma.Experiment.open(uri, "w") as exp:
        exp.metadata[DATASETS_KEY] = json.dumps(datasets)


class _NoProgress:
    def add_task(self, *_a: Any, **_k: Any) -> int:
        return 0

    def advance(self, *_a: Any, **_k: Any) -> None:
        pass


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield _NoProgress()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("cells"), TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        yield bar
