"""Reading single-cell sources lazily, one block of cells at a time.

Supported sources: ``.h5ad`` (read through h5py, the same storage anndata's backed mode uses),
AnnData-zarr folders, 10x Genomics ``.h5`` (v2 and v3) and 10x ``matrix.mtx`` folders, and
in-memory ``AnnData`` objects (X a scipy matrix, numpy array or dask array).

Why not ``anndata.read_h5ad`` in full: an atlas source can be larger than memory. The count
matrix is only ever touched through :class:`~atlas.store.rows.RowMatrix.rows` (the one row reader,
shared with the offline mapper: :mod:`atlas.store.rows`), so the ingest holds one block of cells
at a time; cell and feature ids (``obs``/``var``) are read whole, as they are small.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlas.store.rows import CSRArrays, InMemoryRows, RowMatrix, UnreadableMatrix, anndata_rows
from atlas.store.versions import StoreError

__all__ = ["CSRArrays", "InMemoryRows", "Modality", "RowMatrix", "Source", "open_source"]

MODALITIES = {"rna": "RNA", "protein": "protein", "atac": "ATAC"}
"""Modality name on the command line → measurement name in the store."""

TENX_FEATURE_TYPES = {"rna": "Gene Expression", "protein": "Antibody Capture", "atac": "Peaks"}


@dataclass
class Modality:
    """One modality of a source: a cells × features count matrix with its ids."""

    name: str
    """``rna``, ``protein`` or ``atac``."""
    matrix: RowMatrix
    cell_ids: pd.Index
    """Cell id of each matrix row, in the matrix's order."""
    feature_ids: pd.Index
    """Feature id of each matrix column, as given by the source."""
    origin: str
    """Where it came from, for messages (``X of pbmc.h5ad``, ``obsm['protein_counts'] of …``)."""
    species_hint: str | None = None
    """Species named by the source itself (10x genome, a ``species``/``organism`` column)."""


@dataclass
class Source:
    """An opened source: cell metadata, its own modality, and its obsm matrices."""

    path: str
    format: str
    """``h5ad``, ``zarr``, ``10x-h5``, ``10x-mtx`` or ``anndata``."""
    obs: pd.DataFrame
    """Cell metadata; index = cell ids, in the order of the source's rows."""
    matrix: RowMatrix
    feature_ids: pd.Index
    species_hint: str | None = None
    _obsm: Callable[[str], Any] | None = None
    _obsm_keys: list[str] = field(default_factory=list)
    _close: Callable[[], None] | None = None

    def modality(self, name: str) -> Modality:
        """The source's own matrix as modality ``name``."""
        return Modality(name, self.matrix, self.obs.index, self.feature_ids,
                        f"X of {self.path}", self.species_hint)

    def obsm_modality(self, name: str, key: str) -> Modality:
        """An ``obsm`` matrix of the source as modality ``name`` (features named by its columns)."""
        if key not in self._obsm_keys:
            raise StoreError(
                f"{self.path} has no obsm['{key}'] (it has {self._obsm_keys or 'no obsm'}); "
                f"fix the key in --obsm-modality {name}={key}"
            )
        assert self._obsm is not None  # a source with obsm keys reads them
        value = self._obsm(key)
        if not isinstance(value, pd.DataFrame):
            raise StoreError(
                f"obsm['{key}'] of {self.path} is an unnamed {type(value).__name__} "
                f"{tuple(value.shape)}: its features have no names; store it as a DataFrame with the "
                f"feature names as columns (adata.obsm['{key}'] = pd.DataFrame(m, index=adata.obs_names, "
                f"columns=names)) or ingest it as a separate file with --paired {name}=FILE"
            )
        if len(value) != len(self.obs):
            raise StoreError(f"obsm['{key}'] of {self.path} has {len(value)} rows for {len(self.obs)} cells; "
                             "rewrite the file with a matching obsm")
        values = value.to_numpy()
        matrix = sp.csr_matrix(values) if values.dtype != object else None
        if matrix is None:
            raise StoreError(f"obsm['{key}'] of {self.path} holds non-numeric values; it must hold counts")
        return Modality(name, InMemoryRows(matrix), self.obs.index,
                        pd.Index(value.columns.astype(str)), f"obsm['{key}'] of {self.path}",
                        self.species_hint)

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


