"""Index shards: one searchable slice of the reference with its labels and modality profiles.

A :class:`Shard` is what one Ray Serve deployment loads in ``__init__``: a faiss index over some
reference cells, and per cell its ``soma_joinid``, ``dataset_id`` (so a user can see which
datasets a call rests on), label levels, and normalised values of every modality the mapping
may predict (missing-modality prediction = mean over the k nearest reference cells).

On disk a shard is a folder::

    index.faiss                 the faiss index (CPU form; search parameters inside)
    profile_index.faiss         root shards of an atlas with a profile space only: the index over
                                the cells' profile-space vectors (see atlas.index.profile_space)
    cells.parquet               soma_joinid (int64), dataset_id (str), one str column per level
    profiles/<modality>.npz     features (str [f]) + values (float32 [n, f]) or CSR arrays
    shard.json                  name, counts, index kind, dims, levels, profile formats

Missing labels are stored as ``""``; the voter ignores them, so such cells are neighbours but
never vote. For a dense profile, a row of NaN means "this cell has no measurement of that
modality" (e.g. an RNA-only cell in a reference that is partly CITE-seq); a CSR profile has no
such marker, so put only fully measured modalities (e.g. ATAC of a multiome reference) in CSR.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from atlas.index.faiss_index import IndexKind, build_index, load_index, save_index, search_parameters, to_cpu
from atlas.index.faiss_index import index_kind as kind_of_index

SHARD_FORMAT = 1
PROFILE_INDEX_FILE = "profile_index.faiss"
#: Column names that cannot be label levels (they are the per-cell metadata columns).
RESERVED_COLUMNS = ("soma_joinid", "dataset_id")

Profile = tuple[list[str], "np.ndarray | sp.csr_matrix"]


@dataclass(frozen=True, repr=False)
class Shard:
    """One searchable slice of the reference (row i of every array = index position i)."""

    name: str
    """Shard name, also its folder relative to the layout root (``coarse``, ``fine/B_cell``, ``hash/0``)."""
    index: Any
    """The cosine index over these cells' embeddings (see :mod:`atlas.index.faiss_index`)."""
    soma_joinid: np.ndarray
    """int64 [n]: the cells' ids in the atlas store."""
    labels: dict[str, np.ndarray]
    """Label level → str [n]; ``""`` = no label at that level (the voter skips it)."""
    dataset_id: np.ndarray
    """str [n]: the dataset each cell came from."""
    profiles: dict[str, Profile] = field(default_factory=dict)
    """Modality → (feature names, float32 [n, f] or CSR [n, f]) of normalised values."""
    level: str | None = None
    """The label level this shard votes on (None: a flat/hash shard answers every level)."""
    group: tuple[str, ...] = ()
    """Label values of the path that leads here (``("B cell",)`` for a level-2 shard)."""
    profile_index: Any = None
    """The index over the same cells' profile-space vectors (root shards of an atlas that has a
    :class:`~atlas.index.profile_space.ProfileSpace`; None elsewhere)."""

    def __post_init__(self) -> None:
        n = len(self.soma_joinid)
        if self.index.ntotal != n:
            raise ValueError(f"shard {self.name}: index has {self.index.ntotal} vectors, {n} joinids")
        if self.profile_index is not None and self.profile_index.ntotal != n:
            raise ValueError(f"shard {self.name}: profile index has {self.profile_index.ntotal} vectors, {n} joinids")
        if len(self.dataset_id) != n:
            raise ValueError(f"shard {self.name}: {len(self.dataset_id)} dataset ids for {n} cells")
        for level, values in self.labels.items():
            if level in RESERVED_COLUMNS:
                raise ValueError(f"label level may not be named {level!r}")
            if len(values) != n:
                raise ValueError(f"shard {self.name}: level {level} has {len(values)} labels for {n} cells")
        for modality, (features, values) in self.profiles.items():
            if values.shape != (n, len(features)):
                raise ValueError(
                    f"shard {self.name}: profile {modality} has shape {values.shape}, "
                    f"expected ({n}, {len(features)})"
                )

    @property
    def n_cells(self) -> int:
        return len(self.soma_joinid)

    def __repr__(self) -> str:  # the arrays would flood a notebook
        return (f"Shard(name={self.name!r}, n_cells={self.n_cells}, level={self.level!r}, "
                f"labels={list(self.labels)}, profiles={list(self.profiles)})")


