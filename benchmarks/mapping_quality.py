"""Mapping quality on the pbmc10k CITE-seq split: the Concerto atlas next to PCA + kNN, same run.

One command, fixed seeds, real data (6,855 10x PBMCs, 4,000 genes, 14 proteins; labels from
manual protein gating). The 80/20 split is the demo's (``default_rng(0).random(n) < 0.8``) and is
written to ``split.csv`` before anything else.

1. **Atlas** — ingest the 80% reference into a store (``unlabeled=("undefined",)``) and build a
   Concerto RNA-only atlas with Ray (local, in-process): the demo's build config (batch 64,
   single-domain batches, lr 1e-3, 2 Ray Train workers) with ``--epochs`` (default 5, the top of
   the paper's 3–5; chosen before looking at the query), protein profiles in the index, levels
   cell_type_l1 → cell_type_l2.
2. **Query** — the 20% query's RNA only (proteins dropped) through ``map_query`` (the default
   k_coarse / k_fine, 25 / 25; 25 / 5 before 2026-12-07; no rejection threshold, so both methods
   answer every cell); label transfer on annotated cells; protein prediction (mean of the 25 nearest reference cells) against the
   query's measured proteins (1e4 + log1p, as the atlas stores them), Pearson r per protein.
3. **Unseen type** — a second atlas from the reference minus every CD8 T cell (cell_type_l1 ==
   "CD8 T", which holds every "naive CD8" / "memory CD8" cell); the full query is mapped and
   AUROC of 1 − level-1 confidence for "is a CD8 T cell" is computed over the query cells with a
   level-1 label. If the artifact manifest carries calibrated thresholds
   (``manifest["mapping"]["thresholds"]``), the fraction of CD8 T (and of other) query cells
   they flag unknown is reported too.
4. **Baseline** — :class:`atlas.evaluate.baselines.PcaKnnBaseline` (1e4 + log1p, scale, PCA 50
   fitted on the reference only, cosine kNN with faiss, the same hierarchical k = 25 / k = 5
   vote, proteins = mean of 25 neighbours) on exactly the same reference, query and CD8-free
   reference.

Outputs in ``benchmarks/out/mapping_quality/``: ``split.csv``, ``results.md``, ``results.json``,
``confusion_l1_concerto.png``, ``confusion_l1_pca_knn.png`` (and the stores/artifacts built).

    python benchmarks/mapping_quality.py [--epochs 5] [--workers 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `atlas` is this checkout's

from quality_tasks.common import commit as _commit  # noqa: E402  (benchmarks/ is the script's folder)
from quality_tasks.common import start_ray  # noqa: E402

from atlas.mapping.params import K_COARSE, K_FINE  # noqa: E402
from atlas.names import confidence_key, pred_key, profile_key, unknown_key  # noqa: E402

DATA = Path(os.environ.get("ATLAS_SHARED_DATA", REPO.parent / "shared" / "data"))
PBMC10K = "pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"
LEVELS = ["cell_type_l1", "cell_type_l2"]
UNSEEN_L1 = "CD8 T"
UNLABELED = ("undefined",)
SPLIT_SEED = 0
METHODS = {"concerto": "Concerto atlas", "pca_knn": "PCA + kNN"}


def _say(message: str) -> None:
    print(f"\n== {message}", flush=True)


# -- data --------------------------------------------------------------------------------------


def load_split(out: Path):
    """``(full AnnData, reference mask)``; writes ``split.csv`` (cell id → reference / query)."""
    import anndata as ad

    source = DATA / PBMC10K
    if not source.exists():
        raise SystemExit(f"{source} not found: set ATLAS_SHARED_DATA to the folder holding {PBMC10K}")
    adata = ad.read_h5ad(source)
    reference = np.random.default_rng(SPLIT_SEED).random(adata.n_obs) < 0.8  # the demo's split
    unseen = adata.obs["cell_type_l1"].astype(str).to_numpy() == UNSEEN_L1
    pd.DataFrame({
        "cell_id": adata.obs_names.astype(str),
        "split": np.where(reference, "reference", "query"),
        "in_cd8_removed_reference": reference & ~unseen,
        "cell_type_l1": adata.obs["cell_type_l1"].astype(str).to_numpy(),
        "cell_type_l2": adata.obs["cell_type_l2"].astype(str).to_numpy(),
    }).to_csv(out / "split.csv", index=False)
    return adata, reference


def measured_proteins(adata) -> pd.DataFrame:
    """The cells' measured proteins, normalised as the atlas stores profiles (1e4 + log1p)."""
    from atlas.evaluate.baselines import log_normalise_frame

    return log_normalise_frame(adata.obsm["protein_counts"]).set_axis(adata.obs_names.astype(str), axis=0)


