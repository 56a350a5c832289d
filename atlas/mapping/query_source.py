"""Read a query's cells one row range at a time: what each read task of the offline mapper does.

A query may be larger than memory, so it is never loaded whole. :func:`open_query` looks at it
on the driver (shapes, cell count and feature ids only) and returns a :class:`QuerySource`, a
small picklable description; :func:`plan_query_blocks` cuts it into :class:`QueryBlock` row
ranges, and :func:`read_query_block` (run inside a Ray read task) reads one range and emits an
Arrow table of raw counts, one row per cell. :func:`block_to_anndata` turns such a table back
into the small AnnData :func:`atlas.mapping.map_query` takes.

Supported queries (the matrices are read exactly where :mod:`atlas.mapping.align` reads them):

* ``.h5ad`` files and AnnData-zarr folders, through h5py / zarr (the storage anndata's backed
  mode uses): RNA from ``layers["counts"]`` if present, else ``X``, read by the ingest's row
  reader (:func:`atlas.store.rows.anndata_rows`: CSR, dense, or a CSC matrix small enough to
  read whole); other modalities from ``obsm[m]`` or ``obsm[f"{m}_counts"]``, a DataFrame whose
  columns are the feature ids.
* atlas stores (a folder made by ``atlas ingest``; its current version is pinned) and plain
  TileDB-SOMA experiments: each measurement's own ``var_id`` are its feature ids (a query store
  has its own vocabulary: features are matched by id, not by position); cells are named by
  ``obs_id``.

Block rows: ``row`` (int64, the cell's position in the query), ``cell_id`` (string) and per
modality ``m`` the cell's non-zero counts in the two list columns every Arrow table of cells
uses (:func:`atlas.names.csr_columns`): ``{m}_ids: list<int32>`` (here: columns of the source's
own feature list, not the atlas vocabulary) and ``{m}_values: list<float32>``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from atlas.mapping.align import MappingError
from atlas.names import csr_columns
from atlas.store.rows import UnreadableMatrix, anndata_rows, check_readable, element_shape, encoding, is_group

FORMATS = ("h5ad", "zarr", "soma")


@dataclass(frozen=True)
class QueryMatrix:
    """Where one modality of the query lives."""

    element: str
    """Path of the element in the AnnData file (``X``, ``layers/counts``, ``obsm/protein``), or
    the measurement name of a SOMA experiment."""
    kind: str
    """``matrix`` (an AnnData matrix element: CSR, CSC or dense), ``dataframe`` (AnnData) or ``soma``."""
    features: tuple[str, ...]
    """Feature id of each column, in the source's column order."""


@dataclass(frozen=True)
class QuerySource:
    """A query opened for block reading: picklable, small (no per-cell arrays)."""

    path: str
    """The file or folder given by the user."""
    format: str
    """``h5ad``, ``zarr`` or ``soma``."""
    n_cells: int
    matrices: dict[str, QueryMatrix]
    """Modality → where it is read from (only the modalities asked for that the query has)."""
    uri: str | None = None
    """SOMA experiment URI (an atlas store's pinned current version)."""
    index_element: str | None = None
    """AnnData element holding the cell ids (``obs/_index``)."""
    batch_key: str | None = None
    """obs column read into each block as ``batch`` (see :func:`with_batch_key`)."""

    @property
    def features(self) -> dict[str, list[str]]:
        return {m: list(q.features) for m, q in self.matrices.items()}


@dataclass(frozen=True)
class QueryBlock:
    """One read task's cells: rows ``start:stop`` of the query."""

    start: int
    stop: int
    joinids: np.ndarray | None = None
    """SOMA ``soma_joinid`` of each row (SOMA queries only)."""

    @property
    def n_cells(self) -> int:
        return self.stop - self.start


# ---------------------------------------------------------------------------------------------
# Opening (driver)
# ---------------------------------------------------------------------------------------------


def open_query(path: str | os.PathLike, modalities: Sequence[str] = ("RNA",)) -> QuerySource:
    """Look at a query on disk and describe how to read ``modalities`` from it, block by block.

    Raises :class:`MappingError` when the path is missing, is not an ``.h5ad`` / AnnData-zarr /
    atlas store, holds none of ``modalities``, or stores them in a way that cannot be read by
    cells.
    """
    p = Path(path)
    if not p.exists():
        raise MappingError(f"query {p} does not exist; pass an .h5ad file, an AnnData-zarr folder or an atlas store")
    if p.is_dir():
        from atlas.store.versions import is_store

        if is_store(p):
            from atlas.data.dataset import resolve_uri

            return _open_soma(str(p), resolve_uri(p), modalities)
        if any((p / n).exists() for n in ("zarr.json", ".zgroup")):
            return _open_anndata(p, "zarr", modalities)
        if (p / "__tiledb_group.tdb").exists() or (p / "__group").exists():
            return _open_soma(str(p), str(p), modalities)
        raise MappingError(f"query {p} is a folder but not an AnnData-zarr store (no zarr.json/.zgroup) "
                           "nor an atlas store (no atlas_store.json); pass an .h5ad file, an AnnData-zarr "
                           "folder or an atlas store")
    import h5py

    try:
        hdf5 = h5py.is_hdf5(p)
    except OSError as e:
        raise MappingError(f"query {p} is not readable ({e}); check the path and its permissions") from None
    if not hdf5:
        raise MappingError(f"query {p} is not an .h5ad file (not HDF5); write the query with "
                           "adata.write_h5ad(...) or adata.write_zarr(...)")
    return _open_anndata(p, "h5ad", modalities)


