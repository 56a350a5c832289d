"""Choose the query-statistics defaults on the *reference* only (never the scored query).

    python benchmarks/validate_query_statistics.py [--out benchmarks/out/query_statistics]

ADTnorm's reference studies (the ten that ``benchmarks/quality.py --tasks adtnorm`` trains on;
its three query studies are never read here) are split again: two studies drawn with seed 1 are
held out as *validation*, an atlas is built on the other eight (the task's settings: 2 epochs,
batch 256, 2 Ray Train workers), and the validation cells are mapped

* with the reference's average statistics (what mapping did before query statistics),
* with their own statistics in the input-value normalisation only (``domain_statistics="input"``)
  or in every normalisation layer (``"all"``), as one batch (``batch=...``) or per batch
  (``batch_key="batch"``),

scored per validation study: accuracy and macro-F1 per level ('undefined' cells not scored).
``--mixes`` adds the sweep that chose ``"auto"``'s threshold: batches of chosen cell-type mixes
drawn from each validation study (:func:`mix_batches`), mapped with each variant.
``--atlas DIR`` reuses an atlas built by an earlier run. Results: ``OUT/results.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_tasks.adtnorm import FILE, HELD_OUT, LEVELS, SEED  # noqa: E402
from quality_tasks.common import build_atlas_from, data_file, map_with_atlas, start_ray  # noqa: E402
from quality_tasks.protein_transfer import protein_query  # noqa: E402

VARIANTS = (("reference statistics", {"domain_statistics": "reference"}),
            ("input, one batch", {"domain_statistics": "input", "batch": "validation"}),
            ("input, per batch", {"domain_statistics": "input", "batch_key": "batch"}),
            ("all layers, one batch", {"domain_statistics": "all", "batch": "validation"}),
            ("all layers, per batch", {"domain_statistics": "all", "batch_key": "batch"}),
            ("auto, per batch", {"domain_statistics": "auto", "batch_key": "batch"}))
MIX_CELLS = 600
"""Cells per drawn batch of the mix sweep."""
THRESHOLDS = np.round(np.arange(0.0, 1.01, 0.05), 2)


def mix_batches(held, study: str, seed: int = 0):
    """Batches of :data:`MIX_CELLS` cells drawn from one validation study with chosen cell-type
    mixes at level 1 (its own; one type only; each type left out; Dirichlet draws around its own
    and flat), each its own ``obs["mix_batch"]``: what "all" vs "input" gains as a batch's mix
    departs from the reference's, on reference cells only."""
    rng = np.random.default_rng(seed)
    cells = held[held.obs["study_name"].astype(str).to_numpy() == study]
    labels = cells.obs[LEVELS[0]].astype(str).to_numpy()
    types = [t for t in sorted(set(labels)) if t != "undefined" and (labels == t).sum() >= 50]
    own = np.array([(labels == t).mean() for t in types])
    own = own / own.sum()
    mixes = {"own mix": own}
    for i, t in enumerate(types):
        mixes[f"only {t}"] = np.eye(len(types))[i]
        without = own.copy()
        without[i] = 0
        mixes[f"without {t}"] = without / without.sum()
    for j in range(6):
        mixes[f"dirichlet(own x 5) {j}"] = rng.dirichlet(own * 5 + 1e-3)
        mixes[f"dirichlet(1) {j}"] = rng.dirichlet(np.ones(len(types)))
    parts = []
    for name, p in mixes.items():
        want = np.round(p * MIX_CELLS).astype(int)
        rows = np.concatenate([rng.choice(np.flatnonzero(labels == t), size=min(w, int((labels == t).sum())),
                                          replace=False) for t, w in zip(types, want) if w > 0])
        part = cells[rows].copy()
        part.obs_names = [f"{name}:{c}" for c in part.obs_names]
        part.obs["mix_batch"] = name
        parts.append(part)
    return ad.concat(parts)


def mix_sweep(artifact: str, held, study: str) -> dict:
    """Every drawn batch of :func:`mix_batches` mapped with input statistics, all layers and auto;
    per batch its cells, overlap (auto's estimate) and level-1 / level-2 accuracy per variant, and
    the mean accuracy (both levels, every batch) each overlap threshold would give."""
    drawn = mix_batches(held, study)
    query = protein_query(drawn, "mix_batch")
    truth = drawn.obs[LEVELS].astype(str)
    names = drawn.obs["mix_batch"].astype(str).to_numpy()
    rows: dict[str, dict] = {}
    for variant in ("input", "all", "auto"):
        mapped, _ = map_with_atlas(artifact, query, LEVELS, domain_statistics=variant, batch_key="mix_batch")
        for name in np.unique(names):
            keep = names == name
            sc = _scores(mapped[keep], truth[keep])
            row = rows.setdefault(name, {"cells": int(keep.sum())})
            row[variant] = [sc[lv]["accuracy"] for lv in LEVELS]
            if variant == "auto":
                row["overlap"] = mapped.uns["atlas"]["query_domains"]["batches"][name]["composition_overlap"]
    by_threshold = {}
    for t in THRESHOLDS:
        chosen = [r["all"] if r["overlap"] >= t else r["input"] for r in rows.values()]
        by_threshold[float(t)] = round(float(np.nanmean(chosen)), 4)
    return {"study": study, "batches": rows, "mean_accuracy_by_threshold": by_threshold}