# -- the atlas -----------------------------------------------------------------------------------


def build_concerto(out: Path, name: str, reference, *, epochs: int, workers: int) -> dict:
    """Ingest ``reference`` into a fresh store and build a Concerto RNA atlas; returns timings."""
    from atlas.build import build_atlas
    from atlas.store.ingest import ingest
    from atlas.train.config import build_config_from_dict

    store, artifact, runs = out / "stores" / name, out / "artifacts" / name, out / "runs" / name
    for path in (store, artifact, runs):
        shutil.rmtree(path, ignore_errors=True)
    t = time.perf_counter()
    summary = ingest(store, reference, dataset_id=f"pbmc10k_{name}", obsm_modalities={"protein": "protein_counts"},
                     label_keys={lv: lv for lv in LEVELS}, unlabeled=UNLABELED, species="human")
    ingest_s = time.perf_counter() - t
    print(f"   ingested {summary.cells_ingested:,} cells into {store} in {ingest_s:.1f} s", flush=True)
    config = {  # the demo's build config (atlas/demo.py), with this benchmark's epochs
        "name": f"mapping-quality-{name}", "store": str(store), "output": str(artifact),
        "model": {"model": "concerto", "modalities": ["RNA"]},
        "data": {"batch_size": 64, "single_domain": True},
        "train": {"epochs": epochs, "lr": 1e-3, "checkpoint_every": 50, "seed": 0},
        "scaling": {"num_workers": workers, "use_gpu": False},
        "run": {"storage_path": str(runs)},
        "index": {"levels": LEVELS, "profiles": ["protein"]},
    }
    t = time.perf_counter()
    built = build_atlas(build_config_from_dict(config), log=lambda m: print(f"   {m}", flush=True))
    return {"ingest_s": ingest_s, "build_s": time.perf_counter() - t, "stages_s": built.seconds,
            "final_loss": built.final_loss, "cells": built.cells, "artifact": str(artifact),
            "atlas_version": built.atlas_version, "config": config}


def map_concerto(artifact: str, query, thresholds):
    """``(mapped AnnData, seconds of map_query, seconds to load + verify the artifact)``."""
    from atlas import load_atlas
    from atlas.mapping.query import map_query

    t = time.perf_counter()
    atlas = load_atlas(artifact)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    mapped = map_query(query, atlas, levels=LEVELS, k_coarse=K_COARSE, k_fine=K_FINE, thresholds=thresholds)
    return mapped, time.perf_counter() - t, load_s, atlas


def calibrated_thresholds(atlas) -> dict | None:
    """The build's calibrated per-level thresholds, or None when the manifest has none (yet)."""
    found = (atlas.manifest.get("mapping") or {}).get("thresholds")
    return dict(found) if found else None


# -- the baseline ----------------------------------------------------------------------------------


def run_baseline(reference, query):
    """``(mapped AnnData, fit seconds, map seconds)`` of PCA + kNN."""
    from atlas.evaluate.baselines import PcaKnnBaseline

    t = time.perf_counter()
    baseline = PcaKnnBaseline().fit(reference, LEVELS, profiles={"protein": "protein_counts"}, unlabeled=UNLABELED)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    mapped = baseline.map(query)
    return mapped, fit_s, time.perf_counter() - t


# -- scoring -----------------------------------------------------------------------------------------


def score_mapping(mapped, truth: pd.DataFrame, proteins: pd.DataFrame) -> dict:
    from atlas.evaluate.metrics import feature_pearson, label_transfer

    out = {}
    for level in LEVELS:
        out[level] = label_transfer(truth[level].to_numpy(), mapped.obs.loc[truth.index, pred_key(level)].to_numpy(),
                                    ignore=("", *UNLABELED))
    out["protein"] = feature_pearson(mapped.obsm[profile_key("protein")], proteins)
    return out