def _open_root(path: str | Path, fmt: str) -> tuple[Any, Any]:
    """``(root group, close)`` of an AnnData file."""
    if fmt == "h5ad":
        import h5py

        handle = h5py.File(path, "r")
        return handle, handle.close
    import zarr

    try:
        return zarr.open_group(str(path), mode="r"), (lambda: None)
    except Exception as e:  # noqa: BLE001 - any zarr failure is an unreadable query
        raise MappingError(f"query {path} is not a readable zarr store ({e}); write it with adata.write_zarr") from None


def _strings(array: Any, start: int = 0, stop: int | None = None) -> np.ndarray:
    """String values ``start:stop`` of an h5py or zarr array, as a numpy array of ``str``."""
    stop = int(array.shape[0]) if stop is None else stop
    try:
        import h5py

        if isinstance(array, h5py.Dataset) and h5py.check_string_dtype(array.dtype) is not None:
            return np.asarray(array.asstr()[start:stop], dtype=object).astype(str)
    except ImportError:  # pragma: no cover - h5py is a dependency
        pass
    values = np.asarray(array[start:stop])
    if values.dtype.kind == "U":
        return values
    # bytes (h5py), objects or numpy's StringDType (zarr v3): go through Python strings
    items = values.tolist()
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in items], dtype=str)


def _index_of(group: Any) -> str:
    return str(group.attrs.get("_index", "_index"))


def _matrix_of(root: Any, element: str, features: tuple[str, ...], path: Path) -> QueryMatrix:
    try:
        check_readable(root[element])  # on the driver: a matrix the read tasks would refuse fails here
    except UnreadableMatrix as e:
        raise MappingError(f"query {path}: {element} {e}, or map it in memory with atlas.mapping.map_query") from None
    return QueryMatrix(element, "matrix", features)


def _open_anndata(path: Path, fmt: str, modalities: Sequence[str]) -> QuerySource:
    root, close = _open_root(path, fmt)
    try:
        if "obs" not in root or ("X" not in root and "layers" not in root):
            raise MappingError(f"query {path} is {'an HDF5 file' if fmt == 'h5ad' else 'a zarr store'} but not "
                               "an AnnData (no obs/X); write the query with anndata")
        obs = root["obs"]
        index_element = f"obs/{_index_of(obs)}"
        n_cells = int(root[index_element].shape[0])
        matrices: dict[str, QueryMatrix] = {}
        for m in modalities:
            if m == "RNA":
                element = "layers/counts" if "layers" in root and "counts" in root["layers"] else "X"
                if element not in root or "var" not in root:
                    continue
                var = root["var"]
                features = tuple(_strings(var[_index_of(var)]).tolist())
                if not features:
                    continue
                matrices[m] = _matrix_of(root, element, features, path)
                shape = element_shape(root[element])
                if shape != (n_cells, len(features)):
                    raise MappingError(f"query {path}: {element} is {shape} but obs × var is "
                                       f"{(n_cells, len(features))}; the file is inconsistent")
                continue
            obsm = root["obsm"] if "obsm" in root else None
            for key in (m, f"{m}_counts"):
                if obsm is None or key not in obsm:
                    continue
                elem = obsm[key]
                if encoding(elem) != "dataframe":
                    raise MappingError(
                        f"query obsm[{key!r}] has no feature names; store it as a pandas DataFrame whose "
                        f"columns are the {m} feature ids")
                columns = tuple(str(c) for c in np.asarray(elem.attrs.get("column-order", [])).tolist())
                matrices[m] = QueryMatrix(f"obsm/{key}", "dataframe", columns)
                break
    except MappingError:
        close()
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        close()
        raise MappingError(f"query {path} could not be read as AnnData ({type(e).__name__}: {e}); "
                           "check that it was written by anndata") from None
    close()
    return QuerySource(path=str(path), format=fmt, n_cells=n_cells, matrices=matrices,
                       index_element=index_element)


