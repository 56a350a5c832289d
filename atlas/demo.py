"""The demo tour (`make demo` / `atlas demo`): real cells → store → a build submitted with
``ray job submit`` to a local Ray head → the atlas artifact → the Ray Serve mapping service on
the same head → the held-out query mapped through :class:`atlas.client.AtlasClient`, summarised.

It starts a local Ray head of its own and stops it (and the service) at the end, whatever
happens in between.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import yaml

from atlas.demo_data import PBMC10K, demo_cache_dir, demo_dataset
from atlas.local_cluster import local_head, submit_job
from atlas.names import pred_key, profile_key
from atlas.ray_logs import BuildProgress, progress_line, ray_output_to_file

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("ATLAS_SHARED_DATA", REPO.parent / "shared" / "data"))


def _say(message: str, console=None) -> None:
    if console is None:
        print(f"\n== {message}", flush=True)
    else:
        console.print(f"\n== {message}", markup=False, highlight=False, soft_wrap=True)


def run_demo(out: Path, *, epochs: int = 2, num_workers: int = 2) -> Path:
    """Run the tour; returns the artifact folder."""
    import anndata as ad
    import numpy as np

    # The shared file when there is one; else the same dataset rebuilt from its public sources
    # (downloaded once into the cache, checked against the shared file's content fingerprint).
    source = demo_dataset(shared_data_dir(), demo_cache_dir(), say=_say)
    out = out.resolve()
    store, artifact, config_path = out / "store", out / "artifact", out / "build.yaml"
    for path in (store, artifact, out / "runs"):
        shutil.rmtree(path, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    _say(f"1/5 ingest the 80% reference split of {PBMC10K} (real 10x CITE-seq PBMCs) into {store}")
    from atlas.store.ingest import ingest

    adata = ad.read_h5ad(source)
    reference = np.random.default_rng(0).random(adata.n_obs) < 0.8
    query = adata[~reference].copy()
    summary = ingest(
        store, adata[reference].copy(), dataset_id="pbmc10k_reference",
        obsm_modalities={"protein": "protein_counts"},
        label_keys={"cell_type_l1": "cell_type_l1", "cell_type_l2": "cell_type_l2"},
        unlabeled=("undefined",),  # cells the manual gating left unlabelled are not a cell type
        species="human", progress=True,
    )
    print(f"   {summary.cells_ingested:,} cells; features {summary.features}; store version {summary.version}")

    config = {
        "name": "demo-pbmc10k",
        "store": str(store),
        "output": str(artifact),
        "model": {"model": "concerto", "modalities": ["RNA"]},
        "data": {"batch_size": 64, "single_domain": True},
        "train": {"epochs": epochs, "lr": 1e-3, "checkpoint_every": 50},
        "scaling": {"num_workers": num_workers, "use_gpu": False},
        "run": {"storage_path": str(out / "runs")},
        "index": {"levels": ["cell_type_l1", "cell_type_l2"], "profiles": ["protein"]},
    }
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    logs = out / "logs"
    _say("2/5 start a local Ray head (its own process group, temp dir and token; stopped at the end)")
    print(f"   Ray's and Ray Serve's own logs go to {logs}/", flush=True)
    # Ray's output (its loggers, forwarded worker logs, native core logs) goes to the log file;
    # the screen keeps the steps, progress bars and tables.
    with ray_output_to_file(logs / "ray.log") as console, \
            local_head(num_cpus=max(os.cpu_count() or 1, num_workers + 2, 8), log=logs / "ray-head.log") as head:
        console.print(f"   dashboard {head.dashboard_url}", highlight=False)
        _say(f"3/5 ray job submit -- python jobs/build_atlas.py --config {config_path}", console)
        t = time.perf_counter()
        with BuildProgress(console) as progress:
            def on_line(line: str) -> None:
                print(line, flush=True)  # the whole job log, into the log file
                shown = progress_line(line)
                if shown:
                    progress.line(shown)

            submit_job(head, REPO, ["python", "jobs/build_atlas.py", "--config", str(config_path)], on_line=on_line)
        build_seconds = time.perf_counter() - t
        _print_summary(artifact, console)
        _say("4/5 serve the atlas with Ray Serve on the same head (bearer token in "
             f"{out / 'serve_token'})", console)
        mapped, labelled, timings = _serve_and_map(head, artifact, out, query, console)
    print("   the mapping service and the local Ray head are stopped")

    _say("5/5 the held-out query, mapped through the service")
    timings = {"build (ray job)": build_seconds, **timings}
    _print_mapping(query, mapped, labelled, timings, time.perf_counter() - started)
    result = out / "query_mapped.h5ad"
    mapped.write_h5ad(result)
    from atlas.artifact import read_manifest
    from atlas.evaluate.report import write_report

    report = write_report(mapped, query, out / "report", levels=["cell_type_l1", "cell_type_l2"],
                          manifest=read_manifest(artifact), title="Demo: pbmc10k held-out cells mapped through the service")
    print(f"artifact: {artifact}\nmapped query: {result}\nreport (UMAP, confusion matrices, proteins, loss): {report}")
    return artifact


def _serve_and_map(head, artifact: Path, out: Path, query, console) -> tuple:
    """Deploy the mapping app on the head, map the RNA of ``query`` with the SDK, stop the app."""
    import secrets

    # Token authentication of the head (Ray 2.60 `ray start --head`): Ray reads these when it is
    # first imported, so set them before.
    saved = {k: os.environ.get(k) for k in head.env if k.startswith("RAY_")}
    os.environ.update({k: v for k, v in head.env.items() if k.startswith("RAY_")})
    import ray
    from ray import serve

    from atlas.client import AtlasClient
    from atlas.local_cluster import free_port
    from atlas.service.app import run_service
    from atlas.service.config import ServiceArgs

    token_file = out / "serve_token"
    token = secrets.token_urlsafe(24)
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    rna_only = query.copy()
    del rna_only.obsm["protein_counts"]  # the query is RNA-only: its proteins are predicted
    timings = {}
    try:
        t = time.perf_counter()
        url = run_service(ServiceArgs(artifact=str(artifact), token_file=str(token_file)),
                          address=head.gcs_address, port=free_port(), blocking=False,
                          log_line=lambda line: console.print(f"   {line}", markup=False, highlight=False, soft_wrap=True))
        timings["service start"] = time.perf_counter() - t
        if url is None:  # impossible: run_service returns the URL when not blocking
            raise RuntimeError("run_service(blocking=False) returned no URL")
        with AtlasClient(url, token=token) as client:
            info = client.info()
            console.print(f"   GET /v1/atlas: atlas {info.get('atlas_version')}, levels {info.get('levels')}",
                          markup=False, highlight=False, soft_wrap=True)
            t = time.perf_counter()
            with console.status(f"mapping {rna_only.n_obs:,} cells through the service (SDK → HTTP)…"):
                mapped = client.map(rna_only, levels=["cell_type_l1", "cell_type_l2"], predict=["protein"],
                                    progress=False)
            timings[f"map {query.n_obs:,} cells (SDK → HTTP)"] = time.perf_counter() - t
            # The same cells with no rejection threshold: every cell gets its best label, which is
            # how the peers in the README are scored; the table shows both.
            labelled = client.map(rna_only, levels=["cell_type_l1", "cell_type_l2"], predict=[], thresholds=None,
                                  progress=False)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return mapped, labelled, timings


def _print_mapping(query, mapped, labelled, timings: dict, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    from atlas.evaluate.baselines import log_normalise_frame
    from atlas.evaluate.metrics import feature_pearson, label_transfer

    console = Console()
    table = Table("level", "cells", "accuracy¹", "macro-F1¹", "unknown²", "accepted: accuracy",
                  title=f"{query.n_obs:,} held-out cells (RNA only) mapped onto the atlas")
    strict = []
    for level in ("cell_type_l1", "cell_type_l2"):
        truth = query.obs[level].astype(str)
        every = label_transfer(truth, labelled.obs[pred_key(level)])
        r = label_transfer(truth, mapped.obs[pred_key(level)])
        table.add_row(level, f"{r.n_cells:,}", f"{every.accuracy:.3f}", f"{every.macro_f1:.3f}",
                      f"{r.unknown_fraction:.1%}", f"{r.accuracy_accepted:.3f}")
        strict.append(f"{level} {r.accuracy:.3f}")
    console.print(table)
    console.print("   ¹ every cell labelled (no threshold), as the README's peers are scored. ² the calibrated "
                  "threshold, which rejects ~5% of the reference's own cells by design; counting its unknowns "
                  "as wrong, accuracy is " + ", ".join(strict))
    proteins = feature_pearson(mapped.obsm[profile_key("protein")], log_normalise_frame(query.obsm["protein_counts"]))
    best, worst = proteins.per_feature.idxmax(), proteins.per_feature.idxmin()
    console.print(f"protein prediction from RNA ({len(proteins.per_feature)} proteins, Pearson r vs measured): "
                  f"median {proteins.median:.3f}, best {best} {proteins.per_feature[best]:.3f}, "
                  f"worst {worst} {proteins.per_feature[worst]:.3f}")
    console.print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
                  + f"; demo wall time {seconds:.0f} s")


def _print_summary(artifact: Path, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from atlas import load_atlas

    atlas = load_atlas(artifact)  # verifies every file's hash
    m = atlas.manifest
    console = console or Console()
    table = Table("epoch", "loss", "cells", "cells/s (all workers)", title="training")
    for e in m["metrics"]["epochs"]:
        table.add_row(str(e["epoch"] + 1), f"{e['loss']:.4f}", f"{e['cells']:,}", f"{e['cells_per_s']:,.0f}")
    console.print(table)
    shards = Table("shard", "cells", "answers", title="index")
    for node in atlas.layout.nodes:
        shards.add_row(node.name, f"{node.n_cells:,}", str(node.level))
    console.print(shards)
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in m["metrics"]["seconds"].items())
    vocabulary = ", ".join(f"{k} {v['n_features']}" for k, v in m["vocabulary"].items())
    console.print(f"atlas [bold]{atlas.version}[/bold]: {m['metrics']['cells']:,} reference cells, "
                  f"model {m['model']['kind']}, vocabulary {vocabulary}")
    console.print(f"build stages: {stages}")
    thresholds = (m.get("mapping") or {}).get("thresholds") or {}
    if thresholds:
        console.print("calibrated unknown thresholds: " + ", ".join(f"{k} {v:.3f}" for k, v in thresholds.items()))
