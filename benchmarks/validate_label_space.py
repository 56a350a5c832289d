"""Choose where labels are voted — the atlas embedding or the profile space (the embedding beside a
PCA of RNA, :mod:`atlas.index.profile_space`) — on the *reference* only (never a scored query).

    python benchmarks/validate_label_space.py [--tasks pbmc10k,liao] [--out benchmarks/out/validate_label_space]
    python benchmarks/validate_label_space.py --variants "profiles,1 worker,2 workers lr 2e-3" --k-fine 25

Validation splits, as ``benchmarks/validate_heads.py`` (the scored queries are never read):

* ``pbmc10k``: task 1's 80% reference, split again 80/20 at random (seed 2);
* ``liao``: task 5's two reference patients (labelled cells); the first is the atlas, the second
  validates (mapped with its patient as the query batch).

Per split and variant, one atlas is built through ``atlas.build.build_atlas`` with the build's
defaults for the task (as ``benchmarks/quality.py`` builds it: 5 epochs, batch 64, 2 Ray Train
workers) and ``index.label_space`` set, and the validation cells are mapped by ``map_query``
(k 25 / 5, no rejection). Scores: accuracy and macro-F1 per level over labelled cells; for
pbmc10k also the protein r (the validation cells' measured proteins). Writes ``results.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quality_tasks.common import build_atlas_from, data_file  # noqa: E402

#: Variant → build-config overrides. The first two chose ``index.label_space``; the others compare
#: the Ray Train set-up (a 2-worker build takes half the optimiser steps per epoch of a 1-worker one:
#: each worker trains on its own batch of 64, so the global batch is 128).
VARIANTS: dict[str, dict] = {
    "embedding": {"index": {"label_space": "embedding"}},
    "profiles": {"index": {"label_space": "profiles"}},
    "1 worker": {"scaling": {"num_workers": 1}},
    "2 workers lr 2e-3": {"train": {"lr": 2e-3}},
}


def _pbmc10k():
    import anndata as ad

    adata = ad.read_h5ad(data_file("pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"))
    adata = adata[np.random.default_rng(0).random(adata.n_obs) < 0.8].copy()  # task 1's reference
    train = np.random.default_rng(2).random(adata.n_obs) < 0.8
    levels = ["cell_type_l1", "cell_type_l2"]
    ingest_kwargs = {"obsm_modalities": {"protein": "protein_counts"}, "label_keys": {lv: lv for lv in levels},
                     "unlabeled": ["undefined"], "species": "human"}
    config = {"model": {"model": "concerto", "modalities": ["RNA"]},
              "data": {"batch_size": 64, "single_domain": True},
              "index": {"levels": levels, "profiles": ["protein"]}}
    return adata, train, levels, ingest_kwargs, config, {}, ("undefined",)


def _liao():
    import anndata as ad

    adata = ad.read_h5ad(data_file("liao2020_covid_balf_3patients_rna_labelled.h5ad"))
    adata = adata[adata.obs["annotated"].astype(bool).to_numpy()].copy()
    patients = sorted(adata.obs["patient"].astype(str).unique())[:2]  # task 5's query patient is never read
    adata = adata[adata.obs["patient"].astype(str).isin(patients).to_numpy()].copy()
    train = (adata.obs["patient"].astype(str) == patients[0]).to_numpy()
    levels = ["cell_type_coarse", "cell_type_fine"]
    ingest_kwargs = {"batch_key": "patient", "label_keys": {lv: lv for lv in levels}, "species": "human"}
    config = {"model": {"model": "concerto", "modalities": ["RNA"]},
              "data": {"batch_size": 64, "single_domain": True, "domain_key": "batch"},
              "index": {"levels": levels}}
    return adata, train, levels, ingest_kwargs, config, {"batch_key": "patient"}, ()


TASKS = {"pbmc10k": _pbmc10k, "liao": _liao}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="pbmc10k,liao")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--variants", default="embedding,profiles", help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--k-fine", type=int, default=5, help="the fine vote's k (5: the table that chose the "
                                                               "label space; 25: today's default)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "validate_label_space")
    args = parser.parse_args()

    import ray
    from sklearn.metrics import f1_score

    from atlas.evaluate.baselines import log_normalise_frame
    from atlas.evaluate.metrics import feature_pearson
    from atlas.mapping.query import map_query

    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results: dict[str, dict] = {}
    rows = []
    try:
        for task in args.tasks.split(","):
            adata, train, levels, ingest_kwargs, config, map_kwargs, unlabeled = TASKS[task]()
            reference, validation = adata[train].copy(), adata[~train].copy()
            truth = {lv: validation.obs[lv].astype(str).to_numpy() for lv in levels}
            proteins = None
            if "protein_counts" in validation.obsm:
                proteins = log_normalise_frame(validation.obsm["protein_counts"])
                del validation.obsm["protein_counts"]
            for variant in args.variants.split(","):
                over = VARIANTS[variant]
                full = {**config,
                        "train": {"epochs": args.epochs, "lr": 1e-3, "checkpoint_every": 50, "seed": 0,
                                  **over.get("train", {})},
                        "scaling": {"num_workers": 2, "use_gpu": False, **over.get("scaling", {})},
                        "index": {**config["index"], **over.get("index", {})}}
                built = build_atlas_from(out / task, variant.replace(" ", "_"), reference,
                                         ingest_kwargs=ingest_kwargs, config=full)
                mapped = map_query(validation, built["artifact"], k_coarse=25, k_fine=args.k_fine, thresholds=None,
                                   **map_kwargs)
                scores: dict = {"build_s": built["build_s"], "label_neighbours": mapped.uns["atlas"]["label_neighbours"]}
                cells = []
                for lv in levels:
                    ok = ~np.isin(truth[lv], [*unlabeled, "", "nan"])
                    pred = mapped.obs[f"{lv}_pred"].astype(str).to_numpy()[ok]
                    scores[lv] = {"accuracy": float((pred == truth[lv][ok]).mean()),
                                  "macro_f1": float(f1_score(truth[lv][ok], pred, average="macro"))}
                    cells.append(f"{scores[lv]['accuracy']:.3f} / {scores[lv]['macro_f1']:.3f}")
                if proteins is not None:
                    pred = mapped.obsm["protein_pred"].set_axis(proteins.index, axis=0)
                    r = feature_pearson(pred[proteins.columns], proteins)
                    scores["protein_r"] = {"mean": r.mean, "median": r.median}
                    cells.append(f"{r.mean:.3f} / {r.median:.3f}")
                else:
                    cells.append("—")
                results[f"{task} | {variant}"] = scores
                rows.append(f"| {task} ({validation.n_obs:,} validation cells) | {variant} | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
    finally:
        ray.shutdown()
    table = "\n".join(["| split | variant | level 1 acc / macro-F1 | level 2 acc / macro-F1 | protein r mean / median |",
                       "| --- | --- | ---: | ---: | ---: |", *rows])
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
