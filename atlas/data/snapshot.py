"""A preshuffled training snapshot of a store version, in zarr: what training streams from.

The store stays the source of truth, but a shuffled read of TileDB-SOMA is bound by point
reads (≈18,000 cells per CPU-second on this project's 2-core machine; the loader benchmark),
while a shuffled epoch only needs *some* random order. A snapshot holds the cells a build
selected, **already normalised** as read tasks emit them (``log1p``, TF-IDF with the plan's
idf, top-k), in one seeded random order grouped by domain, as CSR arrays in a zarr group::

    SNAPSHOT/
      zarr.json               attributes: format, source URI, modalities, domain codes and row
                              ranges, label levels, how many cells, seed; ``complete``
      soma_joinid, domain     int64 / int32 [cells], snapshot row order
      labels                  int32 [cells, levels] (only with label levels)
      {m}/indptr              int64 [cells + 1]
      {m}/indices, {m}/values int32 / float32 [non-zeros], chunks of 2^17 entries, LZ4

Because the rows are already in random order, a read task reads a few *contiguous* row ranges
(cheap: one decompression per chunk, no per-cell lookup), and each epoch still sees a new order:
the datasource cuts the rows into chunks, permutes them, groups them into blocks and permutes the
cells of each block, seeded by the epoch (:func:`epoch_blocks`). Domains occupy contiguous row
ranges, so single-domain minibatches come out as before.

A snapshot is named by a hash of what it holds (the count matrix's TileDB fragments, modalities,
normalisation, idf, top-k, the selected cells with their domains and label codes, the shuffle
seed) and is written once, under ``STORE/snapshots/``, then reused by every build over the same
cells and counts — including the next version, which a build's embedding write-back creates
without touching the counts. It is written to a temporary folder and renamed into place; a
folder without ``complete`` (a killed write) is never read. Snapshots are a cache: deleting
``STORE/snapshots`` loses nothing (the next build that asks for one writes it again).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from atlas.data.plan import LABELS, ReadBlock, ReadPlan, plan_blocks
from atlas.errors import AtlasError
from atlas.names import csr_columns

FORMAT = 1
SNAPSHOTS = "snapshots"
CHUNK_ENTRIES = 1 << 17
WRITE_BLOCK = 65536
"""Cells per TileDB read while writing (sorted point reads of a random subset)."""
STALE_WRITE_S = 24 * 3600
"""A ``.writing-*`` folder older than this is a killed write's and is removed."""


def _local_version(uri: str) -> Path | None:
    if "://" in uri and not uri.startswith("file://"):
        return None
    version = Path(uri.removeprefix("file://"))
    return version if version.parent.name == "versions" else None


def default_location(uri: str) -> Path | None:
    """``STORE/snapshots`` for a version of a local atlas store (None for a remote URI, or an
    Experiment that is not a version of an atlas store)."""
    version = _local_version(uri)
    return None if version is None else version.parent.parent / SNAPSHOTS


def _fragments(uri: str, modality: str) -> list[str]:
    """The TileDB fragments of a local version's count matrix: what its values are made of.
    Versions share fragments by hard links, so two versions with the same list (e.g. before and
    after a build writes its embedding back) hold the same counts."""
    version = _local_version(uri)
    folder = None if version is None else version / "ms" / modality / "X" / "counts" / "__fragments"
    return sorted(os.listdir(folder)) if folder is not None and folder.is_dir() else [uri]


def snapshot_key(plan: ReadPlan, seed: int) -> str:
    """A name for what the snapshot of ``plan``'s cells holds (not how it is later blocked): the
    count fragments, normalisation, idf, top-k, the selected cells with their domains and label
    codes, and the shuffle seed."""
    h = hashlib.sha256()
    h.update(repr((FORMAT, plan.modalities, [_fragments(plan.uri, m) for m in plan.modalities],
                   sorted(plan.normalization.items()), plan.max_features, plan.label_levels, plan.label_classes,
                   plan.domain_names, int(seed))).encode())
    for modality in sorted(plan.idf):
        h.update(modality.encode())
        h.update(np.ascontiguousarray(plan.idf[modality], np.float32).tobytes())
    joinids, domains, labels = _cells(plan)
    order = np.argsort(joinids, kind="stable")
    h.update(joinids[order].tobytes())
    h.update(domains[order].tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels[order]).tobytes())
    return h.hexdigest()[:24]