def score_unseen(mapped, truth: pd.DataFrame) -> dict:
    """AUROC of 1 − level-1 confidence for the CD8 T query cells, and where they were placed."""
    from atlas.evaluate.metrics import rejection_auroc

    l1 = truth["cell_type_l1"].astype(str)
    labelled = ~l1.isin(UNLABELED).to_numpy()
    unseen = (l1 == UNSEEN_L1).to_numpy()
    conf = mapped.obs.loc[truth.index, confidence_key("cell_type_l1")].to_numpy(np.float64)
    pred = mapped.obs.loc[truth.index, pred_key("cell_type_l1")].astype(str)
    return {
        "auroc": rejection_auroc(unseen[labelled], conf[labelled]),
        "n_unseen": int(unseen.sum()), "n_seen": int((labelled & ~unseen).sum()),
        "unseen_confidence_median": float(np.median(conf[unseen])),
        "seen_confidence_median": float(np.median(conf[labelled & ~unseen])),
        # Vote shares of exactly 1 are ties for the AUROC: they bound how well it can rank.
        "unseen_confidence_one": float((conf[unseen] >= 1.0).mean()),
        "seen_confidence_one": float((conf[labelled & ~unseen] >= 1.0).mean()),
        "unseen_placed_as": {str(k): int(v) for k, v in pred[unseen].value_counts().items()},
    }


def flagged_by_threshold(mapped, truth: pd.DataFrame) -> dict:
    l1 = truth["cell_type_l1"].astype(str)
    unseen = (l1 == UNSEEN_L1).to_numpy()
    seen = (~l1.isin(UNLABELED) & (l1 != UNSEEN_L1)).to_numpy()
    flag = mapped.obs.loc[truth.index, unknown_key("cell_type_l1")].to_numpy(bool)
    return {"unseen_flagged_fraction": float(flag[unseen].mean()), "seen_flagged_fraction": float(flag[seen].mean())}


# -- report --------------------------------------------------------------------------------------------


