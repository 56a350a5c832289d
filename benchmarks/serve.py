"""Mapping service throughput and latency, next to in-process mapping and PCA + kNN in the same run.

    python benchmarks/serve.py [--artifact DIR] [--seconds 60] [--clients 8] [--request-cells 1000] [--batch NAME]

What it measures (results printed and written to benchmarks/out/serve.{md,json}):

1. **Service under load**: ``--clients`` threads, each an :class:`atlas.client.AtlasClient`, send
   ``--request-cells``-cell queries (real pbmc10k query cells resampled with replacement, RNA
   only, protein predicted) for ``--seconds`` s against a local Ray Serve app on the artifact:
   cells/s, requests/s, p50/p99 latency per request, peak memory of all Ray processes.
2. **One 10k-cell query end to end through the SDK** (chunked HTTP requests; the paper's anchor is
   10k cells in 8 s on a GPU).
3. **Peers, same cells, same process**: ``atlas.map_query`` in one process (what a user without
   the service runs), and the Seurat/Azimuth-style PCA + kNN baseline
   (:class:`atlas.evaluate.baselines.PcaKnnBaseline`) fitted on the same 80% reference.

``--batch NAME`` maps every query as one batch of that name (``batch=NAME``: each request's cells
normalised by their own statistics, ``domain_statistics="auto"``), the way a user maps one sample;
without it every cell uses the reference's average statistics.

The artifact defaults to the pbmc10k atlas ``benchmarks/mapping_quality.py`` builds (80%
reference, seed 0); its held-out 20% are the query cells. Fixed replicas (no autoscaling: on two
cores new replicas steal the CPUs the running ones need).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PBMC10K = "pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"
LEVELS = ["cell_type_l1", "cell_type_l2"]


def _data_dir() -> Path:
    return Path(os.environ.get("ATLAS_SHARED_DATA", HERE.parent.parent / "shared" / "data"))


def _ray_memory_gib() -> float:
    """RSS of this process and every process it started (the local Ray: raylet, workers, Serve)."""
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**30


class PeakMemory(threading.Thread):
    def __init__(self, every: float = 1.0):
        super().__init__(daemon=True)
        self.every, self.peak, self.stop = every, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _ray_memory_gib())
            self.stop.wait(self.every)


def _split(source: Path) -> tuple[ad.AnnData, ad.AnnData]:
    """The demo's and mapping_quality's split: 80% reference, 20% query (seed 0)."""
    adata = ad.read_h5ad(source)
    reference = np.random.default_rng(0).random(adata.n_obs) < 0.8
    return adata[reference].copy(), adata[~reference].copy()


def _resample(query: ad.AnnData, n: int, seed: int) -> ad.AnnData:
    rows = np.random.default_rng(seed).integers(0, query.n_obs, n)
    out = query[rows].copy()
    out.obs_names = [f"q{seed}_{i}" for i in range(n)]
    out.obsm.clear()  # RNA only: proteins are predicted
    return out


def _load(url: str, token: str, clients: int, seconds: float, request_cells: int,
          pool: list[ad.AnnData], options: dict) -> dict:
    from atlas.client import AtlasClient

    latencies: list[float] = []
    stages: list[dict[str, float]] = []  # per request: client stages and the Server-Timing ones
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(i: int) -> None:
        with AtlasClient(url, token=token, max_cells_per_request=request_cells) as client:
            j = i
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                try:
                    client.map(pool[j % len(pool)], predict=["protein"], progress=False, **options)
                except Exception as e:  # noqa: BLE001 — counted and reported, the run goes on
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}"[:200])
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t)
                    stages.append(_mean_stages(client.timings))
                j += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    lat = np.array(latencies)
    tail = np.percentile(lat, 95) if lat.size else np.inf
    slow = [st for st, x in zip(stages, lat) if x >= tail]
    return {
        "stages_mean": _mean_stages(stages), "stages_slowest_5pct": _mean_stages(slow),
        "clients": clients, "seconds": elapsed, "requests": int(lat.size), "errors": len(errors),
        "error_examples": errors[:3], "cells_per_s": lat.size * request_cells / elapsed,
        "requests_per_s": lat.size / elapsed,
        "p50_s": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_s": float(np.percentile(lat, 99)) if lat.size else None,
    }


def _mean_stages(timings: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per stage over the requests of one query (client stages and ``server.*``)."""
    names = list(dict.fromkeys(name for t in timings for name in t))
    return {name: float(np.mean([t.get(name, 0.0) for t in timings])) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path,
                        default=HERE / "out" / "mapping_quality" / "artifacts" / "reference")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--request-cells", type=int, default=1000)
    parser.add_argument("--big-query", type=int, default=10_000)
    parser.add_argument("--encoder-cpus", type=float, default=None,
                        help="CPUs (torch threads) of the encoder replica (default: ServiceArgs' default)")
    parser.add_argument("--batch", default=None,
                        help="map every query as one batch of this name (its own normalisation statistics)")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    options = {"batch": args.batch} if args.batch else {}
    if not (args.artifact / "manifest.json").is_file():
        sys.exit(f"no atlas at {args.artifact}: run `python benchmarks/mapping_quality.py` first "
                 "(it builds the pbmc10k reference atlas) or pass --artifact")

    import ray
    from ray import serve

    from atlas import load_atlas, map_query
    from atlas.client import AtlasClient
    from atlas.evaluate.baselines import PcaKnnBaseline
    from atlas.local_cluster import free_port
    from atlas.service.app import run_service
    from atlas.service.config import ServiceArgs

    reference, query = _split(_data_dir() / PBMC10K)
    pool = [_resample(query, args.request_cells, seed) for seed in range(16)]
    big = _resample(query, args.big_query, 1000)
    results: dict = {"artifact": str(args.artifact), "cpu_count": os.cpu_count(),
                     "load_average_start": os.getloadavg()[0], "request_cells": args.request_cells}

    # Peers first, in this process, before Ray takes the CPUs.
    atlas = load_atlas(args.artifact)
    model = atlas.model()
    map_query(pool[0][:100], atlas, predict=["protein"], model=model)  # warm (shard loads, threads)
    t = time.perf_counter()
    map_query(big, atlas, predict=["protein"], model=model, **options)
    results["in_process_10k_s"] = time.perf_counter() - t
    t = time.perf_counter()
    baseline = PcaKnnBaseline().fit(reference, LEVELS, profiles={"protein": "protein_counts"})
    results["pca_knn_fit_s"] = time.perf_counter() - t
    t = time.perf_counter()
    baseline.map(big)
    results["pca_knn_10k_s"] = time.perf_counter() - t
    del baseline, model

    token_file = args.out / "serve-bench-token"
    token = secrets.token_urlsafe(24)
    args.out.mkdir(parents=True, exist_ok=True)
    token_file.write_text(token + "\n")
    t = time.perf_counter()
    service = {"artifact": str(args.artifact), "token_file": str(token_file)}
    if args.encoder_cpus is not None:
        service["encoder"] = {"ray_actor_options": {"num_cpus": args.encoder_cpus}}
    results["encoder_cpus"] = args.encoder_cpus
    results["batch"] = args.batch
    url = run_service(ServiceArgs.model_validate(service),
                      port=free_port(), blocking=False, log_line=lambda line: print(f"[serve] {line}"))
    results["service_start_s"] = time.perf_counter() - t
    memory = PeakMemory()
    memory.start()
    try:
        with AtlasClient(url, token=token) as client:
            client.map(pool[0][:100], predict=["protein"], progress=False)  # warm every deployment
            t = time.perf_counter()
            client.map(big, predict=["protein"], progress=False, **options)
            results["sdk_10k_s"] = time.perf_counter() - t
            results["sdk_10k_requests"] = len(client.timings)
            results["sdk_10k_stages"] = _mean_stages(client.timings)
        for clients in sorted({1, args.clients}):
            print(f"[bench] {clients} client(s) × {args.request_cells}-cell requests for {args.seconds:.0f} s")
            results[f"load_{clients}"] = _load(url, token, clients, args.seconds, args.request_cells, pool, options)
    finally:
        memory.stop.set()
        memory.join()
        results["peak_memory_gib"] = memory.peak
        results["load_average_end"] = os.getloadavg()[0]
        serve.shutdown()
        ray.shutdown()

    table = _table(results, args)
    print(table)
    suffix = ("" if args.encoder_cpus is None else f"_encoder{args.encoder_cpus:g}") + (
        "" if args.batch is None else "_batch")
    (args.out / f"serve{suffix}.md").write_text(table + "\n")
    (args.out / f"serve{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")