def open_source(source: str | os.PathLike | Any, *, tenx_feature_ids: str = "id",
                modality: str = "rna") -> Source:
    """Open a source for lazy reading; raises StoreError naming the problem for bad input."""
    try:
        import anndata as ad
    except ImportError:  # pragma: no cover - a runtime dependency
        raise
    if isinstance(source, ad.AnnData):
        return _from_anndata(source)
    path = Path(source)
    if not path.exists():
        raise StoreError(f"{path} does not exist; pass the path of an .h5ad, AnnData-zarr, 10x .h5 or 10x mtx folder")
    if path.is_dir():
        if any((path / n).exists() for n in ("matrix.mtx", "matrix.mtx.gz")):
            return _open_10x_mtx(path, tenx_feature_ids, modality)
        if any((path / n).exists() for n in ("zarr.json", ".zgroup")):
            return _open_group(path, "zarr")
        raise StoreError(
            f"{path} is a folder but neither an AnnData-zarr store (no zarr.json/.zgroup) nor a 10x mtx "
            "folder (no matrix.mtx[.gz]); pass an .h5ad, AnnData-zarr, 10x .h5 or 10x mtx folder"
        )
    import h5py

    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as e:
        raise StoreError(f"{path} is not readable ({e}); check the path and its permissions") from None
    if not is_hdf5:
        raise StoreError(
            f"{path} is not an HDF5 file (.h5ad / 10x .h5) and not a zarr or mtx folder; "
            "convert it to .h5ad (e.g. with scanpy) and ingest that"
        )
    with h5py.File(path, "r") as f:
        keys = set(f.keys())
    if "X" in keys and "obs" in keys:
        return _open_group(path, "h5ad")
    if "matrix" in keys or any(_is_10x_v2_group(path, k) for k in keys):
        return _open_10x_h5(path, tenx_feature_ids, modality)
    raise StoreError(
        f"{path} is an HDF5 file but neither an AnnData .h5ad (no X/obs) nor a 10x .h5 (no matrix group); "
        "convert it to .h5ad and ingest that"
    )


def _is_10x_v2_group(path: Path, key: str) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        g = f[key]
        return isinstance(g, h5py.Group) and {"data", "indices", "indptr", "barcodes"} <= set(g.keys())


def _from_anndata(adata: Any) -> Source:
    X = adata.X
    if X is None:
        raise StoreError("the AnnData has no X; put the raw counts in X")
    return Source(
        path="<AnnData>", format="anndata", obs=adata.obs.copy(), matrix=InMemoryRows(X),
        feature_ids=pd.Index(adata.var_names.astype(str)), species_hint=_species_hint_from_obs(adata.obs),
        _obsm=lambda k: adata.obsm[k], _obsm_keys=list(adata.obsm.keys()),
    )


def _open_group(path: Path, fmt: str) -> Source:
    """An .h5ad (h5py) or AnnData-zarr folder (zarr): obs/var read whole, X lazily."""
    from anndata.io import read_elem

    if fmt == "h5ad":
        import h5py

        handle = h5py.File(path, "r")
        root = handle
        close = handle.close
    else:
        import zarr

        try:
            root = zarr.open_group(str(path), mode="r")
        except Exception as e:  # noqa: BLE001 - any zarr failure is an unreadable source
            raise StoreError(f"{path} is not a readable zarr store ({e}); write it with adata.write_zarr") from None
        close = None
        if "X" not in root or "obs" not in root:
            raise StoreError(f"{path} is a zarr store but not an AnnData one (no X/obs); write it with adata.write_zarr")
    try:
        obs = read_elem(root["obs"])
        var = read_elem(root["var"])
        try:
            matrix = anndata_rows(root["X"])
        except UnreadableMatrix as e:
            raise StoreError(f"{path}: X {e}") from None
        obsm = root["obsm"] if "obsm" in root else None
        obsm_keys = list(obsm.keys()) if obsm is not None else []
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001
        if close:
            close()
        raise StoreError(f"{path} could not be read as AnnData ({type(e).__name__}: {e}); "
                         "check that it was written by anndata") from None
    if matrix.shape != (len(obs), len(var)):
        raise StoreError(f"{path}: X is {matrix.shape} but obs × var is {(len(obs), len(var))}; the file is inconsistent")
    obs.index = obs.index.astype(str)
    return Source(
        path=str(path), format=fmt, obs=obs, matrix=matrix, feature_ids=pd.Index(var.index.astype(str)),
        species_hint=_species_hint_from_obs(obs),
        _obsm=lambda k: read_elem(root["obsm"][k]), _obsm_keys=obsm_keys, _close=close,
    )


def _species_hint_from_obs(obs: pd.DataFrame) -> str | None:
    for col in ("species", "organism"):
        if col in obs.columns:
            values = set(map(str, obs[col].dropna().unique()))
            if len(values) == 1:
                from atlas.store.vocabulary import normalise_species

                return normalise_species(values.pop())
    return None