def _open_soma(path: str, uri: str, modalities: Sequence[str]) -> QuerySource:
    from atlas.data.reader import open_experiment

    try:
        exp = open_experiment(uri)
        n_cells = int(exp.obs.count)
    except Exception as e:  # noqa: BLE001
        raise MappingError(f"query {path} could not be opened as a TileDB-SOMA experiment ({e})") from None
    matrices = {}
    for m in modalities:
        if m not in exp.ms:
            continue
        var = exp.ms[m].var.read(column_names=["soma_joinid", "var_id"]).concat().to_pandas()
        var = var.sort_values("soma_joinid")
        if not np.array_equal(var["soma_joinid"].to_numpy(), np.arange(len(var))):
            raise MappingError(f"query {path}: the {m} var soma_joinids are not 0..{len(var) - 1}; "
                               "re-ingest the query with atlas ingest")
        matrices[m] = QueryMatrix(m, "soma", tuple(var["var_id"].astype(str)))
    return QuerySource(path=path, format="soma", n_cells=n_cells, matrices=matrices, uri=uri)


def plan_query_blocks(source: QuerySource, block_cells: int) -> list[QueryBlock]:
    """Consecutive row ranges of at most ``block_cells`` cells covering the query in order."""
    if block_cells < 1:
        raise MappingError(f"block_cells must be ≥ 1, got {block_cells}")
    joinids = None
    if source.format == "soma":
        from atlas.data.reader import open_experiment

        obs = open_experiment(source.uri).obs.read(column_names=["soma_joinid"]).concat()
        joinids = np.sort(obs.column("soma_joinid").to_numpy().astype(np.int64))
    blocks = []
    for start in range(0, source.n_cells, block_cells):
        stop = min(start + block_cells, source.n_cells)
        blocks.append(QueryBlock(start, stop, None if joinids is None else joinids[start:stop].copy()))
    return blocks


# ---------------------------------------------------------------------------------------------
# Reading one block (read task)
# ---------------------------------------------------------------------------------------------


def with_batch_key(source: QuerySource, batch_key: str) -> QuerySource:
    """``source`` reading ``obs[batch_key]`` too (each block's ``batch`` column); refused if absent."""
    import dataclasses

    if source.format == "soma":
        from atlas.data.reader import open_experiment

        names = list(open_experiment(source.uri).obs.schema.names)
    else:
        root, close = _open_root(source.path, source.format)
        try:
            names = [k for k in root["obs"].keys()]
        finally:
            close()
    if batch_key not in names:
        raise MappingError(f"batch_key {batch_key!r} is not a column of the query's obs; it has {names[:20]}")
    return dataclasses.replace(source, batch_key=batch_key)


def read_batches(source: QuerySource, block: QueryBlock) -> np.ndarray:
    """``obs[source.batch_key]`` of the block's cells, as strings (missing values refused)."""
    key = source.batch_key
    if source.format == "soma":
        from atlas.data.reader import open_experiment

        ids = np.asarray(block.joinids, dtype=np.int64)
        obs = open_experiment(source.uri).obs.read(coords=(ids,), column_names=["soma_joinid", key]).concat()
        values = obs.to_pandas().set_index("soma_joinid")[key].reindex(ids)
    else:
        root, close = _open_root(source.path, source.format)
        try:
            elem = root["obs"][key]
            if is_group(elem) and encoding(elem) == "categorical":
                codes = np.asarray(elem["codes"][block.start : block.stop])
                categories = _strings(elem["categories"])
                values = pd.Series(np.where(codes >= 0, categories[np.maximum(codes, 0)], None))
            elif is_group(elem):
                raise MappingError(f"query obs[{key!r}] has encoding {encoding(elem)!r}; use a string or "
                                   "categorical column as batch_key")
            elif getattr(elem.dtype, "kind", "O") in "OSUT":  # strings: decoded once, as the cell ids are
                values = pd.Series(_strings(elem, block.start, block.stop))
            else:
                values = pd.Series(np.asarray(elem[block.start : block.stop]))
        finally:
            close()
    if values.isna().any():
        raise MappingError(f"obs[{key!r}] has missing values; give every cell a batch (or map without batch_key)")
    return values.astype(str).to_numpy(dtype=object)


def block_schema(source: QuerySource) -> pa.Schema:
    fields = [pa.field("row", pa.int64()), pa.field("cell_id", pa.string())]
    if source.batch_key is not None:
        fields.append(pa.field("batch", pa.string()))
    for m in source.matrices:
        ids_column, values_column = csr_columns(m)
        fields += [pa.field(ids_column, pa.list_(pa.int32())), pa.field(values_column, pa.list_(pa.float32()))]
    return pa.schema(fields)


