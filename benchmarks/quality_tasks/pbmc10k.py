"""Task 1 — pbmc10k CITE-seq, 80/20: hierarchical label transfer, unseen-type rejection, proteins from RNA.

The Concerto atlas and PCA + kNN come from ``benchmarks/mapping_quality.py`` (same split, same
settings, run again here); the peers are scANVI with scArches surgery, totalVI with scArches
surgery (proteins) and CellTypist, trained on the same reference cells and applied to the same
RNA-only query. Unseen type: every method is refitted on the reference without CD8 T cells and
scored by the AUROC of 1 − its level-1 confidence (vote share; scANVI and CellTypist: the top
class probability).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import mapping_quality as mq
import numpy as np
import pandas as pd

from atlas.mapping.params import K_COARSE, K_FINE
from atlas.names import confidence_key, profile_key
from quality_tasks import peers
from quality_tasks.common import (
    fmt,
    from_mapped,
    run_info,
    say,
    score_labels,
    start_ray,
    table,
    unseen_auroc,
    write_results,
)

LEVELS = mq.LEVELS
UNLABELED = mq.UNLABELED
METHODS = ["Concerto atlas", "PCA + kNN", "scANVI (scArches)", "CellTypist", "totalVI (scArches)"]


def run(out: Path, *, epochs: int = 5, quick: bool = False) -> dict:
    started, load_start = time.perf_counter(), os.getloadavg()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = peers.Budget(2, 2, 2, 2) if quick else peers.Budget()
    epochs = 1 if quick else epochs

    adata, is_ref = mq.load_split(out)
    if quick:
        keep = np.random.default_rng(1).random(adata.n_obs) < 0.3
        adata, is_ref = adata[keep].copy(), is_ref[keep]
    reference = adata[is_ref].copy()
    unseen_ref = reference[reference.obs["cell_type_l1"].astype(str).to_numpy() != mq.UNSEEN_L1].copy()
    query_full = adata[~is_ref].copy()
    truth = query_full.obs[LEVELS].astype(str).copy()
    truth.index = truth.index.astype(str)
    proteins = mq.measured_proteins(query_full)
    query = query_full.copy()
    del query.obsm["protein_counts"]
    l1 = truth["cell_type_l1"]
    labelled = ~l1.isin(UNLABELED).to_numpy()
    is_unseen = (l1 == mq.UNSEEN_L1).to_numpy()

    methods: dict[str, dict] = {}
    unseen: dict[str, float] = {}

    say("PCA + kNN")
    base, fit_s, map_s = mq.run_baseline(reference, query)
    base_unseen, _, _ = mq.run_baseline(unseen_ref, query)
    methods["PCA + kNN"] = {**from_mapped(base, LEVELS), "protein": base.obsm[profile_key("protein")],
                            "fit_s": fit_s, "map_s": map_s}
    unseen["PCA + kNN"] = unseen_auroc(base_unseen.obs.loc[truth.index, confidence_key("cell_type_l1")], is_unseen, labelled)

    say(f"Concerto atlases ({epochs} epochs, 2 Ray Train workers)")
    import ray

    start_ray(2)
    try:
        full = mq.build_concerto(out, "reference", reference, epochs=epochs, workers=2)
        without = mq.build_concerto(out, "reference_without_cd8", unseen_ref, epochs=epochs, workers=2)
    finally:
        ray.shutdown()
    mapped, map_s, _, _ = mq.map_concerto(full["artifact"], query, thresholds=None)
    mapped_unseen, _, _, _ = mq.map_concerto(without["artifact"], query, thresholds=None)
    methods["Concerto atlas"] = {**from_mapped(mapped, LEVELS), "protein": mapped.obsm[profile_key("protein")],
                                 "fit_s": full["build_s"], "map_s": map_s}
    unseen["Concerto atlas"] = unseen_auroc(mapped_unseen.obs.loc[truth.index, confidence_key("cell_type_l1")],
                                            is_unseen, labelled)

    ref_batch, query_batch = np.repeat("reference", reference.n_obs), np.repeat("query", query.n_obs)
    say(f"scANVI with scArches surgery ({budget})")
    scanvi = peers.scanvi_surgery(reference, query, LEVELS, ref_batch=ref_batch, query_batch=query_batch,
                                  unlabeled=UNLABELED, budget=budget)
    methods["scANVI (scArches)"] = scanvi
    scanvi_unseen = peers.scanvi_surgery(unseen_ref, query, ["cell_type_l1"],
                                         ref_batch=np.repeat("reference", unseen_ref.n_obs),
                                         query_batch=query_batch, unlabeled=UNLABELED, budget=budget)
    unseen["scANVI (scArches)"] = unseen_auroc(scanvi_unseen["confidence"]["cell_type_l1"].loc[truth.index],
                                               is_unseen, labelled)

    say("CellTypist")
    methods["CellTypist"] = peers.celltypist_transfer(reference, query, LEVELS, unlabeled=UNLABELED)
    ct_unseen = peers.celltypist_transfer(unseen_ref, query, ["cell_type_l1"], unlabeled=UNLABELED)
    unseen["CellTypist"] = unseen_auroc(ct_unseen["confidence"]["cell_type_l1"].loc[truth.index], is_unseen, labelled)

    say(f"totalVI with scArches surgery ({budget})")
    totalvi = peers.totalvi_surgery(reference, query, "protein_counts", ref_batch=ref_batch,
                                    query_batch=query_batch, budget=budget)
    # totalVI predicts denoised counts; Pearson r is taken on their log1p, as the measured side is log-normalised.
    methods["totalVI (scArches)"] = {"protein": np.log1p(totalvi["protein"]), "fit_s": totalvi["fit_s"],
                                     "map_s": totalvi["map_s"]}

    from atlas.evaluate.metrics import feature_pearson

    scores = {}
    for name, m in methods.items():
        s = score_labels(m, truth, LEVELS, UNLABELED) if "pred" in m else {}
        if "protein" in m:
            pred = pd.DataFrame(m["protein"]).copy()
            pred.index = pred.index.astype(str)
            s["protein"] = feature_pearson(pred.loc[proteins.index, proteins.columns], proteins).to_dict()
        s["unseen_auroc"] = unseen.get(name)
        s["fit_s"], s["map_s"] = m.get("fit_s"), m.get("map_s")
        scores[name] = s

    result = {"task": "pbmc10k", "split": {"reference": int(reference.n_obs), "query": int(query.n_obs),
                                            "reference_without_cd8": int(unseen_ref.n_obs), "file": str(out / "split.csv")},
              "settings": {"concerto_epochs": epochs, "peer_budget": budget.__dict__,
                           "k_coarse": K_COARSE, "k_fine": K_FINE,
                           "quick": quick},
              "scores": scores, "run": run_info(started, load_start)}
    write_results(out, result, markdown(result))
    return result


def markdown(r: dict) -> str:
    s = r["scores"]
    names = [n for n in METHODS if n in s]

    def get(name, *path):
        node = s[name]
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    rows = [
        ("level-1 accuracy", *[get(n, "cell_type_l1", "accuracy") for n in names]),
        ("level-1 macro-F1", *[get(n, "cell_type_l1", "macro_f1") for n in names]),
        ("level-2 accuracy", *[get(n, "cell_type_l2", "accuracy") for n in names]),
        ("level-2 macro-F1", *[get(n, "cell_type_l2", "macro_f1") for n in names]),
        ("CD8 T removed: rejection AUROC", *[get(n, "unseen_auroc") for n in names]),
        ("protein r, mean of 14", *[get(n, "protein", "mean") for n in names]),
        ("protein r, median of 14", *[get(n, "protein", "median") for n in names]),
        ("fit / build (s)", *[get(n, "fit_s") for n in names]),
        (f"map {r['split']['query']:,} cells (s)", *[get(n, "map_s") for n in names]),
    ]
    b = r["settings"]["peer_budget"]
    lines = [f"# Task 1 — pbmc10k CITE-seq ({r['split']['reference']:,} reference / {r['split']['query']:,} "
             "RNA-only query cells)", "",
             *table([[c if c is not None else "—" for c in row] for row in rows], ["metric", *names]), "",
             f"Settings: Concerto {r['settings']['concerto_epochs']} epochs (batch 64, lr 1e-3, 2 Ray Train workers), "
             f"k = {r['settings']['k_coarse']} / {r['settings']['k_fine']} hierarchical vote, no rejection threshold; "
             "PCA + kNN: PCA 50 on the reference, cosine kNN, k = 25 / 5, a plain similarity-weighted vote; "
             f"scANVI: scVI {b['scvi_epochs']} epochs (scArches architecture, 30 latent, 2 layers; "
             f"scvi-tools' default would be 400 on this many cells), scANVI {b['scanvi_epochs']} epochs per level, "
             f"query surgery {b['query_epochs']} epochs; totalVI {b['totalvi_epochs']} epochs + surgery "
             f"{b['query_epochs']} epochs, proteins = 25-sample mean with the reference batch, r on log1p; "
             "CellTypist: SGD logistic regression on 1e4 + log1p, all 4,000 genes, no majority voting; "
             "scANVI and CellTypist are flat classifiers per level (not hierarchical). "
             "'—' = the method does not do this.",
             f"Split: `{r['split']['file']}`. Run {r['run']['finished']}, {r['run']['wall_s']:.0f} s, commit "
             f"{r['run']['commit']}, load average {r['run']['load_average_start'][0]:.1f} → "
             f"{r['run']['load_average_end'][0]:.1f} (times are indicative on a shared 2-core machine)."]
    best = {row[0]: max((v, n) for v, n in zip(row[1:], names) if v is not None) for row in rows[:7]}
    ours = dict(zip(names, zip(*[row[1:] for row in rows[:7]])))
    lines += ["", "Where Concerto stands (difference to the best method of each row):", ""]
    for i, row in enumerate(rows[:7]):
        value, (top, who) = ours["Concerto atlas"][i], best[row[0]]
        if value is None:
            continue
        verdict = "best" if who == "Concerto atlas" else f"loses to {who} by {top - value:.3f}"
        lines.append(f"- {row[0]}: {fmt(value)} — {verdict}")
    return "\n".join(lines) + "\n"


def run_rejection_only(out: Path, *, epochs: int = 5) -> dict[str, float]:
    """The task's unseen-type row alone (Concerto and PCA + kNN, same split, same run): the
    reference without CD8 T, the query mapped, AUROC of 1 − level-1 confidence for "is CD8 T".

        python -c "import sys; sys.path[:0] = ['benchmarks', '.']; from pathlib import Path; \\
                   from quality_tasks.pbmc10k import run_rejection_only as r; print(r(Path('benchmarks/out/rejection')))"
    """
    import ray

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    adata, is_ref = mq.load_split(out)
    reference = adata[is_ref].copy()
    unseen_ref = reference[reference.obs["cell_type_l1"].astype(str).to_numpy() != mq.UNSEEN_L1].copy()
    query = adata[~is_ref].copy()
    truth = query.obs["cell_type_l1"].astype(str)
    truth.index = truth.index.astype(str)
    del query.obsm["protein_counts"]
    labelled = ~truth.isin(UNLABELED).to_numpy()
    is_unseen = (truth == mq.UNSEEN_L1).to_numpy()
    base, _, _ = mq.run_baseline(unseen_ref, query)
    result = {"PCA + kNN": unseen_auroc(base.obs.loc[truth.index, confidence_key("cell_type_l1")], is_unseen, labelled)}
    start_ray(2)
    try:
        without = mq.build_concerto(out, "reference_without_cd8", unseen_ref, epochs=epochs, workers=2)
    finally:
        ray.shutdown()
    mapped, _, _, _ = mq.map_concerto(without["artifact"], query, thresholds=None)
    result["Concerto atlas"] = unseen_auroc(mapped.obs.loc[truth.index, confidence_key("cell_type_l1")],
                                            is_unseen, labelled)
    return result