def confusion_png(result, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = result.confusion
    share = counts.div(counts.sum(axis=1).replace(0, 1), axis=0)
    fig, ax = plt.subplots(figsize=(1.1 * counts.shape[1] + 2.5, 0.8 * counts.shape[0] + 2))
    ax.imshow(share.to_numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(counts.shape[1]), counts.columns, rotation=45, ha="right")
    ax.set_yticks(range(counts.shape[0]), counts.index)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, f"{counts.iat[i, j]}", ha="center", va="center",
                    color="white" if share.iat[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (manual protein gating)")
    ax.set_title(f"{title}\nlevel 1, accuracy {result.accuracy:.3f}, macro-F1 {result.macro_f1:.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _f(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def _diff(a, b, digits=3) -> str:
    if a is None or b is None:
        return "n/a"
    return f"{a - b:+.{digits}f}"


def markdown(r: dict) -> str:
    c, b = r["concerto"], r["pca_knn"]
    n_q = r["split"]["query"]
    rows = [
        ("level-1 accuracy", c["cell_type_l1"]["accuracy"], b["cell_type_l1"]["accuracy"], 3),
        ("level-1 macro-F1", c["cell_type_l1"]["macro_f1"], b["cell_type_l1"]["macro_f1"], 3),
        ("level-2 accuracy", c["cell_type_l2"]["accuracy"], b["cell_type_l2"]["accuracy"], 3),
        ("level-2 macro-F1", c["cell_type_l2"]["macro_f1"], b["cell_type_l2"]["macro_f1"], 3),
        ("CD8 T removed: rejection AUROC (1 − level-1 confidence)", c["unseen"]["auroc"], b["unseen"]["auroc"], 3),
        ("protein Pearson r, mean of 14", c["protein"]["mean"], b["protein"]["mean"], 3),
        ("protein Pearson r, median of 14", c["protein"]["median"], b["protein"]["median"], 3),
        ("protein Pearson r, min of 14", c["protein"]["min"], b["protein"]["min"], 3),
        ("build time, full reference (s)", c["time"]["build_s"], b["time"]["fit_s"], 1),
        ("build time, CD8-free reference (s)", c["time"]["build_unseen_s"], b["time"]["fit_unseen_s"], 1),
        (f"mapping time, {n_q:,} query cells (s)", c["time"]["map_s"], b["time"]["map_s"], 2),
    ]
    lines = [
        f"# Mapping quality: pbmc10k 80/20 split ({r['split']['reference']:,} reference / {n_q:,} query cells)",
        "",
        f"Run {r['run']['finished']}, {r['run']['wall_s']:.0f} s wall on {r['run']['cpus']} CPU cores "
        f"(commit {r['run']['commit']}; 1-min load average {r['run']['load_average_start'][0]:.1f} at start, "
        f"{r['run']['load_average_end'][0]:.1f} at end: the machine is shared, times are indicative). "
        f"Concerto: {r['settings']['epochs']} epochs, batch 64, lr 1e-3, "
        f"{r['settings']['workers']} Ray Train workers; both methods k = 25 (level 1, proteins) and k = 5 "
        "within the predicted level-1 group (level 2), similarity-weighted vote, no rejection threshold.",
        f"Label metrics on query cells with a gated label (level 1: {c['cell_type_l1']['n_cells']:,} cells, "
        f"level 2: {c['cell_type_l2']['n_cells']:,}; B cells have no level-2 label). "
        "Level-2 answers for cells routed to a group without level-2 labels (B) are `unknown` and count as wrong.",
        "",
        "| metric | Concerto atlas | PCA + kNN | Concerto − PCA+kNN |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, x, y, d in rows:
        lines.append(f"| {name} | {_f(x, d)} | {_f(y, d)} | {_diff(x, y, d)} |")
    lines += ["",
              f"Build time: Concerto = `build_atlas` (train {c['time']['stages_s'].get('train', 0):.1f} s, embed "
              f"{c['time']['stages_s'].get('embed', 0):.1f} s, index {c['time']['stages_s'].get('index', 0):.1f} s, "
              "store reads, threshold calibration) after an ingest of "
              f"{c['time']['ingest_s']:.1f} s and a Ray start of {c['time']['ray_start_s']:.1f} s (neither included); "
              "PCA + kNN = normalise, scale, PCA and faiss indexes in memory. Mapping time: `map_query` on the loaded "
              f"atlas (loading + hash verification {c['time']['load_s']:.2f} s not included) vs the baseline's `map`.",
              "", "## Protein prediction from RNA (Pearson r per protein, query cells)", "",
              "| protein | Concerto atlas | PCA + kNN | Concerto − PCA+kNN |", "| --- | ---: | ---: | ---: |"]
    for p in c["protein"]["per_feature"]:
        x, y = c["protein"]["per_feature"][p], b["protein"]["per_feature"][p]
        lines.append(f"| {p} | {_f(x)} | {_f(y)} | {_diff(x, y)} |")
    for level in LEVELS:
        lines += ["", f"## Per-class F1, {level}", "", "| class | query cells | Concerto atlas | PCA + kNN |",
                  "| --- | ---: | ---: | ---: |"]
        for cls, n in c[level]["support"].items():
            lines.append(f"| {cls} | {n} | {_f(c[level]['per_class_f1'].get(cls))} | "
                         f"{_f(b[level]['per_class_f1'].get(cls))} |")
    lines += ["", "## Unseen CD8 T cells (reference without any CD8 T cell, full query)", "",
              f"{c['unseen']['n_unseen']} CD8 T and {c['unseen']['n_seen']} other gated query cells.", "",
              "| | Concerto atlas | PCA + kNN |", "| --- | ---: | ---: |",
              f"| rejection AUROC | {_f(c['unseen']['auroc'])} | {_f(b['unseen']['auroc'])} |",
              f"| median level-1 confidence, CD8 T cells | {_f(c['unseen']['unseen_confidence_median'])} | "
              f"{_f(b['unseen']['unseen_confidence_median'])} |",
              f"| median level-1 confidence, other cells | {_f(c['unseen']['seen_confidence_median'])} | "
              f"{_f(b['unseen']['seen_confidence_median'])} |",
              f"| CD8 T cells with level-1 confidence 1.0 (every vote agrees) | "
              f"{_f(c['unseen']['unseen_confidence_one'])} | {_f(b['unseen']['unseen_confidence_one'])} |",
              f"| other cells with level-1 confidence 1.0 | {_f(c['unseen']['seen_confidence_one'])} | "
              f"{_f(b['unseen']['seen_confidence_one'])} |"]
    placed = sorted(set(c["unseen"]["unseen_placed_as"]) | set(b["unseen"]["unseen_placed_as"]))
    for label in placed:
        lines.append(f"| CD8 T cells labelled {label} | {c['unseen']['unseen_placed_as'].get(label, 0)} | "
                     f"{b['unseen']['unseen_placed_as'].get(label, 0)} |")
    cal = r["calibrated"]
    lines += [""]
    if cal.get("available"):

        def shown(th) -> str:
            return ", ".join(f"{k} {v:.3f}" for k, v in th.items())

        lines += [f"Calibrated thresholds (artifact manifest `mapping.thresholds`, set at build time on reference "
                  f"cells only): full atlas {shown(cal['thresholds_full'])}; CD8-free atlas "
                  f"{shown(cal['thresholds_unseen'])}.", "",
                  "| with the calibrated threshold (Concerto only) | value |", "| --- | ---: |",
                  f"| CD8 T query cells flagged unknown (CD8-free atlas) | {_f(cal['unseen_flagged_fraction'])} |",
                  f"| other gated query cells flagged unknown (CD8-free atlas) | {_f(cal['seen_flagged_fraction'])} |",
                  f"| level-1 accuracy, unknown = wrong (full atlas) | {_f(cal['l1']['accuracy'])} |",
                  f"| level-1 unknown fraction (full atlas) | {_f(cal['l1']['unknown_fraction'])} |",
                  f"| level-1 accuracy on accepted cells (full atlas) | {_f(cal['l1']['accuracy_accepted'])} |",
                  f"| level-2 accuracy, unknown = wrong (full atlas) | {_f(cal['l2']['accuracy'])} |"]
    else:
        lines += [f"Calibrated thresholds: {cal['reason']}; the fraction of CD8 T cells a threshold flags is not reported."]
    lines += ["", "Confusion matrices (level 1): `confusion_l1_concerto.png`, `confusion_l1_pca_knn.png`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "mapping_quality")
    parser.add_argument("--epochs", type=int, default=5, help="Concerto epochs (paper: 3–5; demo: 2)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (the demo's 2)")
    args = parser.parse_args()
    started = time.perf_counter()
    load_start = list(os.getloadavg())  # other people's jobs share this machine: timings are noisy
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    import ray
    import torch

    torch.manual_seed(0)
    from atlas.evaluate.metrics import label_transfer

    _say(f"split {PBMC10K} 80/20 (seed {SPLIT_SEED}) → {out / 'split.csv'}")
    adata, is_ref = load_split(out)
    reference = adata[is_ref].copy()
    unseen_ref = reference[reference.obs["cell_type_l1"].astype(str).to_numpy() != UNSEEN_L1].copy()
    query_full = adata[~is_ref].copy()
    truth = query_full.obs[LEVELS].astype(str).copy()
    truth.index = truth.index.astype(str)
    proteins = measured_proteins(query_full)
    query = query_full.copy()
    del query.obsm["protein_counts"]  # an RNA-only query
    print(f"   reference {reference.n_obs:,} cells ({unseen_ref.n_obs:,} without {UNSEEN_L1}); query {query.n_obs:,}")

    result: dict = {"split": {"seed": SPLIT_SEED, "rule": "default_rng(0).random(n) < 0.8 → reference",
                              "reference": int(reference.n_obs), "query": int(query.n_obs),
                              "reference_without_cd8": int(unseen_ref.n_obs)},
                    "settings": {"epochs": args.epochs, "workers": args.workers, "batch_size": 64, "lr": 1e-3,
                                 "k_coarse": K_COARSE, "k_fine": K_FINE, "thresholds": None, "baseline_pca": 50,
                                 "baseline_level2": "hierarchical (k = 5 within the predicted level-1 group)"}}

    _say("PCA + kNN baseline: full reference, then the reference without CD8 T")
    base, fit_s, bmap_s = run_baseline(reference, query)
    base_unseen, fit_unseen_s, _ = run_baseline(unseen_ref, query)
    print(f"   fit {fit_s:.1f} s / {fit_unseen_s:.1f} s; map {bmap_s:.2f} s")

    _say(f"Concerto atlases with Ray (local, in-process): {args.epochs} epochs, {args.workers} workers")
    t = time.perf_counter()
    start_ray(args.workers)
    ray_start_s = time.perf_counter() - t
    try:
        full = build_concerto(out, "reference", reference, epochs=args.epochs, workers=args.workers)
        without = build_concerto(out, "reference_without_cd8", unseen_ref, epochs=args.epochs, workers=args.workers)
    finally:
        ray.shutdown()

    _say("map the RNA-only query with map_query")
    mapped, map_s, load_s, atlas_full = map_concerto(full["artifact"], query, thresholds=None)
    mapped_unseen, _, _, atlas_unseen = map_concerto(without["artifact"], query, thresholds=None)
    print(f"   map_query {map_s:.2f} s ({query.n_obs:,} cells)")

    scores = {"concerto": score_mapping(mapped, truth, proteins), "pca_knn": score_mapping(base, truth, proteins)}
    for name, m in (("concerto", mapped_unseen), ("pca_knn", base_unseen)):
        scores[name]["unseen"] = score_unseen(m, truth)
    for name, s in scores.items():
        result[name] = {lv: s[lv].to_dict() for lv in LEVELS}
        result[name]["protein"] = s["protein"].to_dict()
        result[name]["unseen"] = s["unseen"]
    result["concerto"]["time"] = {"ingest_s": full["ingest_s"], "build_s": full["build_s"], "stages_s": full["stages_s"],
                                  "build_unseen_s": without["build_s"], "map_s": map_s, "load_s": load_s,
                                  "ray_start_s": ray_start_s}
    result["concerto"]["build"] = {k: full[k] for k in ("final_loss", "cells", "atlas_version", "config")}
    result["concerto"]["build_unseen"] = {k: without[k] for k in ("final_loss", "cells", "atlas_version")}
    result["pca_knn"]["time"] = {"fit_s": fit_s, "fit_unseen_s": fit_unseen_s, "map_s": bmap_s}

    # Calibrated thresholds: another change adds them to the manifest; report them when present.
    th_full, th_unseen = calibrated_thresholds(atlas_full), calibrated_thresholds(atlas_unseen)
    if th_full and th_unseen:
        cal_full, _, _, _ = map_concerto(full["artifact"], query, thresholds="calibrated")
        cal_unseen, _, _, _ = map_concerto(without["artifact"], query, thresholds="calibrated")
        result["calibrated"] = {
            "available": True, "thresholds_full": th_full, "thresholds_unseen": th_unseen,
            **flagged_by_threshold(cal_unseen, truth),
            "l1": label_transfer(truth["cell_type_l1"], cal_full.obs.loc[truth.index, pred_key("cell_type_l1")]).to_dict(),
            "l2": label_transfer(truth["cell_type_l2"], cal_full.obs.loc[truth.index, pred_key("cell_type_l2")]).to_dict(),
        }
    else:
        result["calibrated"] = {"available": False,
                                "reason": "the artifact manifests have no mapping.thresholds (not implemented yet)"}

    for name, title in METHODS.items():
        confusion_png(scores[name]["cell_type_l1"], title, out / f"confusion_l1_{name}.png")
    result["run"] = {"wall_s": time.perf_counter() - started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "cpus": os.cpu_count(), "commit": _commit(),
                     "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
                     "python": platform.python_version(),
                     "ray": ray.__version__, "torch": torch.__version__}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    text = markdown(result)
    (out / "results.md").write_text(text)
    print("\n" + text)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}, {out / 'split.csv'}, confusion_l1_*.png")


if __name__ == "__main__":
    main()
