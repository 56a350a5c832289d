"""Committed versions of an atlas store, published atomically.

An atlas store is a folder::

    STORE/
      atlas_store.json          the commit record: which version is current, and the history
      versions/v000001/         a TileDB-SOMA Experiment (one committed version)
      versions/v000002/         the next version: hard links to v000001's files + new fragments
      versions/.staging-*/      an ingest in progress; never read, removed by the next ingest

Why: an ingest that fails or is killed part way must leave the store exactly as it was. TileDB
never rewrites a file it has written (fragments, commits, schemas and metadata are all new
files), so a new version starts as a tree of hard links to the current one (cheap: no data is
copied), the ingest appends into that staging tree, and only a complete ingest is published by
atomically replacing ``atlas_store.json``. Readers resolve the current version once and keep it,
so a build sees one consistent version even while someone appends.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas.errors import AtlasError

RECORD = "atlas_store.json"
VERSIONS = "versions"
STAGING_PREFIX = ".staging-"
LOCK = ".atlas.lock"
FORMAT = 1


class StoreError(AtlasError):
    """A problem with an atlas store, with a message that says what to do."""


@dataclass(frozen=True)
class StoreVersion:
    """One committed version of an atlas store."""

    store: Path
    """The store folder."""
    version: int
    """Version number, 1 for the first ingest."""
    uri: str
    """Path of the TileDB-SOMA Experiment that holds this version."""


def read_record(store: str | os.PathLike) -> dict:
    """The store's commit record; raises StoreError when the folder is not an atlas store."""
    path = Path(store) / RECORD
    if not path.exists():
        raise StoreError(
            f"{store} is not an atlas store (no {RECORD}); create one with `atlas ingest {store} SOURCE`"
        )
    with open(path) as f:
        return json.load(f)


def current_version(store: str | os.PathLike, version: int | None = None) -> StoreVersion:
    """Resolve the current (or a given) committed version of a store."""
    store = Path(store)
    record = read_record(store)
    number = record["current"] if version is None else version
    names = {v["version"]: v["name"] for v in record["history"]}
    if number not in names:
        raise StoreError(f"{store} has no version {number}; committed versions: {sorted(names)}")
    return StoreVersion(store=store, version=number, uri=str(store / VERSIONS / names[number]))


def is_store(store: str | os.PathLike) -> bool:
    return (Path(store) / RECORD).exists()


@contextmanager
def writer_lock(store: str | os.PathLike) -> Iterator[None]:
    """Hold the store's writer lock: one ingest or embedding write-back at a time.

    Two writers starting from the same current version would each publish a successor of it,
    and the second would silently drop the first's data.
    """
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    with open(store / LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"another writer (an ingest, or a build writing embeddings) is writing to {store}; "
                "wait for it to finish and try again"
            ) from None
        yield


def _link_tree(src: Path, dst: Path) -> None:
    for root, _dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            os.link(Path(root) / name, dst / rel / name)


def remove_stale_staging(store: str | os.PathLike) -> list[str]:
    """Delete staging trees left by ingests that died; returns their names.

    Also removes a version folder that the commit record does not list: an ingest killed between
    renaming its staging tree and replacing the record leaves one, and it was never committed.
    Call this only while holding the store's ingest lock (no other writer is running).
    """
    versions = Path(store) / VERSIONS
    committed = {v["name"] for v in read_record(store)["history"]} if is_store(store) else set()
    removed = []
    if versions.exists():
        for child in versions.iterdir():
            if child.name.startswith(STAGING_PREFIX) or (child.is_dir() and child.name not in committed):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
    return removed


def begin_version(store: str | os.PathLike) -> Path:
    """Start a new version: a staging tree holding hard links to the current version's files.

    For a store that does not exist yet the staging tree is empty (the caller creates the
    Experiment in it).
    """
    store = Path(store)
    staging = store / VERSIONS / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    if is_store(store):
        _link_tree(Path(current_version(store).uri), staging)
    return staging


def publish_version(store: str | os.PathLike, staging: Path, summary: dict) -> StoreVersion:
    """Make a complete staging tree the store's current version (atomic)."""
    store = Path(store)
    record: dict[str, Any] = (read_record(store) if is_store(store)
                              else {"format": FORMAT, "current": 0, "history": []})
    number = max([v["version"] for v in record["history"]], default=0) + 1
    name = f"v{number:06d}"
    os.rename(staging, store / VERSIONS / name)
    # The summary never overrides the bookkeeping keys.
    record["history"].append({**summary, "version": number, "name": name, "committed_at": time.time()})
    record["current"] = number
    tmp = store / f".{RECORD}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, store / RECORD)
    return current_version(store, number)


def abandon_version(staging: Path) -> None:
    """Throw a staging tree away (after a failed ingest)."""
    shutil.rmtree(staging, ignore_errors=True)