def clean_labels(values: Any) -> np.ndarray:
    """Labels as a str array with every missing value (None, NaN, pd.NA) turned into ``""``."""
    series = pd.Series(np.asarray(values, dtype=object))
    return series.where(series.notna(), "").astype(str).to_numpy(dtype=str)


def write_shard(directory: str | Path, shard: Shard) -> Path:
    """Write ``shard`` into ``directory`` (created); returns the folder."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_index(shard.index, out / "index.faiss")
    if shard.profile_index is not None:
        save_index(shard.profile_index, out / PROFILE_INDEX_FILE)

    columns = {
        "soma_joinid": pa.array(np.asarray(shard.soma_joinid, dtype=np.int64)),
        "dataset_id": pa.array(np.asarray(shard.dataset_id, dtype=str).tolist(), pa.string()),
    }
    for level, values in shard.labels.items():
        columns[level] = pa.array(np.asarray(values, dtype=str).tolist(), pa.string())
    pq.write_table(pa.table(columns), out / "cells.parquet")

    profile_info = {}
    for modality, (features, values) in shard.profiles.items():
        (out / "profiles").mkdir(exist_ok=True)
        profile_info[modality] = _write_profile(out / "profiles" / f"{modality}.npz", features, values)

    kind = kind_of_index(shard.index)
    meta = {
        "format": SHARD_FORMAT,
        "name": shard.name,
        "n_cells": shard.n_cells,
        "dim": int(shard.index.d),
        "index_kind": kind,
        # an exact index has no search parameters (and a GPU one is not copied back to learn that)
        "search": search_parameters(to_cpu(shard.index)) if kind != "flat" else {},
        "level": shard.level,
        "group": list(shard.group),
        "levels": list(shard.labels),
        "profiles": profile_info,
        "profile_index": PROFILE_INDEX_FILE if shard.profile_index is not None else None,
    }
    (out / "shard.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _write_profile(path: Path, features: list[str], values: Any) -> dict[str, Any]:
    names = np.asarray(list(features), dtype=str)
    if sp.issparse(values):
        csr = sp.csr_matrix(values, dtype=np.float32)
        np.savez(path, format="csr", features=names, data=csr.data, indices=csr.indices,
                 indptr=csr.indptr, shape=np.asarray(csr.shape, np.int64))
        return {"format": "csr", "n_features": len(names), "nnz": int(csr.nnz)}
    np.savez(path, format="dense", features=names, values=np.asarray(values, dtype=np.float32))
    return {"format": "dense", "n_features": len(names)}


def _read_profile(path: Path) -> Profile:
    with np.load(path, allow_pickle=False) as z:
        features = z["features"].tolist()
        if str(z["format"]) == "csr":
            shape = tuple(int(v) for v in z["shape"])
            return features, sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=shape)
        return features, z["values"]


def load_shard(directory: str | Path, *, use_gpu: bool | None = False,
               modalities: list[str] | None = None) -> Shard:
    """Read a shard written by :func:`write_shard`.

    ``use_gpu`` is passed to :func:`~atlas.index.faiss_index.load_index`; ``modalities`` limits
    which profiles are read (None = all), so a label-only replica does not hold ATAC in memory.
    """
    folder = Path(directory)
    meta_path = folder / "shard.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not a shard folder (no shard.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format", 0) > SHARD_FORMAT:
        raise ValueError(f"shard {folder} has format {meta['format']}; this atlas reads ≤ {SHARD_FORMAT}")
    table = pq.read_table(folder / "cells.parquet")
    labels = {level: np.asarray(table.column(level).to_pylist(), dtype=str) for level in meta["levels"]}
    wanted = meta["profiles"] if modalities is None else [m for m in modalities if m in meta["profiles"]]
    profiles = {m: _read_profile(folder / "profiles" / f"{m}.npz") for m in wanted}
    return Shard(
        name=meta["name"],
        index=load_index(folder / "index.faiss", use_gpu=use_gpu),
        soma_joinid=table.column("soma_joinid").to_numpy().astype(np.int64),
        labels=labels,
        dataset_id=np.asarray(table.column("dataset_id").to_pylist(), dtype=str),
        profiles=profiles,
        level=meta.get("level"),
        group=tuple(meta.get("group", ())),
        profile_index=load_index(folder / meta["profile_index"], use_gpu=use_gpu) if meta.get("profile_index") else None,
    )


# ---------------------------------------------------------------------------------------------
# The shard layout: a coarse index + one fine shard per group, or hash shards.
# ---------------------------------------------------------------------------------------------

LAYOUT_FILE = "layout.json"
_SHARD_ENTRIES = {"index.faiss", PROFILE_INDEX_FILE, "cells.parquet", "profiles", "shard.json", LAYOUT_FILE}


@dataclass(frozen=True)
class LayoutNode:
    """One step of the mapping tree: the cells a query is compared with at one label level.

    A node normally has one shard; a node over ``max_shard_cells`` (and the hash node) is split
    into several shards whose results the mapper merges (:func:`~atlas.index.faiss_index.merge_topk`).
    """

    name: str
    """``coarse``, ``fine/<v1>``, ``fine/<v1>/<v2>``, … or ``hash``."""
    level: str | None
    """Label level this node's vote decides (None for hash: flat mapping over every level)."""
    parent: str | None
    """Name of the node whose vote routes queries here (None for the root)."""
    group: tuple[str, ...]
    """Label values on the path from the root (``()`` for the root)."""
    n_cells: int
    shards: tuple[str, ...]
    """Shard folders (relative to the layout root) that together hold this node's cells."""


