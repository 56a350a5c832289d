"""Label transfer, reference batches/studies/patients → held-out ones (tasks 2, 3: protein panels; 5: RNA).

Methods on the same reference and query cells: a Concerto protein atlas (ingested with its
batches, built with Ray, mapped with ``map_query``), PCA + kNN, CellTypist, and scANVI with
scArches surgery on the antibody counts (where its CPU time fits; otherwise its measured
per-epoch time and the projection are reported instead).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from quality_tasks import peers
from quality_tasks.common import (
    build_atlas_from,
    fmt,
    from_mapped,
    map_with_atlas,
    run_info,
    say,
    score_labels,
    start_ray,
    table,
    write_results,
)

ORDER = ["Concerto atlas", "Concerto, input layer per batch", "Concerto, all layers per batch", "Concerto, no batch_key",
         "PCA + kNN", "CellTypist", "scANVI (scArches)"]


def protein_query(adata, batch_key: str | None = None) -> ad.AnnData:
    """The query as ``map_query`` reads a protein-only query: counts in ``obsm["protein"]`` (and
    the batch column, when given)."""
    counts = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    frame = pd.DataFrame(counts, index=adata.obs_names.astype(str), columns=adata.var_names.astype(str))
    obs = pd.DataFrame(index=frame.index)
    if batch_key is not None:
        obs[batch_key] = adata.obs[batch_key].astype(str).to_numpy()
    return ad.AnnData(obs=obs, obsm={"protein": frame})


def rna_query(adata, batch_key: str | None = None) -> ad.AnnData:
    """The query as ``map_query`` reads an RNA query: counts in ``X`` (and the batch column)."""
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    if batch_key is not None:
        obs[batch_key] = adata.obs[batch_key].astype(str).to_numpy()
    return ad.AnnData(X=adata.X.copy(), obs=obs, var=pd.DataFrame(index=adata.var_names.astype(str)))


def scvi_epoch_seconds(reference, batch) -> float:
    """One scVI epoch on the reference (to project what scvi-tools' default budget would cost)."""
    scvi = peers._quiet()
    a = peers._counts_adata(reference, None, batch, None)
    scvi.model.SCVI.setup_anndata(a, batch_key="batch")
    model = scvi.model.SCVI(a, n_latent=30, n_layers=2)
    t = time.perf_counter()
    model.train(max_epochs=1, **peers._train_kwargs())
    return time.perf_counter() - t


def run_task(out: Path, *, title: str, adata, is_ref: np.ndarray, levels: list[str], batch_key: str,
             unlabeled: tuple[str, ...], epochs: int, batch_size: int, run_scanvi: bool, split_note: str,
             quick: bool, modality: str = "protein") -> dict:
    started, load_start = time.perf_counter(), os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    reference, query_cells = adata[is_ref].copy(), adata[~is_ref].copy()
    truth = query_cells.obs[levels].astype(str).copy()
    truth.index = truth.index.astype(str)
    methods: dict[str, dict] = {}
    notes: dict[str, str] = {}

    say(f"{title}: PCA + kNN")
    from atlas.evaluate.baselines import PcaKnnBaseline

    t = time.perf_counter()
    baseline = PcaKnnBaseline().fit(reference, levels, unlabeled=unlabeled)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    mapped = baseline.map(query_cells)
    methods["PCA + kNN"] = {**from_mapped(mapped, levels), "fit_s": fit_s, "map_s": time.perf_counter() - t}

    say(f"{title}: Concerto {modality} atlas ({epochs} epochs, batch {batch_size}, 2 Ray Train workers)")
    import ray

    t = time.perf_counter()
    start_ray(2)
    ray_start_s = time.perf_counter() - t
    try:
        built = build_atlas_from(
            out, "reference", reference,
            ingest_kwargs={"modality": modality.lower(), "batch_key": batch_key, "label_keys": {lv: lv for lv in levels},
                           "unlabeled": unlabeled, "species": "human"},
            # The store keeps the source's batch_key column as obs "batch" (the domains).
            config={"model": {"model": "concerto", "modalities": [modality]},
                    "data": {"batch_size": batch_size, "single_domain": True, "domain_key": "batch"},
                    "train": {"epochs": epochs, "lr": 1e-3, "checkpoint_every": 500, "seed": 0},
                    "scaling": {"num_workers": 2, "use_gpu": False},
                    "index": {"levels": levels}})
    finally:
        ray.shutdown()
    # As a user who knows the query's batches maps (batch_key; the default domain_statistics
    # "auto": every layer adapted for a batch whose cell-type mix is the reference's, else the
    # input layer), the same with the input layer only ("input", the default before) or every
    # layer ("all") for every batch, and without batch_key (the reference's average statistics).
    query = protein_query(query_cells, batch_key) if modality == "protein" else rna_query(query_cells, batch_key)
    for name, options in (("Concerto atlas", {"batch_key": batch_key}),
                          ("Concerto, input layer per batch", {"batch_key": batch_key, "domain_statistics": "input"}),
                          ("Concerto, all layers per batch", {"batch_key": batch_key, "domain_statistics": "all"}),
                          ("Concerto, no batch_key", {})):
        mapped, map_s = map_with_atlas(built["artifact"], query, levels, **options)
        methods[name] = {**from_mapped(mapped, levels), "fit_s": built["build_s"], "map_s": map_s}
        choices = {b: (v.get("layers"), v.get("composition_overlap"))
                   for b, v in mapped.uns["atlas"]["query_domains"]["batches"].items()}
        say(f"{title}: {name}: {mapped.uns['atlas']['query_domains']['statistics']} statistics, per batch "
            f"(layers, mix overlap): {choices}")

    say(f"{title}: CellTypist")
    methods["CellTypist"] = peers.celltypist_transfer(reference, query_cells, levels, unlabeled=unlabeled)

    ref_batch = reference.obs[batch_key].astype(str).to_numpy()
    query_batch = query_cells.obs[batch_key].astype(str).to_numpy()
    if run_scanvi:
        budget = peers.Budget(2, 2, 2, 2) if quick else peers.Budget()
        say(f"{title}: scANVI with scArches surgery ({budget})")
        methods["scANVI (scArches)"] = peers.scanvi_surgery(reference, query_cells, levels, ref_batch=ref_batch,
                                                            query_batch=query_batch, unlabeled=unlabeled, budget=budget)
        notes["scANVI (scArches)"] = (f"scVI {budget.scvi_epochs} + scANVI {budget.scanvi_epochs} epochs per level + "
                                      f"query {budget.query_epochs} epochs, negative-binomial model of the "
                                      + ("antibody counts" if modality == "protein" else "RNA counts"))
    else:
        say(f"{title}: scANVI — one scVI epoch, to project the default budget")
        per_epoch = scvi_epoch_seconds(reference, ref_batch)
        default_epochs = min(400, round(20000 / reference.n_obs * 400))
        projected = per_epoch * (default_epochs + 20) + per_epoch * 100 * query_cells.n_obs / reference.n_obs
        notes["scANVI (scArches)"] = (
            f"not run: one scVI epoch over the {reference.n_obs:,} reference cells took {per_epoch:.0f} s here; "
            f"scvi-tools' default ({default_epochs} scVI + 20 scANVI epochs, then 100 query epochs) projects to "
            f"≈ {projected / 60:.0f} min per label level on this 2-core machine (scANVI epochs cost more than "
            "scVI's, so this is a lower bound)")

    scores = {}
    for name, m in methods.items():
        s = score_labels(m, truth, levels, unlabeled)
        s["fit_s"], s["map_s"] = m.get("fit_s"), m.get("map_s")
        scores[name] = s
    result = {"task": title, "split": {"reference": int(reference.n_obs), "query": int(query_cells.n_obs),
                                       "rule": split_note, "file": str(out / "split.csv")},
              "levels": levels, "settings": {"concerto_epochs": epochs, "batch_size": batch_size, "quick": quick,
                                             "ray_start_s": ray_start_s, "ingest_s": built["ingest_s"],
                                             "build_stages_s": built["stages_s"]},
              "notes": notes, "scores": scores, "run": run_info(started, load_start)}
    write_results(out, result, markdown(result))
    return result


def markdown(r: dict) -> str:
    s, levels = r["scores"], r["levels"]
    names = [n for n in ORDER if n in s]
    rows = []
    for lv in levels:
        rows.append((f"{lv} accuracy", *[s[n][lv]["accuracy"] for n in names]))
        rows.append((f"{lv} macro-F1", *[s[n][lv]["macro_f1"] for n in names]))
    rows.append(("fit / build (s)", *[s[n]["fit_s"] for n in names]))
    rows.append((f"map {r['split']['query']:,} cells (s)", *[s[n]["map_s"] for n in names]))
    lines = [f"# {r['task']} ({r['split']['reference']:,} reference / {r['split']['query']:,} query cells)", "",
             f"Split: {r['split']['rule']} (`{r['split']['file']}`).", "",
             *table(rows, ["metric", *names]), ""]
    lines.append(f"Concerto: {r['settings']['concerto_epochs']} epochs, batch {r['settings']['batch_size']} "
                 "(one batch of the reference per training batch), lr 1e-3, 2 Ray Train workers; build = train + "
                 "embed + index + threshold calibration with Ray running (ingest "
                 f"{r['settings']['ingest_s']:.0f} s and Ray start {r['settings']['ray_start_s']:.0f} s not included); "
                 "mapping = `map_query` (k 25 / 25, no rejection; \"Concerto atlas\": `batch_key` = the query's batches, "
                 "the default `domain_statistics=\"auto\"`; \"input layer\" / \"all layers\": `\"input\"` / "
                 "`\"all\"` for every batch; \"no batch_key\": the reference's statistics). PCA + kNN: 1e4 + log1p, "
                 "scaled, PCA (≤ 50 "
                 "components), cosine kNN, the same hierarchical vote with k 25 / 5. CellTypist: SGD logistic regression per "
                 "level on 1e4 + log1p, no majority voting.")
    for name, note in r["notes"].items():
        lines.append(f"{name}: {note}.")
    lines.append(f"Run {r['run']['finished']}, {r['run']['wall_s']:.0f} s, commit {r['run']['commit']}, load average "
                 f"{r['run']['load_average_start'][0]:.1f} → {r['run']['load_average_end'][0]:.1f} (shared 2-core "
                 "machine: times are indicative).")
    peers_only = [n for n in names if not n.startswith("Concerto")]
    for mine in [n for n in names if n.startswith("Concerto")]:
        lines += ["", f"Where {mine} stands against the peers:", ""]
        for lv in levels:
            for metric in ("accuracy", "macro_f1"):
                best = max(peers_only, key=lambda n: s[n][lv][metric])
                value, top = s[mine][lv][metric], s[best][lv][metric]
                verdict = f"best, ahead of {best} by {value - top:.3f}" if value >= top else \
                    f"loses to {best} by {top - value:.3f}"
                lines.append(f"- {lv} {metric}: {fmt(value)} — {verdict}")
    return "\n".join(lines) + "\n"
