"""Grow a real dataset to benchmark scale by resampling its cells.

Cells are drawn with replacement and each draw's counts are Poisson-resampled around the cell's
own profile with a random depth factor, so the result keeps real gene-gene structure without
being copies. Every figure measured on such data must say the cells are resampled.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp


def resample_counts(
    csr: sp.csr_matrix, n_cells: int, seed: int = 0, depth: tuple[float, float] = (0.8, 1.2)
) -> tuple[sp.csr_matrix, np.ndarray]:
    """``n_cells`` resampled cells: (counts CSR, index of the source cell of each)."""
    rng = np.random.default_rng(seed)
    source = rng.integers(0, csr.shape[0], n_cells)
    picked = csr[source]
    scale = np.repeat(rng.uniform(*depth, n_cells), np.diff(picked.indptr))
    counts = rng.poisson(picked.data * scale).astype(np.float32)
    out = sp.csr_matrix((counts, picked.indices, picked.indptr), shape=picked.shape)
    out.eliminate_zeros()
    # A cell whose every count resampled to zero keeps one count of its top feature.
    empty = np.flatnonzero(np.diff(out.indptr) == 0)
    if empty.size:
        fix = sp.lil_matrix(out.shape, dtype=np.float32)
        for i in empty:
            row = picked.getrow(i)
            fix[i, row.indices[np.argmax(row.data)]] = 1.0
        out = (out + fix.tocsr()).tocsr()
    return out, source


def resample_h5ad(src: Path, dst: Path, n_cells: int, seed: int = 0) -> Path:
    """Write a resampled copy of ``src`` with ``n_cells`` cells (obs columns carried over)."""
    adata = ad.read_h5ad(src)
    counts, source = resample_counts(sp.csr_matrix(adata.X), n_cells, seed)
    obs = adata.obs.iloc[source].reset_index(drop=True)
    obs.index = [f"r{i}" for i in range(n_cells)]
    obs["resampled_from"] = adata.obs_names[source].astype(str)
    out = ad.AnnData(X=counts, obs=obs, var=adata.var.copy())
    out.uns["source"] = f"resampled ({n_cells} cells, seed {seed}) from {src.name}: " + str(
        adata.uns.get("source", "")
    )
    dst.parent.mkdir(parents=True, exist_ok=True)
    out.write_h5ad(dst)
    return dst


def write_resampled_split(src: Path, dst: Path, n_cells: int, *, reference: bool, chunk: int = 100_000,
                          seed: int = 0, labels: tuple[str, ...] = ("cell_type_l1", "cell_type_l2")) -> Path:
    """Write ``n_cells`` cells resampled from one side of ``src``'s 80/20 split (``reference``: the
    80 % the demo and the benchmarks build atlases from; else the held-out 20 %) to an .h5ad, one
    chunk at a time: X is appended to the on-disk CSR, never held whole. RNA counts in X, the
    ``labels`` columns and ``resampled_from`` in obs. An existing ``dst`` is reused."""
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    if dst.exists():
        return dst
    full = ad.read_h5ad(src)
    side = np.random.default_rng(0).random(full.n_obs) < 0.8  # the split every benchmark uses
    source = full[side if reference else ~side]
    csr = sp.csr_matrix(source.X, dtype=np.float32)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".partial")
    picked = []
    with h5py.File(tmp, "w") as f:
        for i, start in enumerate(range(0, n_cells, chunk)):
            counts, drawn = resample_counts(csr, min(chunk, n_cells - start), seed=seed + i)
            counts = sp.csr_matrix(counts, dtype=np.float32)
            counts.indices = counts.indices.astype(np.int32)
            if i == 0:
                write_elem(f, "X", counts)  # anndata makes the CSR arrays resizable (maxshape None)
            else:
                sparse_dataset(f["X"]).append(counts)
            picked.append(drawn)
            print(f"  {dst.name}: {start + counts.shape[0]:,}/{n_cells:,} cells written", flush=True)
        drawn = np.concatenate(picked)
        obs = source.obs.iloc[drawn][[c for c in labels if c in source.obs]].reset_index(drop=True)
        obs.index = pd.Index([f"r{i}" for i in range(n_cells)])
        obs["resampled_from"] = source.obs_names[drawn].astype(str)
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=source.var_names.astype(str)))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
    check = ad.read_h5ad(tmp, backed="r")
    assert check.shape == (n_cells, source.n_vars), check.shape
    check.file.close()
    tmp.rename(dst)
    return dst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--cells", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(resample_h5ad(args.src, args.dst, args.cells, args.seed))