def _select_feature_type(types: np.ndarray, modality: str, path: Path) -> np.ndarray | None:
    unique = sorted(set(types))
    if len(unique) <= 1:
        return None
    wanted = TENX_FEATURE_TYPES[modality]
    if wanted not in unique:
        raise StoreError(f"{path} has feature types {unique} but none is '{wanted}' for --modality {modality}; "
                         "pick the matching --modality")
    return np.flatnonzero(types == wanted)


def _open_10x_h5(path: Path, feature_ids: str, modality: str) -> Source:
    import h5py

    f = h5py.File(path, "r")
    try:
        if "matrix" in f:  # Cell Ranger v3+
            g = f["matrix"]
            feats = g["features"]
            ids = feats["id"][:].astype(str)
            names = feats["name"][:].astype(str)
            types = feats["feature_type"][:].astype(str) if "feature_type" in feats else np.array([])
            genome = feats["genome"][:].astype(str) if "genome" in feats else np.array([])
        else:  # Cell Ranger v2: one group per genome
            key = next(k for k in f.keys() if _is_10x_v2_group(path, k))
            g = f[key]
            ids = g["genes"][:].astype(str)
            names = g["gene_names"][:].astype(str)
            types = np.array([])
            genome = np.array([key] * len(ids))
        columns = _select_feature_type(types, modality, path) if len(types) else None
        chosen = ids if feature_ids == "id" else names
        shape = tuple(int(s) for s in g["shape"][:])  # (features, cells)
        matrix = CSRArrays(g["data"], g["indices"], g["indptr"], (shape[1], shape[0]), columns=columns)
        barcodes = pd.Index(g["barcodes"][:].astype(str))
    except StoreError:
        f.close()
        raise
    except Exception as e:  # noqa: BLE001
        f.close()
        raise StoreError(f"{path} could not be read as a 10x .h5 ({type(e).__name__}: {e}); "
                         "check it is a Cell Ranger filtered_feature_bc_matrix.h5") from None
    if columns is not None:
        chosen, genome = chosen[columns], (genome[columns] if len(genome) else genome)
    from atlas.store.vocabulary import species_from_genome

    return Source(
        path=str(path), format="10x-h5", obs=pd.DataFrame(index=barcodes), matrix=matrix,
        feature_ids=pd.Index(chosen), species_hint=species_from_genome(genome),
        _obsm=None, _obsm_keys=[], _close=f.close,
    )


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _first(folder: Path, *names: str) -> Path | None:
    for n in names:
        if (folder / n).exists():
            return folder / n
    return None


def _open_10x_mtx(folder: Path, feature_ids: str, modality: str) -> Source:
    """A 10x mtx folder. Matrix Market is a coordinate text format that cannot be read by cells,
    so this one source is loaded whole (it is only used for small outputs in practice)."""
    import scipy.io

    mtx = _first(folder, "matrix.mtx.gz", "matrix.mtx")
    feats = _first(folder, "features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
    barcodes = _first(folder, "barcodes.tsv.gz", "barcodes.tsv")
    if mtx is None or feats is None or barcodes is None:
        raise StoreError(f"{folder} has a matrix.mtx but no features.tsv[.gz]/genes.tsv and barcodes.tsv[.gz]; "
                         "copy the full Cell Ranger output folder")
    try:
        with _open_text(mtx) as fh:
            m = scipy.io.mmread(fh)
        table = pd.read_csv(feats, sep="\t", header=None, dtype=str)
        cells = pd.read_csv(barcodes, sep="\t", header=None, dtype=str)[0]
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"{folder} could not be read as a 10x mtx folder ({type(e).__name__}: {e})") from None
    matrix = sp.csr_matrix(m.T)  # mtx is features × cells
    if matrix.shape != (len(cells), len(table)):
        raise StoreError(f"{folder}: matrix.mtx is {m.shape} but there are {len(table)} features and "
                         f"{len(cells)} barcodes; the folder is inconsistent")
    types = table[2].to_numpy() if table.shape[1] > 2 else np.array([])
    columns = _select_feature_type(types, modality, folder) if len(types) else None
    ids = table[0] if feature_ids == "id" or table.shape[1] < 2 else table[1]
    if columns is not None:
        matrix, ids = matrix[:, columns].tocsr(), ids.iloc[columns]
    return Source(
        path=str(folder), format="10x-mtx", obs=pd.DataFrame(index=pd.Index(cells.astype(str))),
        matrix=InMemoryRows(matrix), feature_ids=pd.Index(ids.astype(str)),
        _obsm=None, _obsm_keys=[],
    )
