"""What every quality task shares: a local Ray, building and mapping an atlas, scoring, tables."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("ATLAS_SHARED_DATA", REPO.parent / "shared" / "data"))


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def data_file(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        raise SystemExit(f"{path} not found: set ATLAS_SHARED_DATA to the folder holding {name}")
    return path


def start_ray(workers: int) -> None:
    """A local in-process Ray of our own (never another user's cluster unless RAY_ADDRESS says so)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=max(4, workers + 2), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def build_atlas_from(out: Path, name: str, adata, *, ingest_kwargs: Mapping, config: Mapping) -> dict:
    """Ingest ``adata`` into a fresh store and build an atlas with ``config`` (store/output filled in).

    Returns the artifact path and timings: ``ingest_s`` and ``build_s`` (train + embed + index +
    calibration, with Ray already running).
    """
    from atlas.build import build_atlas
    from atlas.store.ingest import ingest
    from atlas.train.config import build_config_from_dict

    store, artifact, runs = out / "stores" / name, out / "artifacts" / name, out / "runs" / name
    for path in (store, artifact, runs):
        shutil.rmtree(path, ignore_errors=True)
    t = time.perf_counter()
    summary = ingest(store, adata, dataset_id=name, **ingest_kwargs)
    ingest_s = time.perf_counter() - t
    print(f"   ingested {summary.cells_ingested:,} cells into {store} in {ingest_s:.1f} s", flush=True)
    full = {"name": name, "store": str(store), "output": str(artifact), "run": {"storage_path": str(runs)}, **config}
    t = time.perf_counter()
    built = build_atlas(build_config_from_dict(full), log=lambda m: print(f"   {m}", flush=True))
    return {"artifact": str(artifact), "ingest_s": ingest_s, "build_s": time.perf_counter() - t,
            "stages_s": built.seconds, "final_loss": built.final_loss, "cells": built.cells, "config": full}


def map_with_atlas(artifact: str, query, levels: Sequence[str], **kwargs) -> tuple:
    """``(mapped AnnData, map seconds)`` through ``atlas.map_query`` (the default k_coarse / k_fine,
    :data:`atlas.mapping.params.K_COARSE` / ``K_FINE``; no threshold)."""
    from atlas import load_atlas
    from atlas.mapping.params import K_COARSE, K_FINE
    from atlas.mapping.query import map_query

    atlas = load_atlas(artifact)
    t = time.perf_counter()
    mapped = map_query(query, atlas, levels=list(levels), k_coarse=K_COARSE, k_fine=K_FINE,
                       thresholds=kwargs.pop("thresholds", None), **kwargs)
    return mapped, time.perf_counter() - t


def from_mapped(mapped, levels: Sequence[str]) -> dict:
    """A mapped AnnData (ours or PCA + kNN) in the peers' shape: ``pred``/``confidence`` per level."""
    from atlas.names import confidence_key, pred_key

    return {"pred": {lv: mapped.obs[pred_key(lv)].astype(str) for lv in levels},
            "confidence": {lv: mapped.obs[confidence_key(lv)].astype(float) for lv in levels}}


def score_labels(method: Mapping, truth: pd.DataFrame, levels: Sequence[str], unlabeled: Sequence[str]) -> dict:
    from atlas.evaluate.metrics import label_transfer

    out = {}
    for lv in levels:
        pred = pd.Series(method["pred"][lv]).astype(str)
        pred.index = pred.index.astype(str)
        out[lv] = label_transfer(truth[lv].astype(str).to_numpy(), pred.loc[truth.index].to_numpy(),
                                 ignore=("", "nan", *unlabeled)).to_dict()
    return out


def unseen_auroc(confidence: pd.Series, is_unseen: np.ndarray, labelled: np.ndarray) -> float:
    from atlas.evaluate.metrics import rejection_auroc

    conf = np.asarray(confidence, dtype=np.float64)
    return rejection_auroc(is_unseen[labelled], conf[labelled])


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, (int, float, np.floating)) else str(x)


def table(rows: Sequence[Sequence], header: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        return rev.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def run_info(started: float, load_start: Sequence[float]) -> dict:
    return {"wall_s": time.perf_counter() - started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cpus": os.cpu_count(), "commit": commit(), "load_average_start": list(load_start),
            "load_average_end": list(os.getloadavg())}


def write_results(out: Path, result: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=_json))
    (out / "results.md").write_text(markdown)
    print("\n" + markdown, flush=True)


def _json(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def timed(fn: Callable, *args, **kwargs):
    t = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - t
