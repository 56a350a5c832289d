"""``domain_statistics="auto"`` against "input" and "all" on two more reference-only splits.

    python benchmarks/validate_auto_statistics.py [--tasks liao,asap] [--out benchmarks/out/auto_statistics]

``benchmarks/validate_query_statistics.py`` chose the rule on ADTnorm's held-out reference studies
(a protein panel). This checks it where the scored queries are never read either, with the scored
tasks' own build settings, on

* liao2020 (whole transcriptome): the atlas of reference patient C144, patient C146 mapped with its
  batch given (``validate_label_space``'s split);
* ASAP/CITE (216 antibodies): CITE-seq batch c1 as the reference, c2 mapped (task 2's reference
  batches; its ASAP-seq query batches are never read).

Each validation set is mapped with ``domain_statistics`` input, all and auto; per split: level-1 and
level-2 accuracy / macro-F1 and what auto chose (layers, mix overlap). Writes ``results.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quality_tasks.common import build_atlas_from, data_file, map_with_atlas, start_ray  # noqa: E402

VARIANTS = ("input", "all", "auto")


def _liao():
    import validate_label_space

    adata, train, levels, ingest_kwargs, config, map_kwargs, unlabeled = validate_label_space.TASKS["liao"]()
    from quality_tasks.protein_transfer import rna_query

    config = {**config, "train": {"epochs": 5, "lr": 1e-3, "checkpoint_every": 50, "seed": 0},
              "scaling": {"num_workers": 2, "use_gpu": False}}
    query = rna_query(adata[~train].copy(), map_kwargs["batch_key"])
    return adata[train].copy(), query, adata[~train].obs, levels, ingest_kwargs, config, map_kwargs["batch_key"], unlabeled


def _asap():
    import anndata as ad
    from quality_tasks.asap_cite import FILE, LEVELS
    from quality_tasks.protein_transfer import protein_query

    adata = ad.read_h5ad(data_file(FILE))
    adata.obs["cluster"] = "cluster " + adata.obs["cluster"].astype(str)
    batch = adata.obs["batch"].astype(str)
    train, held = adata[(batch == "c1").to_numpy()].copy(), adata[(batch == "c2").to_numpy()].copy()
    ingest_kwargs = {"modality": "protein", "batch_key": "batch", "label_keys": {lv: lv for lv in LEVELS},
                     "unlabeled": (), "species": "human"}
    config = {"model": {"model": "concerto", "modalities": ["protein"]},
              "data": {"batch_size": 64, "single_domain": True, "domain_key": "batch"},
              "train": {"epochs": 5, "lr": 1e-3, "checkpoint_every": 500, "seed": 0},
              "scaling": {"num_workers": 2, "use_gpu": False}, "index": {"levels": LEVELS}}
    return train, protein_query(held, "batch"), held.obs, LEVELS, ingest_kwargs, config, "batch", ()


TASKS = {"liao": _liao, "asap": _asap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="liao,asap")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "auto_statistics")
    args = parser.parse_args()

    import ray
    from sklearn.metrics import f1_score

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    lines = ["| split | variant | level 1 acc / macro-F1 | level 2 acc / macro-F1 | auto's choice (layers, overlap) |",
             "| --- | --- | ---: | ---: | --- |"]
    for task in args.tasks.split(","):
        train, query, obs, levels, ingest_kwargs, config, batch_key, unlabeled = TASKS[task]()
        start_ray(2)
        try:
            built = build_atlas_from(out / task, "reference", train, ingest_kwargs=ingest_kwargs, config=config)
        finally:
            ray.shutdown()
        results[task] = {"build_s": round(built["build_s"], 1), "cells": int(query.n_obs)}
        for variant in VARIANTS:
            t = time.perf_counter()
            mapped, _ = map_with_atlas(built["artifact"], query, levels, batch_key=batch_key,
                                       domain_statistics=variant)
            row: dict = {"map_s": round(time.perf_counter() - t, 1)}
            for lv in levels:
                truth = obs[lv].astype(str).to_numpy()
                ok = ~np.isin(truth, [*unlabeled, "", "nan", "undefined"])
                pred = mapped.obs[f"{lv}_pred"].astype(str).to_numpy()[ok]
                row[lv] = {"accuracy": round(float((pred == truth[ok]).mean()), 4),
                           "macro_f1": round(float(f1_score(truth[ok], pred, average="macro")), 4)}
            choice = {b: (v.get("layers"), v.get("composition_overlap"))
                      for b, v in mapped.uns["atlas"]["query_domains"]["batches"].items()}
            row["choice"] = choice
            results[task][variant] = row
            cells = [f"{row[lv]['accuracy']:.3f} / {row[lv]['macro_f1']:.3f}" for lv in levels]
            lines.append(f"| {task} ({query.n_obs:,} cells) | {variant} | " + " | ".join(cells) + " | "
                         + (str(choice) if variant == "auto" else "") + " |")
            print(lines[-1], flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