def _cells(plan: ReadPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    joinids = np.concatenate([b.joinids for b in plan.blocks]).astype(np.int64)
    domains = np.concatenate([b.domains for b in plan.blocks]).astype(np.int32)
    labels = None
    if plan.label_levels:
        labels = np.concatenate([b.labels for b in plan.blocks if b.labels is not None]).astype(np.int32)
    return joinids, domains, labels


def snapshot_order(joinids: np.ndarray, domains: np.ndarray, seed: int) -> np.ndarray:
    """Positions of the cells in snapshot order: grouped by domain code (ascending), each domain's
    cells in a seeded random order (independent of the order they are given in)."""
    by_id = np.argsort(joinids, kind="stable")
    rng = np.random.default_rng(seed)
    parts = []
    for domain in np.unique(domains):
        members = by_id[domains[by_id] == domain]
        parts.append(members[rng.permutation(members.size)])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def is_complete(path: str | os.PathLike) -> bool:
    import zarr

    try:
        return bool(zarr.open_group(str(path), mode="r").attrs.get("complete", False))
    except Exception:  # noqa: BLE001 - not a zarr group, or a half-written one: not usable
        return False


def ensure_snapshot(plan: ReadPlan, location: str | os.PathLike, *, seed: int = 0,
                    log: Callable[[str], None] | None = None) -> Path:
    """The snapshot of ``plan``'s cells under ``location`` (written now unless a complete one is
    there already); returns its folder."""
    location = Path(location)
    target = location / snapshot_key(plan, seed)
    if is_complete(target):
        if log:
            log(f"training snapshot: reusing {target}")
        return target
    try:
        location.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(location, e) from e
    for stale in location.glob(".writing-*"):  # left by a killed write (a live one is younger)
        if time.time() - stale.stat().st_mtime > STALE_WRITE_S:
            shutil.rmtree(stale, ignore_errors=True)
    staging = location / f".writing-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            write_snapshot(plan, staging, seed=seed, log=log)
        except OSError as e:  # a full disk, a read-only folder: say where and what to do
            raise _unwritable(location, e) from e
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete(target):  # not a concurrent writer's finished copy: a broken folder
                shutil.rmtree(target, ignore_errors=True)
                os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _unwritable(location: Path, error: OSError) -> AtlasError:
    return AtlasError(f"could not write the training snapshot under {location} ({error.strerror or error}); free "
                      "space there, give data.snapshot_dir another folder, or set data.snapshot: false to read "
                      "the store directly")


def write_snapshot(plan: ReadPlan, path: str | os.PathLike, *, seed: int = 0,
                   log: Callable[[str], None] | None = None) -> None:
    """Write ``plan``'s cells, normalised as :func:`atlas.data.reader.read_block` emits them, in
    snapshot order (:func:`snapshot_order`) to a new zarr group at ``path``."""
    import zarr
    from zarr.codecs import BloscCodec

    from atlas.data.arrow import list_column_csr
    from atlas.data.reader import read_block

    joinids, domains, labels = _cells(plan)
    order = snapshot_order(joinids, domains, seed)
    joinids, domains = joinids[order], domains[order]
    labels = None if labels is None else labels[order]
    group = zarr.open_group(str(path), mode="w")
    codec = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    group.create_array("soma_joinid", data=joinids, compressors=codec)
    group.create_array("domain", data=domains, compressors=codec)
    if labels is not None:
        group.create_array(LABELS, data=labels, compressors=codec)
    arrays = {}
    for m in plan.modalities:
        arrays[m] = (group.create_array(f"{m}/indices", shape=(0,), chunks=(CHUNK_ENTRIES,), dtype="int32",
                                        compressors=codec),
                     group.create_array(f"{m}/values", shape=(0,), chunks=(CHUNK_ENTRIES,), dtype="float32",
                                        compressors=codec))
    pointers: dict[str, list[np.ndarray]] = {m: [np.zeros(1, np.int64)] for m in plan.modalities}
    totals = dict.fromkeys(plan.modalities, 0)
    read_plan = replace(plan, single_domain=False, rows_per_block=WRITE_BLOCK)
    for start in range(0, joinids.size, WRITE_BLOCK):
        stop = min(joinids.size, start + WRITE_BLOCK)
        block = ReadBlock(joinids=joinids[start:stop], domains=domains[start:stop],
                          labels=None if labels is None else labels[start:stop])
        for table in read_block(read_plan, block):
            for m in plan.modalities:
                ids_column, values_column = csr_columns(m)
                indptr, ids = list_column_csr(table.column(ids_column))
                _, values = list_column_csr(table.column(values_column))
                arrays[m][0].append(ids.astype(np.int32, copy=False))
                arrays[m][1].append(values.astype(np.float32, copy=False))
                pointers[m].append(totals[m] + indptr[1:])
                totals[m] += int(indptr[-1])
        if log:
            log(f"training snapshot: {stop:,} / {joinids.size:,} cells written")
    for m in plan.modalities:
        group.create_array(f"{m}/indptr", data=np.concatenate(pointers[m]), compressors=codec)
    codes, counts = np.unique(domains, return_counts=True)  # snapshot order groups the domains
    group.attrs.update({
        "format": FORMAT, "source": plan.uri, "modalities": list(plan.modalities), "n_cells": int(joinids.size),
        "domain_codes": codes.tolist(), "domain_offsets": [0, *np.cumsum(counts).tolist()],
        "label_levels": list(plan.label_levels), "seed": int(seed),
    })
    group.attrs["complete"] = True  # last: a folder without it was not finished


def snapshot_plan(plan: ReadPlan, path: str | os.PathLike, *, block_size: int, chunk_size: int) -> ReadPlan:
    """``plan`` reading from the snapshot at ``path``: blocks carry snapshot rows, and
    ``snapshot_chunk`` / ``snapshot_block`` say how :func:`epoch_blocks` cuts them each epoch."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    joinids = group["soma_joinid"][:]
    domains = group["domain"][:]
    labels = group[LABELS][:] if plan.label_levels else None
    rows = np.arange(joinids.size, dtype=np.int64)
    blocks = (ReadBlock(joinids=joinids, domains=domains, labels=labels, rows=rows),)
    planned = replace(plan, blocks=blocks, snapshot=str(path), snapshot_chunk=int(chunk_size),
                      snapshot_block=int(block_size))
    return replace(planned, blocks=tuple(epoch_blocks(planned, 0)))


def epoch_blocks(plan: ReadPlan, epoch: int) -> list[ReadBlock]:
    """The read blocks of one epoch of a snapshot plan: every cell once, in an order seeded by
    ``(plan.seed, epoch)`` (runs of ``snapshot_chunk`` consecutive snapshot rows, permuted, grouped
    into blocks of ``snapshot_block`` cells — one domain each in single-domain mode — and the
    cells of each block permuted)."""
    rows = np.concatenate([b.rows for b in plan.blocks if b.rows is not None])
    joinids, domains, labels = _cells(plan)
    seed = int(np.random.SeedSequence([plan.seed, epoch]).generate_state(1)[0])
    blocks = plan_blocks(rows, domains, block_size=plan.snapshot_block, shuffle=plan.shuffle, seed=seed,
                         single_domain=plan.single_domain, shuffle_chunk_size=plan.snapshot_chunk)
    # plan_blocks treats the rows as its ids; map them back to the cells' positions here.
    by_row = np.empty(rows.size, np.int64)
    by_row[rows] = np.arange(rows.size)  # the rows are 0 … cells - 1, each once
    out = []
    for block in blocks:
        at = by_row[block.joinids]
        out.append(ReadBlock(joinids=joinids[at], domains=domains[at],
                             labels=None if labels is None else labels[at], rows=block.joinids))
    return out


@lru_cache(maxsize=4)
def _open(path: str) -> tuple[dict[str, tuple[Any, Any]], dict[str, np.ndarray]]:
    """The snapshot's value arrays and row pointers, opened once per process — with the zarrs
    (Rust) codec pipeline when it is installed: range reads 1.4-1.5x faster here."""
    import zarr

    try:
        import zarrs  # noqa: F401

        settings = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}
    except ImportError:
        settings = {}
    with zarr.config.set(settings):  # arrays keep the pipeline they were opened with
        group = zarr.open_group(path, mode="r")
        modalities = group.attrs["modalities"]
        arrays = {m: (group[f"{m}/indices"], group[f"{m}/values"]) for m in modalities}
        return arrays, {m: group[f"{m}/indptr"][:] for m in modalities}


def read_rows(path: str, modality: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(indptr, indices, values)`` of snapshot ``rows`` (in the given order): contiguous runs of
    rows are read as one range each."""
    arrays, pointers = _open(path)
    indptr = pointers[modality]
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
    ordered = np.sort(rows)
    breaks: np.ndarray = np.flatnonzero(np.diff(ordered) != 1) + 1
    starts, stops = ordered[np.r_[0, breaks]], ordered[np.r_[breaks - 1, ordered.size - 1]] + 1
    indices_array, values_array = arrays[modality]
    ids = [indices_array[indptr[a]:indptr[b]] for a, b in zip(starts, stops)]
    vals = [values_array[indptr[a]:indptr[b]] for a, b in zip(starts, stops)]
    lengths = indptr[ordered + 1] - indptr[ordered]  # not np.diff of every row: this runs per block
    flat_ids, flat_values = np.concatenate(ids), np.concatenate(vals)
    if np.array_equal(ordered, rows):
        return np.r_[0, np.cumsum(lengths)], flat_ids, flat_values
    # Reorder the rows: entries of the i-th requested row sit at its sorted position's range.
    begin = np.r_[0, np.cumsum(lengths)[:-1]]
    at = np.searchsorted(ordered, rows)
    want = lengths[at]
    out_ptr = np.r_[0, np.cumsum(want)]
    take = np.repeat(begin[at] - out_ptr[:-1], want) + np.arange(out_ptr[-1])
    return out_ptr, flat_ids[take], flat_values[take]
