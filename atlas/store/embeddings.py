"""Write cell embeddings back to the store, as a new committed version.

An embedding lives in the obsm of a measurement (``ms[<modality>].obsm[<name>]``, a sparse
``[n_obs, d]`` array, so that only the embedded cells have rows) with metadata naming the model
version that made it. Like an ingest it is written into a staging tree and published atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import tiledbsoma

from atlas.store import versions


def write_embedding(
    store: str | os.PathLike,
    modality: str,
    name: str,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    metadata: dict,
) -> versions.StoreVersion:
    """Stream ``(soma_joinid [n], embedding [n, d])`` chunks into ``ms[modality].obsm[name]``.

    Returns the new store version. An embedding of the same name (the same build config run
    again) is replaced in the new version only: every older version keeps the one it had, and
    the atlas artifact records which version holds its embedding.
    """
    with versions.writer_lock(store):
        return _write_embedding(store, modality, name, chunks, metadata)


def _write_embedding(store, modality, name, chunks, metadata) -> versions.StoreVersion:
    versions.remove_stale_staging(store)
    staging = versions.begin_version(store)
    try:
        with tiledbsoma.Experiment.open(str(staging)) as exp:
            ids = exp.obs.read(column_names=["soma_joinid"]).concat().column("soma_joinid")
            n_obs = int(pa.compute.max(ids).as_py()) + 1
        replaced = _remove_from_staging(staging, modality, name)
        written = 0
        array = None
        with tiledbsoma.Experiment.open(str(staging), "w") as exp:
            ms = exp.ms[modality]
            obsm = ms["obsm"] if "obsm" in ms else ms.add_new_collection("obsm")
            for joinids, matrix in chunks:
                if array is None:
                    array = obsm.add_new_sparse_ndarray(name, type=pa.float32(), shape=(n_obs, matrix.shape[1]))
                rows: np.ndarray = np.repeat(joinids.astype(np.int64), matrix.shape[1])
                cols = np.tile(np.arange(matrix.shape[1], dtype=np.int64), joinids.size)
                array.write(pa.table({
                    "soma_dim_0": rows,
                    "soma_dim_1": cols,
                    "soma_data": matrix.astype(np.float32, copy=False).reshape(-1),
                }))
                written += joinids.size
            if array is None:
                raise versions.StoreError("no embeddings to write")
            array.metadata["atlas_embedding"] = json.dumps({**metadata, "cells": written})
        change = {"action": "embedding", "modality": modality, "embedding": name, "cells": written}
        if replaced:
            change["replaced"] = True
        return versions.publish_version(store, staging, change)
    except BaseException:
        versions.abandon_version(staging)
        raise


def _remove_from_staging(staging, modality: str, name: str) -> bool:
    """Drop ``ms[modality].obsm[name]`` from a staging tree; True if it was there.

    The staging tree's files are hard links to the current version's: unlinking them here and
    removing the group member (a new group fragment, written only in staging) leaves every
    published version as it was.
    """
    import shutil
    from pathlib import Path

    with tiledbsoma.Experiment.open(str(staging)) as exp:
        ms = exp.ms[modality]
        if "obsm" not in ms or name not in ms["obsm"]:
            return False
        member = Path(ms["obsm"][name].uri.removeprefix("file://"))
    with tiledbsoma.Collection.open(str(member.parent), "d") as obsm:  # "d": delete members
        del obsm[name]
    if Path(staging).resolve() not in member.resolve().parents:
        raise versions.StoreError(f"embedding '{name}' lives outside the store's staging tree ({member}); not removed")
    shutil.rmtree(member)
    return True


def read_embedding(uri: str, modality: str, name: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(soma_joinid, embedding, metadata)`` of a stored embedding (for tests and tools)."""
    with tiledbsoma.Experiment.open(uri) as exp:
        array = exp.ms[modality]["obsm"][name]
        table = array.read().tables().concat()
        dim = int(array.shape[1])
        meta = json.loads(array.metadata["atlas_embedding"])
    rows = table.column("soma_dim_0").to_numpy()
    cols = table.column("soma_dim_1").to_numpy()
    data = table.column("soma_data").to_numpy()
    joinids = np.unique(rows)
    dense = np.zeros((joinids.size, dim), np.float32)
    dense[np.searchsorted(joinids, rows), cols] = data
    return joinids, dense, meta
