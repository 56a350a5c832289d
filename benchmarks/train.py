"""Training benchmark: cells/s and peak memory per worker, Ray Train from the store vs one process
from memory, in the same run.

* ``ray-train``: ``atlas.train`` — Ray Data streams the SOMA store into N Ray Train workers (DDP,
  gloo on CPU), the production path of ``atlas build``.
* ``in-memory``: the same model and the same ``train_step`` in one process over minibatches
  pre-built from the whole AnnData in memory (``fit_local``) — what a user without Ray would run.

Throughput is cells per second of the last epoch (the first includes start-up); memory is the
peak resident set of each Ray Train worker process (sampled every 0.2 s), or of the process.

    python benchmarks/train.py               # writes benchmarks/out/train.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("ATLAS_SHARED_DATA", HERE.parents[1] / "shared" / "data"))

CASES = {
    "pbmc10k RNA (6,855 cells × 4,000 genes), Concerto": dict(
        file="pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad", modality="rna", modalities=["RNA"],
        model={"model": "concerto", "modalities": ["RNA"]}, batch_size=64, single_domain=True),
    "ADTnorm protein (422,682 cells × 9), Concerto": dict(
        file="adtnorm_13studies_adt9_422k.h5ad", modality="protein", modalities=["protein"], batch_key="batch",
        model={"model": "concerto", "modalities": ["protein"]}, batch_size=256, single_domain=True),
}


def _store(out: Path, name: str, case: dict) -> Path:
    from atlas.store.ingest import ingest
    from atlas.store.versions import is_store

    store = out / "stores" / Path(case["file"]).stem
    if not is_store(store):
        ingest(store, DATA / case["file"], modality=case["modality"], dataset_id=Path(case["file"]).stem[:40],
               batch_key=case.get("batch_key"), species="human")
    return store


class _PeakRss:
    """Peak RSS of matching processes, sampled in a thread."""

    def __init__(self, match):
        self.match, self.peaks, self._stop = match, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                if p.info["cmdline"] and self.match(p.info["cmdline"]) and p.info["memory_info"]:
                    self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), p.info["memory_info"].rss)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_ray(store: Path, case: dict, workers: int, epochs: int, max_cells: int | None) -> dict:
    import ray

    from atlas.data.dataset import build_plan, vocabulary_sizes
    from atlas.train.config import build_config_from_dict
    from atlas.train.trainer import train

    ray.init(num_cpus=max(4, workers + 2), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    build = build_config_from_dict({
        "name": f"bench-{workers}w", "store": str(store), "output": str(store.parent / "unused"),
        "model": case["model"], "data": {"batch_size": case["batch_size"], "single_domain": case["single_domain"]},
        "train": {"epochs": epochs, "checkpoint_every": 10**9}, "scaling": {"num_workers": workers, "use_gpu": False},
        "run": {"storage_path": str(store.parent.parent / "runs")},
    })
    joinids = None
    if max_cells:
        from atlas.data.dataset import select_cells

        ids, _, _ = select_cells(build_plan(store, build.data).uri, "batch")
        joinids = ids[:max_cells]
    plan = build_plan(store, build.data, joinids=joinids)
    with _PeakRss(lambda cmd: cmd[0].startswith("ray::RayTrainWorker")) as rss:
        result = train(build, plan, vocabulary_sizes(store, case["modalities"]))
    ray.shutdown()
    last = result.history["epochs"][-1]
    return {"cells": last["cells"], "cells_per_s": last["cells_per_s"],
            "first_epoch_cells_per_s": result.history["epochs"][0]["cells_per_s"],
            "peak_rss_mb_per_worker": max(rss.peaks.values(), default=0) / 2**20, "final_loss": last["loss"]}


def run_memory(case: dict, epochs: int, max_cells: int | None) -> dict:
    import resource

    import anndata as ad
    import numpy as np
    import scipy.sparse as sp
    import torch

    from atlas.data.batches import csr_to_batch
    from atlas.models.config import build_model, config_from_dict
    from atlas.train.step import fit_local, minibatches

    torch.set_num_threads(1)
    adata = ad.read_h5ad(DATA / case["file"])
    if max_cells:
        adata = adata[:max_cells].copy()
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    key = case.get("batch_key")
    domains = np.unique(adata.obs[key].astype(str), return_inverse=True)[1] if key else np.zeros(adata.n_obs)
    batch = csr_to_batch({case["modalities"][0]: counts}, domain=domains)
    model = build_model(config_from_dict(case["model"]), {case["modalities"][0]: counts.shape[1]},
                        int(domains.max()) + 1)
    history = fit_local(model, lambda e: minibatches(batch, case["batch_size"], seed=e, by_domain=case["single_domain"]),
                        epochs, 1e-3, steps_per_epoch=adata.n_obs // case["batch_size"])
    per_epoch = history.seconds / epochs
    return {"cells": adata.n_obs, "cells_per_s": adata.n_obs / per_epoch, "first_epoch_cells_per_s": None,
            "peak_rss_mb_per_worker": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "final_loss": history.epochs[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-cells", type=int, default=100_000, help="cells per case (the 422k set is capped)")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # one measurement, in a fresh process
        case = CASES[args.case]
        if args.run == "memory":
            print(json.dumps(run_memory(case, args.epochs, args.max_cells)))
        else:
            store = _store(args.out, args.case, case)
            print(json.dumps(run_ray(store, case, int(args.run), args.epochs, args.max_cells)))
        return

    import subprocess

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, case in CASES.items():
        _store(args.out, name, case)
        for label, run in [("atlas: Ray Train, 1 worker, streamed from the store", "1"),
                           ("atlas: Ray Train, 2 workers (DDP), streamed from the store", "2"),
                           ("one process, whole AnnData in memory (fit_local)", "memory")]:
            proc = subprocess.run([sys.executable, __file__, "--run", run, "--case", name, "--epochs", str(args.epochs),
                                   "--max-cells", str(args.max_cells), "--out", str(args.out)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{label} on {name} failed:\n{proc.stderr[-3000:]}")
            rows.append({"case": name, "setup": label, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "train.json").write_text(json.dumps(rows, indent=2))
    lines = ["| data, model | setup | cells/epoch | cells/s (last epoch) | peak RSS per worker (MiB) | final loss |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['setup']} | {r['cells']:,} | {r['cells_per_s']:,.0f} | "
                     f"{r['peak_rss_mb_per_worker']:,.0f} | {r['final_loss']:.3f} |")
    (args.out / "train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
