"""annbatch's loader on the same cells as ``benchmarks/loader.py`` (run by it, in annbatch's own
environment: annbatch needs Python ≥ 3.12, this project runs on 3.11).

    python3.12 benchmarks/loader_annbatch.py --h5ad CELLS.h5ad --collection OUT.zarr --epochs 3

Writes annbatch's preshuffled, sharded zarr collection once (``DatasetCollection.add_adatas``,
timed), then iterates shuffled epochs with ``Loader(chunk_size=64, preload_nchunks=256)``
(annbatch's documented settings) and the zarrs codec pipeline; batches are raw-count CSR
matrices. Prints one JSON line: per epoch cells, non-zeros and seconds, plus the write time.
Imports nothing of this project.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--h5ad", type=Path, required=True)
    parser.add_argument("--collection", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    import zarr
    import zarrs  # noqa: F401 - the Rust codec pipeline annbatch recommends

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    from annbatch import DatasetCollection, Loader

    start = time.perf_counter()
    if not (args.collection / "zarr.json").exists():
        shutil.rmtree(args.collection, ignore_errors=True)
        DatasetCollection(args.collection).add_adatas([str(args.h5ad)], shuffle=True,
                                                      rng=np.random.default_rng(0))
    write_seconds = time.perf_counter() - start
    loader = Loader(chunk_size=64, preload_nchunks=256, batch_size=args.batch_size, shuffle=True,
                    preload_to_gpu=False, rng=np.random.default_rng(0))
    loader.use_collection(DatasetCollection(args.collection, mode="r"))
    results = []
    for epoch in range(args.epochs):
        start, cells, nnz = time.perf_counter(), 0, 0
        for batch in loader:
            x = batch["X"]
            cells += x.shape[0]
            nnz += int(x.nnz)
        results.append({"epoch": epoch, "cells": cells, "nnz": nnz, "seconds": time.perf_counter() - start,
                        "plan_seconds": write_seconds})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
