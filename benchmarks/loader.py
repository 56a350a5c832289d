"""Loader benchmark: one shuffled epoch of cells/s and peak memory, ours vs tiledbsoma-ml.

Both loaders read the same SOMA store (built with ``atlas ingest``) in the same run, each in its
own subprocess so that memory is measured cleanly: the peak proportional set size (PSS) summed
over the process and all its descendants (for Ray: the driver, raylet, GCS and the read-task
workers; shared object-store pages are counted once).

* ours: ``atlas.data`` — Ray Data read tasks over soma_joinid blocks (chunk + block shuffle,
  local shuffle buffer), library-size normalisation + log1p, padded index-value tensors ready
  for the model.
* peer: ``tiledbsoma_ml.ExperimentDataset`` (shuffle=True, sparse X), iterated through its
  ``experiment_dataloader``; raw counts, no normalisation.

Datasets: (a) the real 422,682-cell ADTnorm protein atlas (9 antibodies); (b) the 33,539-gene
whole-transcriptome COVID BALF set, **resampled** to ``--wt-cells`` cells (Poisson resampling of
real cells; see benchmarks/resample.py).

    python benchmarks/loader.py                # writes benchmarks/out/loader.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("ATLAS_SHARED_DATA", HERE.parents[1] / "shared" / "data"))


# ----------------------------------------------------------------------------- stores
def prepare_stores(out: Path, wt_cells: int) -> tuple[dict[str, Path], dict[str, str]]:
    """The stores (name → folder) and the h5ad each was ingested from (what annbatch reads)."""
    from atlas.store.ingest import ingest
    from atlas.store.versions import is_store

    sys.path.insert(0, str(HERE))
    from resample import resample_h5ad

    stores = {}
    adt = out / "stores" / "adt422k"
    if not is_store(adt):
        ingest(adt, DATA / "adtnorm_13studies_adt9_422k.h5ad", modality="protein",
               dataset_id="adtnorm", batch_key="batch", species="human")
    stores["adt422k (real, 9 proteins)"] = adt
    wt = out / "stores" / f"wt{wt_cells // 1000}k"
    h5 = out / f"liao_resampled_{wt_cells}.h5ad"
    if not is_store(wt):
        if not h5.exists():
            resample_h5ad(DATA / "liao2020_covid_balf_3patients_rna_labelled.h5ad", h5, wt_cells)
        ingest(wt, h5, modality="rna", dataset_id="liao_resampled", batch_key="patient", species="human")
    stores[f"liao {wt_cells // 1000}k (resampled, 33,539 genes)"] = wt
    sources = {"adt422k (real, 9 proteins)": str(DATA / "adtnorm_13studies_adt9_422k.h5ad")}
    if h5.exists():
        sources[f"liao {wt_cells // 1000}k (resampled, 33,539 genes)"] = str(h5)
    return stores, sources


# ----------------------------------------------------------------------------- runners
def _csr_batches(ds, batch_size: int, modality: str):
    """Raw CSR minibatches (scipy) sliced from the dataset's blocks: what annbatch yields, for a
    like-for-like row beside the model-ready batches."""
    import scipy.sparse as sp

    from atlas.data.arrow import list_column_csr

    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        indptr, ids = list_column_csr(block.column(f"{modality}_ids"))
        _, values = list_column_csr(block.column(f"{modality}_values"))
        for start in range(0, block.num_rows, batch_size):
            stop = min(block.num_rows, start + batch_size)
            a, b = indptr[start], indptr[stop]
            yield sp.csr_matrix((values[a:b], ids[a:b], indptr[start:stop + 1] - a), shape=(stop - start, int(ids.max()) + 1))


def run_ours(store: str, batch_size: int, epochs: int, modality: str, snapshot: bool = False,
             csr: bool = False) -> list[dict]:
    import ray

    from atlas.data.dataset import StreamConfig, build_plan, iter_batches, make_dataset

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = StreamConfig(modalities=(modality,), batch_size=batch_size, shuffle=True, snapshot=snapshot)
    start = time.perf_counter()
    plan = build_plan(store, config)  # with snapshot: writes it (once per store version) or reuses it
    plan_seconds = time.perf_counter() - start
    ds = make_dataset(plan)
    results = []
    for epoch in range(epochs):
        start, cells, nnz = time.perf_counter(), 0, 0
        if csr:
            for x in _csr_batches(ds, batch_size, modality):
                cells += x.shape[0]
                nnz += int(x.nnz)
        else:
            for batch in iter_batches(ds, plan, epoch=epoch, shuffle_buffer=config.shuffle_buffer):
                cells += batch["soma_joinid"].numel()
                nnz += int(batch[f"{modality}_mask"].sum())
        results.append({"epoch": epoch, "cells": cells, "nnz": nnz, "seconds": time.perf_counter() - start,
                        "plan_seconds": plan_seconds})
    ray.shutdown()
    return results


def run_peer(store: str, batch_size: int, epochs: int, modality: str, workers: int) -> list[dict]:
    import tiledbsoma
    from tiledbsoma_ml import ExperimentDataset, experiment_dataloader

    from atlas.data.dataset import resolve_uri

    results = []
    with tiledbsoma.Experiment.open(resolve_uri(store)) as exp:
        with exp.axis_query(measurement_name=modality) as query:
            # Sparse X cannot cross DataLoader worker processes (torch refuses): dense with workers.
            ds = ExperimentDataset(query, layer_name="counts", batch_size=batch_size, shuffle=True,
                                   seed=0, return_sparse_X=workers == 0)
            loader = experiment_dataloader(ds, num_workers=workers)
            for epoch in range(epochs):
                ds.set_epoch(epoch)
                start, cells, nnz = time.perf_counter(), 0, 0
                for X, _obs in loader:
                    cells += X.shape[0]
                    nnz += X.nnz if hasattr(X, "nnz") else int((X != 0).sum())
                results.append({"epoch": epoch, "cells": cells, "nnz": nnz, "seconds": time.perf_counter() - start})
    return results


# ----------------------------------------------------------------------------- measurement
def measure(args: list[str], script: str = __file__, python: str | None = None) -> dict:
    """Run one loader in a subprocess, sampling its process tree's PSS (benchmarks/measure.py)."""
    from measure import run_measured

    epochs, sampled = run_measured(script, args, python=python)
    return {"epochs": epochs, "peak_pss_mb": sampled["peak_pss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--wt-cells", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3,
                        help="the first epochs include start-up (Ray workers, numba); the table reports the last")
    parser.add_argument("--only", help="run only datasets whose name contains this")
    parser.add_argument("--run", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--modality", default="RNA", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--snapshot", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--csr", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--annbatch-python", default=os.environ.get("ATLAS_ANNBATCH_PYTHON"),
                        help="a Python >= 3.12 with annbatch and zarrs installed (annbatch's own environment); "
                             "without it the annbatch rows are left out")
    args = parser.parse_args()

    if args.run == "ours":
        print(json.dumps(run_ours(args.store, args.batch_size, args.epochs, args.modality, args.snapshot, args.csr)))
        return
    if args.run == "peer":
        print(json.dumps(run_peer(args.store, args.batch_size, args.epochs, args.modality, args.workers)))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    stores, sources = prepare_stores(args.out, args.wt_cells)
    rows = []
    for name, store in stores.items():
        if args.only and args.only not in name:
            continue
        modality = "protein" if "adt" in name else "RNA"
        common = ["--store", str(store), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
                  "--modality", modality]
        runs = [("atlas.data (Ray Data, 4 read slots)", ["--run", "ours"]),
                ("atlas.data, training snapshot (Ray Data, 4 read slots)", ["--run", "ours", "--snapshot"]),
                ("atlas.data, training snapshot, raw CSR batches", ["--run", "ours", "--snapshot", "--csr"]),
                ("tiledbsoma-ml, num_workers=0", ["--run", "peer", "--workers", "0"]),
                ("tiledbsoma-ml, num_workers=2", ["--run", "peer", "--workers", "2"])]
        if args.annbatch_python and name in sources:
            runs.append(("annbatch 0.3.1 (preshuffled zarr collection, chunk 64 × 256 preloaded; raw CSR)",
                         ["--annbatch", sources[name]]))
        elif name in sources:
            print("annbatch: no --annbatch-python (a Python >= 3.12 with annbatch); its row is left out", flush=True)
        for label, extra in runs:
            if extra[0] == "--annbatch":
                collection = args.out / f"annbatch_{Path(store).name}.zarr"
                result = measure(["--h5ad", extra[1], "--collection", str(collection), "--batch-size",
                                  str(args.batch_size), "--epochs", str(args.epochs)],
                                 script=str(HERE / "loader_annbatch.py"), python=args.annbatch_python)
            else:
                result = measure(common + extra)
            last = result["epochs"][-1]
            rows.append({"dataset": name, "loader": label, "cells": last["cells"],
                         "cells_per_s": last["cells"] / last["seconds"],
                         "first_epoch_cells_per_s": result["epochs"][0]["cells"] / result["epochs"][0]["seconds"],
                         "plan_seconds": result["epochs"][0].get("plan_seconds"),
                         "peak_pss_mb": result["peak_pss_mb"]})
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "loader.json").write_text(json.dumps(rows, indent=2))
    lines = ["| dataset | loader | cells/epoch | shuffled cells/s (last epoch) | first epoch cells/s | "
             "peak memory (PSS, MiB) | plan or write (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        written = "" if r.get("plan_seconds") is None else f"{r['plan_seconds']:,.1f}"
        lines.append(f"| {r['dataset']} | {r['loader']} | {r['cells']:,} | {r['cells_per_s']:,.0f} | "
                     f"{r['first_epoch_cells_per_s']:,.0f} | {r['peak_pss_mb']:,.0f} | {written} |")
    (args.out / "loader.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
