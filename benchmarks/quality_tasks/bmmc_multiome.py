"""Task 6 — NeurIPS 2021 BMMC multiome starter (RNA + ATAC, 500 cells, 2 donors): the six-metric
mean the CVQVAE paper's code reports, beside scIB's 0.6 / 0.4 overall, in both protocols.

* **joint embedding, batch = donor**: each method's embedding of all 500 cells (paired);
* **modality mixing, batch = modality** (the paper's protocol): the RNA-view and the ATAC-view
  embedding of every cell stacked (1,000 rows, labels twice); the raw views (PCA of the RNA, LSI
  of the ATAC, 16-d each) stacked are the unintegrated baseline.

Metrics (:func:`atlas.evaluate.integration.six_metric_scores`): NMI, cell-type ASW, cell-cycle
conservation (the set's ``phase`` as covariate: only 2 of the 97 Tirosh cell-cycle genes are among
its 600), trajectory conservation (``pseudotime_order_GEX``, 57 erythroid cells), batch ASW, graph
connectivity, and their mean; plus :func:`~atlas.evaluate.integration.integration_scores`' overall.
Labels ``cell_type`` (21 types).

CVQVAE and its no-VQ ablation are trained in this process with the project's model and
``fit_local`` (500 cells is below what a Ray Train build is for): the model defaults of
``atlas build`` (chosen on MOp's reference in ``benchmarks/validate_cvqvae.py``, never on these
cells), batch 64 (the default 256 would give one step per epoch), 3 seeds. Peers: PCA 50 of the
RNA (unintegrated), Harmony on it, scVI (100 epochs, RNA counts). Every cell is both trained on and
scored, as in the paper's integration benchmark.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from quality_tasks import peers
from quality_tasks.common import data_file, fmt, run_info, say, table, write_results
from quality_tasks.mop import raw_views

RNA_FILE, ATAC_FILE = "neurips21_bmmc_multiome_starter_rna.h5ad", "neurips21_bmmc_multiome_starter_atac.h5ad"
LABEL, BATCH, PHASE, PSEUDOTIME = "cell_type", "batch", "phase", "pseudotime_order_GEX"
SEEDS = (0, 1, 2)
BATCH_SIZE = 64


def load():
    import anndata as ad
    import scipy.sparse as sp

    rna, atac = ad.read_h5ad(data_file(RNA_FILE)), ad.read_h5ad(data_file(ATAC_FILE))
    if not (rna.obs_names == atac.obs_names).all():
        raise SystemExit(f"{RNA_FILE} and {ATAC_FILE} do not hold the same cells in the same order")
    return rna, atac, sp.csr_matrix(rna.X, dtype=np.float32), sp.csr_matrix(atac.X, dtype=np.float32)


def train_cvqvae(r, a, domain: np.ndarray, *, quantize: bool, seed: int, epochs: int, lr: float):
    """A CVQVAE with ``atlas build``'s defaults (``quantize`` aside) trained on every cell;
    returns ``(joint, z_rna, z_atac, loss per epoch, seconds)``."""
    import torch

    from atlas.data.batches import csr_to_batch
    from atlas.models import CVQVAEConfig, build_model
    from atlas.train.step import fit_local, minibatches

    torch.manual_seed(seed)
    config = CVQVAEConfig(modalities=("RNA", "ATAC"), quantize=quantize)
    model = build_model(config, {"RNA": r.shape[1], "ATAC": a.shape[1]}, n_domains=int(domain.max()) + 1)
    t = time.perf_counter()
    model.fit_views({"RNA": r, "ATAC": a}, seed=seed)
    batch = csr_to_batch({"RNA": r, "ATAC": a}, domain=domain)
    by_domain = config.domain_norm != "none"
    per_epoch = len(minibatches(batch, BATCH_SIZE, seed=0, by_domain=by_domain))
    history = fit_local(model, lambda e: minibatches(batch, BATCH_SIZE, seed=seed * 1000 + e, by_domain=by_domain),
                        epochs=epochs, lr=lr, steps_per_epoch=per_epoch)
    seconds = time.perf_counter() - t
    model.eval()
    with torch.no_grad():
        joint = model.embed(batch).numpy()
        z_rna, z_atac = model.encode(batch, "RNA").numpy(), model.encode(batch, "ATAC").numpy()
    return joint, z_rna, z_atac, [float(e["loss"]) for e in history.epochs], seconds


def run(out: Path, *, quick: bool = False) -> dict:
    import torch

    from atlas.evaluate.integration import integration_scores, pre_integration_pca, six_metric_scores
    from atlas.models.views import lognorm_counts
    from atlas.train.config import default_epochs

    started, load_start = time.perf_counter(), list(os.getloadavg())
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    rna, atac, r, a = load()
    labels = rna.obs[LABEL].astype(str).to_numpy()
    donors = rna.obs[BATCH].astype(str).to_numpy()
    phase = rna.obs[PHASE].astype(str).to_numpy()
    pseudotime = rna.obs[PSEUDOTIME].to_numpy(dtype=float)
    domain = pd.Categorical(donors).codes.astype(np.int64)
    epochs = 2 if quick else default_epochs("cvqvae")
    lr = 1e-3
    say(f"BMMC multiome starter: {rna.n_obs} cells, {r.shape[1]} genes, {a.shape[1]} peaks; CVQVAE {epochs} epochs, "
        f"batch {BATCH_SIZE}, seeds {list(SEEDS)}")
    pre = pre_integration_pca(lognorm_counts(r).toarray())
    pre_mix = raw_views(rna, atac)
    twice = np.concatenate([labels, labels])
    modality = np.repeat(["RNA", "ATAC"], rna.n_obs)
    mix_phase, mix_pt, mix_pre = np.concatenate([phase, phase]), np.concatenate([pseudotime, pseudotime]), pre_mix

    def joint_scores(x: np.ndarray) -> dict:
        return {"six": six_metric_scores(x, labels, donors, pre, phase, pseudotime),
                "scib": integration_scores(x, labels, donors, pre)}

    def mixing_scores(x: np.ndarray) -> dict:
        return {"six": six_metric_scores(x, twice, modality, mix_pre, mix_phase, mix_pt),
                "scib": integration_scores(x, twice, modality, mix_pre)}

    rows: dict[str, dict] = {}
    seeds = SEEDS[:1] if quick else SEEDS
    for name, quantize in (("CVQVAE", True), ("CVAE (no VQ)", False)):
        per_seed = []
        for seed in seeds:
            say(f"{name} seed {seed}")
            joint, z_rna, z_atac, loss, seconds = train_cvqvae(r, a, domain, quantize=quantize, seed=seed,
                                                               epochs=epochs, lr=lr)
            per_seed.append({"seed": seed, "joint": joint_scores(joint), "mixing": mixing_scores(np.vstack([z_rna, z_atac])),
                             "loss": loss, "train_s": seconds})
        rows[name] = {"seeds": per_seed}
    say("peers: PCA, Harmony, scVI")
    rows["PCA (unintegrated)"] = {"joint": joint_scores(pre), "mixing": mixing_scores(pre_mix)}
    rows["Harmony"] = {"joint": joint_scores(peers.harmony_embedding(pre, donors))}
    scvi_latent, scvi_s = peers.scvi_embedding(rna, donors, epochs=3 if quick else 100)
    rows["scVI"] = {"joint": joint_scores(scvi_latent), "train_s": scvi_s}
    result = {"task": "bmmc_multiome", "quick": quick, "cells": int(rna.n_obs), "epochs": epochs, "lr": lr,
              "batch_size": BATCH_SIZE, "seeds": list(seeds), "methods": rows,
              "run": run_info(started, load_start)}
    write_results(out, result, markdown(result))
    return result


def _ms(rows: list[dict], protocol: str, group: str, key: str) -> str:
    v = np.array([s[protocol][group][key] for s in rows], dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else fmt(float(v.mean()))


def markdown(r: dict) -> str:
    from atlas.evaluate.integration import SIX_METRICS

    lines = [f"# Task 6 — BMMC multiome starter, {r['cells']} cells (six-metric mean and scIB overall)"
             f"{' — QUICK, not a result' if r['quick'] else ''}", ""]
    header = ["method", "six-metric mean", "scIB overall", *SIX_METRICS]
    for protocol, title in (("joint", "Joint embedding, batch = donor"), ("mixing", "Modality mixing, batch = modality")):
        lines += [f"## {title}", ""]
        body = []
        for name, m in r["methods"].items():
            if "seeds" in m:
                s = m["seeds"]
                body.append([name, _ms(s, protocol, "six", "six_mean"), _ms(s, protocol, "scib", "overall"),
                             *(_ms(s, protocol, "six", k) for k in SIX_METRICS)])
            elif protocol in m:
                six, scib = m[protocol]["six"], m[protocol]["scib"]
                label = name if protocol == "joint" else "PCA (RNA) + LSI (ATAC) stacked"
                body.append([label, fmt(six["six_mean"]), fmt(scib["overall"]), *(fmt(six[k]) for k in SIX_METRICS)])
        lines += table(body, header) + [""]
    lines += ["CVQVAE / CVAE: mean ± sd over seeds " + ", ".join(map(str, r["seeds"])) +
              f"; {r['epochs']} epochs, batch {r['batch_size']}, lr {r['lr']}, `atlas build`'s model defaults.", ""]
    for name in ("CVQVAE", "CVAE (no VQ)"):
        loss = r["methods"][name]["seeds"][0]["loss"]
        picks = sorted({0, len(loss) // 4, len(loss) // 2, len(loss) - 1})
        lines.append(f"- {name} loss (seed {r['seeds'][0]}), epochs " + ", ".join(f"{i + 1}: {loss[i]:.4f}" for i in picks))
    return "\n".join(lines) + "\n"
