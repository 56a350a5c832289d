"""The GPU benchmark in one call: build a reference, map queries offline and through the service,
at the original paper's scale, with the paper's figures beside ours.

    python benchmarks/gpu.py                 # 1,000,000 reference cells, 1,000,000 queries, 10,000 via HTTP
    python benchmarks/gpu.py --reference-cells 1500 --query-cells 400 --service-cells 200   # CPU, small

Every stage runs on whatever the machine has: on an NVIDIA GPU the build trains one Ray Train
worker per GPU under bf16 autocast, the index is built with faiss-gpu when it is installed, the
offline mapper runs one actor per GPU and the service's encoder replica takes a GPU; without one
the same code runs on the CPU (``tests/integration/test_gpu_benchmark.py`` runs it there at a
small size, so it works the first time a GPU is lent).

Stages, each timed separately:

1. **data** (not compared): real pbmc10k cells resampled with replacement (Poisson counts around
   each cell's profile; ``benchmarks/resample.py``) to ``--reference-cells`` cells from the 80 %
   reference split and ``--query-cells`` from the held-out 20 %, written chunk by chunk.
2. **ingest**: the reference into a TileDB-SOMA store (``atlas.store.ingest``).
3. **build**: Concerto (``--epochs``), recalibration, embedding, faiss index and calibration
   (``atlas.build.build_atlas``); its stage times come from the build summary.
4. **offline**: every query cell mapped with ``map_offline`` (Ray Data; Parquet out).
5. **service**: the artifact served by Ray Serve on a Ray of its own (as ``atlas serve`` runs it;
   the encoder replica takes a GPU when there is one); one ``--service-cells`` query through the
   SDK (after a 100-cell warm-up), end to end.

Peak GPU memory is sampled with ``nvidia-smi`` (the whole GPU, every process) every 0.5 s; peak
host memory is the PSS summed over this process and its descendants (Ray's included). Results:
``OUT/gpu.json`` and ``OUT/gpu.md``. The paper's figures (Concerto, Nature Machine Intelligence
2023: 8 GPUs for the reference) are quoted, not re-measured.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("ATLAS_SHARED_DATA", HERE.parents[1] / "shared" / "data"))
PBMC10K = "pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"
LEVELS = ["cell_type_l1", "cell_type_l2"]
#: The original paper's figures for the same three jobs (seconds), quoted for comparison.
PAPER = {"build": (585.0, "1M-cell reference, 8 GPUs"), "offline": (168.0, "1M query cells"),
         "service": (8.0, "10k query cells")}


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0


class Peaks(threading.Thread):
    """Samples the GPUs' used memory (nvidia-smi) and this process tree's PSS until stopped."""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.stop = every, threading.Event()
        self.gpu_mib: float | None = None
        self.host_bytes = 0
        self.smi = shutil.which("nvidia-smi")

    def run(self) -> None:
        import psutil

        sys.path.insert(0, str(HERE))
        from measure import tree_pss

        me = psutil.Process()
        while not self.stop.is_set():
            self.host_bytes = max(self.host_bytes, tree_pss(me)[0])
            if self.smi:
                try:
                    out = subprocess.run([self.smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                         capture_output=True, text=True, timeout=5).stdout
                    used = sum(float(v) for v in out.split())
                    self.gpu_mib = max(self.gpu_mib or 0.0, used)
                except (OSError, ValueError, subprocess.SubprocessError):
                    pass
            self.stop.wait(self.every)


def _stage(results: dict, name: str, started: float, cells: int, **extra: Any) -> None:
    seconds = time.perf_counter() - started
    results["stages"][name] = {"seconds": round(seconds, 2), "cells": int(cells),
                               "cells_per_s": round(cells / seconds, 1) if seconds > 0 else None, **extra}
    print(f"[gpu-bench] {name}: {cells:,} cells in {seconds:.1f} s", flush=True)


def run(args: argparse.Namespace) -> dict:
    import anndata as ad
    import ray
    from ray import serve

    sys.path.insert(0, str(HERE))
    from resample import write_resampled_split

    from atlas.artifact import load_atlas
    from atlas.build import build_atlas
    from atlas.client import AtlasClient
    from atlas.local_cluster import free_port
    from atlas.mapping.offline import map_offline
    from atlas.service.app import run_service
    from atlas.service.config import ServiceArgs
    from atlas.store.ingest import ingest
    from atlas.train.config import build_config_from_dict

    gpus = gpu_count()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"gpus": gpus, "device": _device_name(gpus), "cpu_count": os.cpu_count(),
                               "args": {k: str(v) for k, v in vars(args).items()}, "stages": {}}

    started = t = time.perf_counter()
    reference = out / f"reference_{args.reference_cells}.h5ad"
    query = out / f"query_{args.query_cells}.h5ad"
    reused = reference.exists() and query.exists()
    write_resampled_split(DATA / PBMC10K, reference, args.reference_cells, reference=True)
    write_resampled_split(DATA / PBMC10K, query, args.query_cells, reference=False, seed=1)
    _stage(results, "data", t, args.reference_cells + args.query_cells, reused=reused)

    peaks = Peaks()
    peaks.start()
    workers = max(gpus, 1) if args.workers is None else args.workers
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers + 2), include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        store = out / "store"
        shutil.rmtree(store, ignore_errors=True)
        t = time.perf_counter()
        ingest(store, reference, dataset_id="pbmc10k-resampled", label_keys={lv: lv for lv in LEVELS},
               species="human")
        _stage(results, "ingest", t, args.reference_cells)

        artifact = out / "artifact"
        config = build_config_from_dict({
            "name": "gpu-bench", "store": str(store), "output": str(artifact),
            "model": {"model": "concerto", "modalities": ["RNA"], "embed_dim": args.embed_dim},
            # The training snapshot: a GPU consumes ~40,000 cells/s, beyond point reads of the store.
            "data": {"batch_size": args.batch_size, "single_domain": True, "snapshot": True},
            "train": {"epochs": args.epochs, "lr": 1e-3, "checkpoint_every": 10_000},
            "scaling": {"num_workers": workers, "use_gpu": None},  # None: the GPUs when there are any
            "run": {"storage_path": str(out / "runs")},
            "index": {"levels": LEVELS},
        })
        t = time.perf_counter()
        summary = build_atlas(config, overwrite=True, log=lambda m: print(m, flush=True))
        _stage(results, "build", t, args.reference_cells, workers=workers,
               parts={k: round(v, 1) for k, v in summary.seconds.items()},
               train_cells_per_s=round(summary.train_cells_per_s, 1))

        t = time.perf_counter()
        offline = map_offline(query, artifact, out / "mapped", actors=max(gpus, 1), use_gpu=gpus > 0,
                              block_cells=args.block_cells, overwrite=True, progress=False,
                              log=lambda m: print(m, flush=True))
        _stage(results, "offline", t, offline.cells, actors=max(gpus, 1))
    finally:
        ray.shutdown()
    # The service on a Ray of its own, sized for its replicas (as `atlas serve` starts it).
    try:
        token = secrets.token_urlsafe(24)
        token_file = out / "token"
        token_file.write_text(token + "\n")
        encoder: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": 16,
                                   "ray_actor_options": {"num_cpus": 1, **({"num_gpus": 1} if gpus else {})}}
        service = ServiceArgs.model_validate({"artifact": str(artifact), "token_file": str(token_file),
                                              "encoder": encoder})
        t = time.perf_counter()
        url = run_service(service, port=free_port(), blocking=False, log_line=lambda m: print(f"[serve] {m}"))
        results["service_start_s"] = round(time.perf_counter() - t, 2)
        cells = ad.read_h5ad(query, backed="r")
        big = cells[: min(args.service_cells, cells.n_obs)].to_memory()
        cells.file.close()
        with AtlasClient(url, token=token) as client:
            client.map(big[:100], progress=False)  # warm every deployment
            t = time.perf_counter()
            mapped = client.map(big, progress=False)
            _stage(results, "service", t, mapped.n_obs)
        results["atlas_version"] = load_atlas(artifact, verify="lazy").version
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        peaks.stop.set()
        peaks.join()
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["peak_gpu_memory_gib"] = None if peaks.gpu_mib is None else round(peaks.gpu_mib / 1024, 2)
    results["peak_host_memory_gib"] = round(peaks.host_bytes / 2**30, 2)
    return results


def _device_name(gpus: int) -> str:
    if not gpus:
        return f"CPU only ({os.cpu_count()} cores)"
    import torch

    return f"{gpus} × {torch.cuda.get_device_name(0)}"


def table(r: dict) -> str:
    gpu_mem = "—" if r["peak_gpu_memory_gib"] is None else f"{r['peak_gpu_memory_gib']:.2f} GiB"
    lines = [f"GPU benchmark on {r['device']} (resampled pbmc10k cells; peak GPU memory {gpu_mem}, "
             f"peak host memory {r['peak_host_memory_gib']:.2f} GiB PSS)", "",
             "| stage | cells | seconds | cells/s | paper (s) |", "|---|---:|---:|---:|---|"]
    for name, s in r["stages"].items():
        paper = PAPER.get(name)
        quoted = f"{paper[0]:g} ({paper[1]})" if paper else "—"
        rate = "— (files reused)" if s.get("reused") else f"{s['cells_per_s'] or 0:,.0f}"
        lines.append(f"| {name} | {s['cells']:,} | {s['seconds']:.1f} | {rate} | {quoted} |")
    lines += ["", f"wall time of the whole run {r['wall_s']:.0f} s (service start {r['service_start_s']:.1f} s)"]
    build = r["stages"].get("build", {})
    if build.get("parts"):
        lines += ["", "build stages (s): " + ", ".join(f"{k} {v:g}" for k, v in build["parts"].items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-cells", type=int, default=1_000_000)
    parser.add_argument("--query-cells", type=int, default=1_000_000)
    parser.add_argument("--service-cells", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 1024 on a GPU, 256 on the CPU")
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: one per GPU, else 1)")
    parser.add_argument("--block-cells", type=int, default=16_384, help="offline mapping: cells per read task")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "gpu")
    args = parser.parse_args()
    if args.batch_size is None:
        args.batch_size = 1024 if gpu_count() else 256
    results = run(args)
    text = table(results)
    print(text)
    (args.out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "gpu.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
