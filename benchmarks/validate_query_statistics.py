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
            ("all layers, per batch", {"domain_statistics": "all", "batch_key": "batch"}))


def _scores(mapped, truth: pd.DataFrame) -> dict:
    from atlas.evaluate.metrics import label_transfer
    from atlas.names import pred_key

    out = {}
    for lv in LEVELS:  # 'undefined' reference labels are not scored
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

    sizes = {s: int((study_of == s).sum()) for s in validation}
    result = {"validation_studies": sizes, "train_cells": int(train.n_obs), "build_s": round(built["build_s"], 1),
              "variants": rows, "wall_s": round(time.perf_counter() - started, 1)}
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
    lines += ["", f"{result['wall_s']:.0f} s in all (`python benchmarks/validate_query_statistics.py`)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
