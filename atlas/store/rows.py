"""Reading a cells × features matrix one block of rows at a time: the one row reader of the
project, used by the ingest (:mod:`atlas.store.sources`) and by the offline mapper's read tasks
(:mod:`atlas.mapping.query_source`).

An AnnData element (``X``, ``layers/counts`` of an ``.h5ad`` file or AnnData-zarr folder) is
opened with :func:`anndata_rows`:

* CSR (anndata's on-disk sparse dataset, ``anndata.io.sparse_dataset``): only the requested
  rows are read.
* dense arrays: sliced by rows.
* CSC: stored column by column, so a block of cells touches every column. It is read whole,
  once per opening, when it holds at most :data:`CSC_MAX_ENTRIES` stored values; a larger one is
  refused with how to rewrite it as CSR (reading it block by block would read it whole per block).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

#: The largest CSC matrix (stored values) read whole: 10^8 values are ~0.8 GB as float32 + int32.
CSC_MAX_ENTRIES = 100_000_000

_REWRITE_CSR = "rewrite it as CSR (adata.X = adata.X.tocsr(); adata.write_h5ad(...))"


class UnreadableMatrix(ValueError):
    """A matrix element that cannot be read by rows (the caller adds which file and element)."""


class RowMatrix:
    """A cells × features matrix that can be read one block of rows (cells) at a time."""

    shape: tuple[int, int]

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as a CSR matrix (only these rows are read)."""
        raise NotImplementedError

    def row_nnz(self) -> np.ndarray | None:
        """Stored entries per row when that is cheap to know (CSR index pointer), else None."""
        return None


class CSRArrays(RowMatrix):
    """CSR held as three on-disk arrays (h5py or zarr): ``data``, ``indices``, ``indptr``.

    How 10x stores its matrix (CSC of features × cells, i.e. CSR of cells × features); AnnData's
    CSR goes through :class:`SparseDatasetRows`. Each block reads its slice of ``indptr`` only.
    """

    def __init__(self, data: Any, indices: Any, indptr: Any, shape: tuple[int, int],
                 columns: np.ndarray | None = None):
        self._data, self._indices, self._indptr = data, indices, indptr
        self._columns = columns  # optional column subset (10x files with several feature types)
        n_cols = shape[1] if columns is None else len(columns)
        self.shape = (int(shape[0]), int(n_cols))
        self._n_source_cols = int(shape[1])

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        indptr = np.asarray(self._indptr[start : stop + 1], dtype=np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        block = sp.csr_matrix((np.asarray(self._data[lo:hi]), np.asarray(self._indices[lo:hi]), indptr - lo),
                              shape=(stop - start, self._n_source_cols))
        return block if self._columns is None else block[:, self._columns].tocsr()

    def row_nnz(self) -> np.ndarray | None:
        return np.diff(np.asarray(self._indptr[:], dtype=np.int64)) if self._columns is None else None


class SparseDatasetRows(RowMatrix):
    """An AnnData CSR element on disk, read through anndata's sparse dataset."""

    def __init__(self, elem: Any):
        from anndata.io import sparse_dataset

        self._elem = elem
        self._dataset = sparse_dataset(elem)
        self.shape = tuple(int(s) for s in self._dataset.shape)  # type: ignore[assignment]

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        return sp.csr_matrix(self._dataset[start:stop])

    def row_nnz(self) -> np.ndarray | None:
        return np.diff(np.asarray(self._elem["indptr"][:], dtype=np.int64))


class DenseRows(RowMatrix):
    """A dense 2-D array on disk (h5py / zarr) or in memory; rows are sliced on demand."""

    def __init__(self, array: Any):
        self._array = array
        self.shape = (int(array.shape[0]), int(array.shape[1]) if len(array.shape) > 1 else 1)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        return sp.csr_matrix(np.asarray(self._array[start:stop]).reshape(stop - start, self.shape[1]))


class InMemoryRows(RowMatrix):
    """A matrix already in memory (scipy sparse, numpy) or a dask array (computed per block)."""

    def __init__(self, matrix: Any):
        if sp.issparse(matrix):
            matrix = sp.csr_matrix(matrix)
        self._matrix = matrix
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        block = self._matrix[start:stop]
        if hasattr(block, "compute"):  # dask
            block = block.compute()
        if hasattr(block, "to_scipy_sparse"):  # sparse-backed dask chunks
            block = block.to_scipy_sparse()
        return sp.csr_matrix(block)

    def row_nnz(self) -> np.ndarray | None:
        if sp.isspmatrix_csr(self._matrix):
            return np.diff(self._matrix.indptr)
        return None


def encoding(elem: Any) -> str:
    """An AnnData element's ``encoding-type`` (``array`` when it has none: a plain dataset)."""
    return str(elem.attrs.get("encoding-type", "array"))


def is_group(elem: Any) -> bool:
    """An h5py / zarr group (as opposed to an array)."""
    return hasattr(elem, "keys") and not hasattr(elem, "dtype")


def element_shape(elem: Any) -> tuple[int, int]:
    """``(rows, columns)`` of an AnnData matrix element, read from its attributes (no data)."""
    if encoding(elem) in ("csr_matrix", "csc_matrix"):
        rows, cols = (int(s) for s in np.asarray(elem.attrs["shape"]).tolist())
        return rows, cols
    return int(elem.shape[0]), int(elem.shape[1]) if len(elem.shape) > 1 else 1


def csc_entries(elem: Any) -> int:
    """Stored values of a CSC element (from its arrays' shapes, nothing read)."""
    return int(elem["data"].shape[0])


def check_csc(elem: Any, limit: int | None = None) -> None:
    """Refuse a CSC element too large to read whole (:data:`CSC_MAX_ENTRIES`)."""
    limit = CSC_MAX_ENTRIES if limit is None else limit
    if csc_entries(elem) > limit:
        raise UnreadableMatrix(
            f"is stored column by column (CSC) with {csc_entries(elem):,} values, more than the "
            f"{limit:,} read whole (a block of cells touches every column); {_REWRITE_CSR}")


def check_readable(elem: Any) -> None:
    """What :func:`anndata_rows` refuses, checked without reading any values: a CSC element too
    large to read whole, and groups that are not a sparse matrix."""
    kind = encoding(elem)
    if kind == "csc_matrix":
        check_csc(elem)
    elif is_group(elem) and kind != "csr_matrix":
        raise UnreadableMatrix(f"has an unsupported encoding {kind!r}; store counts as a CSR or dense matrix")


def anndata_rows(elem: Any) -> RowMatrix:
    """The row reader of an AnnData matrix element (CSR, CSC or dense; see the module doc)."""
    check_readable(elem)
    kind = encoding(elem)
    if kind == "csr_matrix":
        return SparseDatasetRows(elem)
    if kind == "csc_matrix":
        from anndata.io import sparse_dataset

        return InMemoryRows(sparse_dataset(elem).to_memory())
    return DenseRows(elem)