@dataclass(frozen=True)
class ShardLayout:
    """The mapping tree of an atlas: which shard answers which level for which group."""

    mode: str
    """``"hierarchy"`` (coarse + fine shards) or ``"hash"`` (flat mapping over hash shards)."""
    levels: tuple[str, ...]
    """Label levels, coarse → fine (empty in hash mode)."""
    nodes: tuple[LayoutNode, ...]
    shards: dict[str, Shard] = field(default_factory=dict, compare=False, repr=False)
    """The shards themselves when built in memory (``out_dir=None``); empty when written."""

    @property
    def root(self) -> LayoutNode:
        """The node every query starts at (``coarse`` or ``hash``)."""
        return self.nodes[0]

    def node(self, name: str) -> LayoutNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no layout node {name!r}; nodes: {[n.name for n in self.nodes][:20]}")

    def children(self, name: str) -> dict[str, LayoutNode]:
        """The child nodes of ``name``, keyed by the label value that routes a query to them."""
        return {n.group[-1]: n for n in self.nodes if n.parent == name}

    def child(self, name: str, value: str) -> LayoutNode | None:
        """Node a query goes to after ``name``'s vote picked ``value`` (None: no deeper shard)."""
        return self.children(name).get(value)

    def shard_names(self) -> list[str]:
        return [s for n in self.nodes for s in n.shards]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SHARD_FORMAT,
            "mode": self.mode,
            "levels": list(self.levels),
            "nodes": [
                {"name": n.name, "level": n.level, "parent": n.parent, "group": list(n.group),
                 "n_cells": n.n_cells, "shards": list(n.shards)}
                for n in self.nodes
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardLayout:
        nodes = tuple(
            LayoutNode(n["name"], n["level"], n["parent"], tuple(n["group"]), int(n["n_cells"]),
                       tuple(n["shards"]))
            for n in data["nodes"]
        )
        return cls(mode=data["mode"], levels=tuple(data["levels"]), nodes=nodes)

    def write(self, directory: str | Path) -> Path:
        """Write ``layout.json`` into ``directory``."""
        path = Path(directory) / LAYOUT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> ShardLayout:
        """Read ``layout.json`` from ``directory`` (the shards' root folder)."""
        data = json.loads((Path(directory) / LAYOUT_FILE).read_text())
        if data.get("format", 0) > SHARD_FORMAT:
            raise ValueError(f"layout in {directory} has format {data['format']}; this atlas reads ≤ {SHARD_FORMAT}")
        return cls.from_dict(data)


def safe_name(value: str) -> str:
    """A filesystem- and URL-safe folder name for a label value (``"CD4+ T cell"`` → ``CD4_T_cell``)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("._-")[:80] or "_"
    # Child shards live inside their parent's folder, next to its files and split parts:
    # a label named like one of those gets a suffix.
    if name in _SHARD_ENTRIES or re.fullmatch(r"part-\d+", name):
        return name + "_"
    return name


def _unique_names(values: list[str]) -> dict[str, str]:
    """Safe names for ``values``; values that clash after cleaning get a short hash suffix.

    Clashes are counted case-insensitively: ``T_cell`` and ``t_cell`` are one folder on macOS.
    """
    names = {v: safe_name(v) for v in values}
    counts = pd.Series([n.lower() for n in names.values()]).value_counts()
    return {
        v: f"{n}-{hashlib.sha256(v.encode()).hexdigest()[:8]}" if counts[n.lower()] > 1 else n
        for v, n in names.items()
    }


def hash_bucket(joinids: np.ndarray, n_buckets: int) -> np.ndarray:
    """Stable bucket of each joinid (splitmix64 mix, so consecutive ids spread evenly)."""
    z = np.asarray(joinids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(n_buckets)).astype(np.int64)


def build_hierarchy(
    embeddings: np.ndarray,
    joinids: np.ndarray,
    labels: dict[str, Any],
    levels: list[str] | None,
    profiles: dict[str, Profile] | None,
    dataset_ids: Any,
    *,
    index_kind: str = "auto",
    exact_below: int = 200_000,
    use_gpu: bool | None = None,
    max_shard_cells: int | None = None,
    n_hash_shards: int = 4,
    out_dir: str | Path | None = None,
    seed: int = 0,
    profile_vectors: np.ndarray | None = None,
) -> ShardLayout:
    """Cut the reference into shards and build their indexes.

    With ``levels`` (coarse → fine, e.g. ``["cell_type_l1", "cell_type_l2"]``): a ``coarse``
    shard over every cell carrying all levels (answers ``levels[0]``), then for each value path
    ``(v1, …, vk)`` a shard ``fine/<v1>/…/<vk>`` with the cells labelled so at levels 1..k,
    carrying levels k+1… (answers ``levels[k]``). A group is formed only from cells with a label
    at every level on its path, and is skipped when none of its cells has a label at the level it
    would answer. Without levels: ``n_hash_shards`` shards ``hash/<i>`` (cells by joinid hash),
    carrying every label column given, for flat mapping.

    ``max_shard_cells`` caps any shard: a larger node is split by joinid hash into
    ``<node>/part-<i>`` shards (hash mode: more hash shards). Rows of ``embeddings``, ``joinids``,
    every ``labels`` array, ``dataset_ids`` and every profile matrix are the same cells.
    With ``out_dir`` the shards and ``layout.json`` are written there and not kept in memory
    (the layout's ``shards`` stays empty); otherwise they are returned in ``layout.shards``.
    ``profile_vectors`` (rows: the same cells): the root node's shards (``coarse``, or every hash
    shard), where profiles are predicted from, also index these (their ``profile_index``).
    """
    n = embeddings.shape[0]
    joinids = np.asarray(joinids, dtype=np.int64)
    dataset_ids = np.asarray(dataset_ids, dtype=str)
    clean = {level: clean_labels(values) for level, values in labels.items()}
    # One dtype per format, so an in-memory shard equals the same shard read back from disk.
    profiles = {
        m: (list(f), sp.csr_matrix(v, dtype=np.float32) if sp.issparse(v) else np.asarray(v, np.float32))
        for m, (f, v) in (profiles or {}).items()
    }
    arrays = [("joinids", joinids), ("dataset_ids", dataset_ids), *clean.items(),
              *((f"profile {m}", v) for m, (_, v) in profiles.items())]
    for what, arr in arrays:
        if arr.shape[0] != n:
            raise ValueError(f"{what} has {arr.shape[0]} rows for {n} embeddings")
    levels = list(levels or [])
    for level in levels:
        if level not in clean:
            raise ValueError(f"level {level!r} is not in labels ({sorted(clean)})")
    if max_shard_cells is not None and max_shard_cells < 1:
        raise ValueError("max_shard_cells must be ≥ 1")

    if profile_vectors is not None and profile_vectors.shape[0] != n:
        raise ValueError(f"profile_vectors has {profile_vectors.shape[0]} rows for {n} embeddings")

    def index_of(vectors: np.ndarray) -> Any:
        # build_index checks the kind at run time (ValueError for an unknown one)
        return build_index(vectors, kind=cast(IndexKind, index_kind), exact_below=exact_below, use_gpu=use_gpu,
                           seed=seed)

    def make(name: str, rows: np.ndarray, keep: list[str], level: str | None, group: tuple[str, ...],
             root: bool) -> Shard:
        return Shard(
            name=name,
            index=index_of(embeddings[rows]),
            soma_joinid=joinids[rows],
            labels={lv: clean[lv][rows] for lv in keep},
            dataset_id=dataset_ids[rows],
            profiles={m: (f, v[rows]) for m, (f, v) in profiles.items()},
            level=level,
            group=group,
            profile_index=index_of(profile_vectors[rows]) if root and profile_vectors is not None else None,
        )

    built: dict[str, Shard] = {}

    def emit(name: str, rows: np.ndarray, keep: list[str], level: str | None,
             group: tuple[str, ...], parent: str | None, *, parts: int = 1,
             part_prefix: str | None = None) -> LayoutNode:
        if max_shard_cells is not None:
            parts = max(parts, -(-len(rows) // max_shard_cells))
        if parts == 1 and part_prefix is None:
            pieces = {name: rows}
        else:
            bucket = hash_bucket(joinids[rows], parts)
            prefix = part_prefix or f"{name}/part-"
            pieces = {f"{prefix}{i}": rows[bucket == i] for i in range(parts)}
        for shard_name, piece in pieces.items():
            shard = make(shard_name, piece, keep, level, group, parent is None)
            if out_dir is None:
                built[shard_name] = shard
            else:
                write_shard(Path(out_dir) / shard_name, shard)
        return LayoutNode(name, level, parent, group, int(len(rows)), tuple(pieces))

    all_rows = np.arange(n)
    if not levels:
        if n_hash_shards < 1:
            raise ValueError("n_hash_shards must be ≥ 1")
        root = emit("hash", all_rows, list(clean), None, (), None, parts=n_hash_shards,
                    part_prefix="hash/")
        layout = ShardLayout("hash", (), (root,), built)
    else:
        nodes = [emit("coarse", all_rows, levels, levels[0], (), None)]
        # Breadth-first: a node at depth k splits its cells by their level-(k+1) label.
        frontier: list[tuple[str, np.ndarray, tuple[str, ...]]] = [("coarse", all_rows, ())]
        for depth in range(len(levels) - 1):
            answers = levels[depth + 1]
            next_frontier = []
            for parent, rows, group in frontier:
                values = clean[levels[depth]][rows]
                groups = pd.Series(values).groupby(values, sort=True).indices
                groups.pop("", None)  # unlabelled cells stay in the parent only
                names = _unique_names(list(groups))
                base = "fine" if depth == 0 else parent
                for value, positions in groups.items():
                    sub = rows[positions]
                    if not (clean[answers][sub] != "").any():
                        continue  # nobody here could vote on the next level: no shard to ask
                    name, path = f"{base}/{names[value]}", group + (value,)
                    nodes.append(emit(name, sub, levels[depth + 1:], answers, path, parent))
                    next_frontier.append((name, sub, path))
            frontier = next_frontier
        layout = ShardLayout("hierarchy", tuple(levels), tuple(nodes), built)
    if out_dir is not None:
        layout.write(out_dir)
    return layout