def _table(r: dict, args: argparse.Namespace) -> str:
    n = args.big_query
    rows = [
        "| what | cells/s | p50 | p99 | notes |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for key in sorted(k for k in r if k.startswith("load_") and k != "load_average_start" and k != "load_average_end"):
        x = r[key]
        rows.append(f"| service, {x['clients']} client(s) × {args.request_cells:,}-cell requests, "
                    f"{x['seconds']:.0f} s | {x['cells_per_s']:,.0f} | {x['p50_s']:.2f} s | {x['p99_s']:.2f} s | "
                    f"{x['requests']} requests, {x['errors']} errors |")
    rows += [
        f"| service, one {n:,}-cell query through the SDK | {n / r['sdk_10k_s']:,.0f} | — | — | "
        f"{r['sdk_10k_s']:.1f} s end to end (paper: 10k cells in 8 s on a GPU) |",
        f"| peer: `atlas.map_query` in one process, {n:,} cells | {n / r['in_process_10k_s']:,.0f} | — | — | "
        f"{r['in_process_10k_s']:.1f} s, no HTTP |",
        f"| peer: PCA + kNN (Azimuth-style), {n:,} cells | {n / r['pca_knn_10k_s']:,.0f} | — | — | "
        f"{r['pca_knn_10k_s']:.1f} s (+ {r['pca_knn_fit_s']:.1f} s fit on the reference) |",
    ]
    busiest = max((r[k] for k in r if k.startswith("load_") and isinstance(r[k], dict)),
                  key=lambda x: x["clients"], default=None)
    if busiest and busiest.get("stages_mean"):
        names = list(busiest["stages_mean"])
        rows.append(f"\nWhere a request's time goes under {busiest['clients']} clients (mean seconds; "
                    "`server.*` from the Server-Timing header):\n")
        rows.append("| requests | " + " | ".join(names) + " |")
        rows.append("| --- | " + " | ".join(["---:"] * len(names)) + " |")
        for what, key in (("all", "stages_mean"), ("slowest 5%", "stages_slowest_5pct")):
            rows.append(f"| {what} | " + " | ".join(f"{busiest[key].get(n, 0):.3f}" for n in names) + " |")
    stages = r.get("sdk_10k_stages") or {}
    if stages:
        server = {k.removeprefix("server."): v for k, v in stages.items() if k.startswith("server.")}
        rows.append(f"\nWhere one request of the {n:,}-cell query goes ({r['sdk_10k_requests']} requests "
                    f"of ≤ {n // max(r['sdk_10k_requests'], 1):,} cells, some in flight together; mean seconds):\n")
        outside = stages.get("request", 0) - server.get("total", 0)  # HTTP, Serve's proxy and its hop
        rows.append("| client encode | round trip | of which outside the ingress | client decode | "
                    + " | ".join(f"server {k}" for k in server) + " |")
        rows.append("| " + " | ".join(["---:"] * (4 + len(server))) + " |")
        rows.append(f"| {stages.get('encode', 0):.3f} | {stages.get('request', 0):.3f} | {outside:.3f} | "
                    f"{stages.get('decode', 0):.3f} | " + " | ".join(f"{v:.3f}" for v in server.values()) + " |")
    rows.append(f"\nPeak memory of the local Ray (all processes, RSS): {r['peak_memory_gib']:.2f} GiB; "
                f"service start {r['service_start_s']:.0f} s; {r['cpu_count']} CPUs, load average "
                f"{r['load_average_start']:.1f} at the start, {r['load_average_end']:.1f} at the end.")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
