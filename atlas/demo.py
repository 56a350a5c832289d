"""The demo tour (`make demo` / `atlas demo`): real cells → store → a build submitted with
``ray job submit`` to a local Ray head → the atlas artifact, summarised.

It starts a local Ray head of its own and stops it at the end, whatever happens in between.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import yaml

from atlas.errors import AtlasError
from atlas.local_cluster import local_head, submit_job

PBMC10K = "pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"
REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("ATLAS_SHARED_DATA", REPO.parent / "shared" / "data"))


def _say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def run_demo(out: Path, *, epochs: int = 2, num_workers: int = 2) -> Path:
    """Run the tour; returns the artifact folder."""
    import anndata as ad
    import numpy as np

    source = shared_data_dir() / PBMC10K
    if not source.exists():
        raise AtlasError(
            f"the demo's dataset {source} is not there: set ATLAS_SHARED_DATA to the folder holding {PBMC10K}"
        )
    out = out.resolve()
    store, artifact, config_path = out / "store", out / "artifact", out / "build.yaml"
    for path in (store, artifact, out / "runs"):
        shutil.rmtree(path, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    _say(f"1/4 ingest the 80% reference split of {PBMC10K} (real 10x CITE-seq PBMCs) into {store}")
    from atlas.store.ingest import ingest

    adata = ad.read_h5ad(source)
    reference = np.random.default_rng(0).random(adata.n_obs) < 0.8
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

    _say("2/4 start a local Ray head (its own process group and temp dir; stopped at the end)")
    with local_head(num_cpus=max(os.cpu_count() or 1, num_workers + 2), log=out / "ray-head.log") as head:
        print(f"   dashboard {head.dashboard_url}")
        _say(f"3/4 ray job submit -- python jobs/build_atlas.py --config {config_path}")
        submit_job(head, REPO, ["python", "jobs/build_atlas.py", "--config", str(config_path)])
    print("   the local Ray head is stopped")

    _say("4/4 the atlas")
    _print_summary(artifact, time.perf_counter() - started)
    return artifact


def _print_summary(artifact: Path, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    from atlas import load_atlas

    atlas = load_atlas(artifact)  # verifies every file's hash
    m = atlas.manifest
    console = Console()
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
    console.print(f"stages: {stages}; demo wall time {seconds:.0f} s")
    console.print(f"artifact: {artifact}\nstore:    {m['store']['uri']}")