def _scores(mapped, truth: pd.DataFrame) -> dict:
    from atlas.evaluate.metrics import label_transfer
    from atlas.names import pred_key

    out = {}
    for lv in LEVELS:  # 'undefined' reference labels are not scored
        if not (truth[lv].to_numpy() != "undefined").any():  # e.g. a drawn batch of one type unlabelled at level 2
            out[lv] = {"accuracy": float("nan"), "macro_f1": float("nan")}
            continue
        s = label_transfer(truth[lv].to_numpy(), mapped.obs[pred_key(lv)].astype(str).to_numpy())
        out[lv] = {"accuracy": round(float(s.accuracy), 4), "macro_f1": round(float(s.macro_f1), 4)}
    return out


def reference_split():
    """``(train AnnData, validation AnnData, validation study names)``: task 3's reference studies,
    two of them (drawn with seed 1) held out; task 3's query studies are dropped unread."""
    adata = ad.read_h5ad(data_file(FILE))
    studies = sorted(adata.obs["study_name"].astype(str).unique())
    query_studies = set(np.random.default_rng(SEED).choice(studies, HELD_OUT, replace=False).tolist())
    reference_studies = [s for s in studies if s not in query_studies]
    validation = sorted(np.random.default_rng(1).choice(reference_studies, 2, replace=False).tolist())
    study = adata.obs["study_name"].astype(str)
    train = adata[study.isin([s for s in reference_studies if s not in validation]).to_numpy()].copy()
    held = adata[study.isin(validation).to_numpy()].copy()
    return train, held, validation


def build_task_atlas(out: Path, name: str, train, model: dict | None = None) -> dict:
    """An atlas of ``train`` with task 3's settings (2 epochs, batch 256, 2 workers); ``model``
    overrides model-config keys."""
    return build_atlas_from(
        out, name, train,
        ingest_kwargs={"modality": "protein", "batch_key": "batch", "label_keys": {lv: lv for lv in LEVELS},
                       "unlabeled": ("undefined",), "species": "human"},
        config={"model": {"model": "concerto", "modalities": ["protein"], **(model or {})},
                "data": {"batch_size": 256, "single_domain": True, "domain_key": "batch"},
                "train": {"epochs": 2, "lr": 1e-3, "checkpoint_every": 500, "seed": 0},
                "scaling": {"num_workers": 2, "use_gpu": False}, "index": {"levels": LEVELS}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "query_statistics")
    parser.add_argument("--atlas", type=Path, help="an atlas built by an earlier run (skips the build)")
    parser.add_argument("--mixes", action="store_true",
                        help="also the sweep of drawn cell-type mixes per validation study (domain_statistics auto)")
    args = parser.parse_args()
    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    train, held, validation = reference_split()
    print(f"train on {train.n_obs:,} cells of {train.obs['study_name'].nunique()} reference studies; validate on "
          f"{held.n_obs:,} cells of {validation} ({held.obs['batch'].nunique()} batches)", flush=True)

    import ray

    start_ray(2)
    try:
        built = {"artifact": str(args.atlas), "build_s": 0.0} if args.atlas else build_task_atlas(out, "train", train)
    finally:
        ray.shutdown()

    query = protein_query(held, "batch")
    truth = held.obs[LEVELS].astype(str)
    study_of = held.obs["study_name"].astype(str).to_numpy()
    rows = {}
    for name, options in VARIANTS:
        mapped, seconds = map_with_atlas(built["artifact"], query, LEVELS, **options)
        rows[name] = {"all": _scores(mapped, truth)}
        for study in validation:
            keep = study_of == study
            rows[name][study] = _scores(mapped[keep], truth[keep])
        print(f"{name}: {rows[name]} ({seconds:.0f} s)", flush=True)

    sweeps = [mix_sweep(built["artifact"], held, study) for study in validation] if args.mixes else []
    sizes = {s: int((study_of == s).sum()) for s in validation}
    result = {"validation_studies": sizes, "train_cells": int(train.n_obs), "build_s": round(built["build_s"], 1),
              "variants": rows, "mix_sweeps": sweeps, "wall_s": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    heads = ["all validation cells", *validation]
    lines = [f"# Query statistics, chosen on the reference only (atlas on {train.n_obs:,} cells of eight "
             f"reference studies; validation: {', '.join(f'{s} ({n:,} cells)' for s, n in sizes.items())})", "",
             "| variant | " + " | ".join(f"{h}: l1 acc / F1, l2 acc / F1" for h in heads) + " |",
             "| --- |" + " ---: |" * len(heads)]
    for name, by in rows.items():
        cells = [f"{by[h]['cell_type_l1']['accuracy']:.3f} / {by[h]['cell_type_l1']['macro_f1']:.3f}, "
                 f"{by[h]['cell_type_l2']['accuracy']:.3f} / {by[h]['cell_type_l2']['macro_f1']:.3f}"
                 for h in ("all", *validation)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for sweep in sweeps:
        lines += ["", f"## Drawn batches of {sweep['study']} ({MIX_CELLS} cells each), by overlap of the estimated "
                      "mix with the reference's", "",
                  "| batch | overlap | input: l1 / l2 acc | all: l1 / l2 acc | auto: l1 / l2 acc |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, r in sorted(sweep["batches"].items(), key=lambda kv: -kv[1]["overlap"]):
            lines.append(f"| {name} | {r['overlap']:.3f} | " + " | ".join(
                f"{r[v][0]:.3f} / {r[v][1]:.3f}" for v in ("input", "all", "auto")) + " |")
        lines += ["", "mean accuracy (both levels, every batch) by threshold: " + ", ".join(
            f"{t:.2f}: {a:.4f}" for t, a in sweep["mean_accuracy_by_threshold"].items())]
    lines += ["", f"{result['wall_s']:.0f} s in all (`python benchmarks/validate_query_statistics.py`)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