def _read_rows(root: Any, matrix: QueryMatrix, start: int, stop: int) -> sp.csr_matrix:
    elem = root[matrix.element]
    if matrix.kind == "matrix":
        return anndata_rows(elem).rows(start, stop)
    if matrix.kind == "dataframe":
        columns = []
        for name in matrix.features:
            column = elem[name]
            if is_group(column):
                raise MappingError(f"query {matrix.element}[{name!r}] is not numeric (categorical); it must hold counts")
            columns.append(np.asarray(column[start:stop], dtype=np.float32))
        dense = np.stack(columns, axis=1) if columns else np.zeros((stop - start, 0), np.float32)
        return sp.csr_matrix(dense)
    raise ValueError(f"unknown matrix kind {matrix.kind!r}")


def _list_column(indptr: np.ndarray, values: np.ndarray, dtype: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(indptr.astype(np.int32, copy=False)), pa.array(values, type=dtype))


def read_query_block(source: QuerySource, block: QueryBlock) -> pa.Table:
    """Read one block of the query (only its rows) as an Arrow table of raw counts."""
    if source.format == "soma":
        cell_ids, matrices = _read_soma_block(source, block)
    else:
        root, close = _open_root(source.path, source.format)
        try:
            cell_ids = _strings(root[source.index_element], block.start, block.stop)
            matrices = {m: _read_rows(root, q, block.start, block.stop) for m, q in source.matrices.items()}
        finally:
            close()
    columns: dict[str, Any] = {
        "row": pa.array(np.arange(block.start, block.stop, dtype=np.int64)),
        "cell_id": pa.array(cell_ids.tolist(), type=pa.string()),
    }
    if source.batch_key is not None:
        columns["batch"] = pa.array(read_batches(source, block).tolist(), type=pa.string())
    for m, csr in matrices.items():
        csr = sp.csr_matrix(csr, dtype=np.float32)
        csr.sort_indices()
        ids_column, values_column = csr_columns(m)
        columns[ids_column] = _list_column(csr.indptr, csr.indices.astype(np.int32, copy=False), pa.int32())
        columns[values_column] = _list_column(csr.indptr, csr.data, pa.float32())
    return pa.table(columns, schema=block_schema(source))


def _read_soma_block(source: QuerySource, block: QueryBlock) -> tuple[np.ndarray, dict[str, sp.csr_matrix]]:
    from atlas.data.reader import open_experiment, read_csr

    if source.uri is None:
        raise ValueError(f"query {source.path} is not a SOMA query (no experiment URI)")
    uri = source.uri
    exp = open_experiment(uri)
    ids = np.asarray(block.joinids, dtype=np.int64)
    names = exp.obs.schema.names
    column = "obs_id" if "obs_id" in names else None
    if column:
        obs = exp.obs.read(coords=(ids,), column_names=["soma_joinid", column]).concat().to_pandas()
        cell_ids = obs.set_index("soma_joinid")[column].astype(str).reindex(ids).to_numpy()
    else:
        cell_ids = ids.astype(str)
    return np.asarray(cell_ids, dtype=object).astype(str), {
        m: read_csr(uri, q.element, ids) for m, q in source.matrices.items()}


# ---------------------------------------------------------------------------------------------
# Block → AnnData (mapping actor)
# ---------------------------------------------------------------------------------------------


def block_csr(table: pa.Table, modality: str, n_features: int) -> sp.csr_matrix:
    """The ``modality`` counts of a block as a CSR (cells × the source's features)."""
    from atlas.data.arrow import list_column_csr

    ids_column, values_column = csr_columns(modality)
    indptr, indices = list_column_csr(table.column(ids_column))
    _, data = list_column_csr(table.column(values_column))
    return sp.csr_matrix((data.astype(np.float32, copy=False), indices.astype(np.int32, copy=False), indptr),
                         shape=(table.num_rows, n_features))


def block_to_anndata(table: pa.Table, features: dict[str, list[str]], batch_key: str | None = None) -> Any:
    """A block as the AnnData :func:`~atlas.mapping.map_query` reads (RNA in X, others in obsm;
    the ``batch`` column as ``obs[batch_key]``)."""
    import anndata as ad

    obs = pd.DataFrame(index=pd.Index(table.column("cell_id").to_pylist(), dtype=str))
    if batch_key is not None:
        obs[batch_key] = table.column("batch").to_pylist()
    if "RNA" in features:
        adata = ad.AnnData(X=block_csr(table, "RNA", len(features["RNA"])), obs=obs,
                           var=pd.DataFrame(index=pd.Index(features["RNA"], dtype=str)))
    else:
        adata = ad.AnnData(obs=obs)
    for m, names in features.items():
        if m != "RNA":
            dense = block_csr(table, m, len(names)).toarray()
            adata.obsm[m] = pd.DataFrame(dense, index=obs.index, columns=list(names))
    return adata
