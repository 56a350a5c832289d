"""CVQVAE settings chosen on held-out libraries of MOp's *reference* (issue 12).

    python benchmarks/validate_cvqvae.py [--variants published,vq_dsbn,...] [--seeds 0,1,2] [--out DIR]

Only task 4's reference split is read (``default_rng(0).random(n) < 0.8``, as
``quality_tasks/mop.py``); its query is never touched. The reference's 12 libraries are split
once: 4 libraries (``VALIDATION_LIBRARIES``, drawn with ``default_rng(1)``) are held out, the
other 8 train. Every variant is trained in this process (``fit_local``, the project's modules,
one CPU thread) on the 8 training libraries and scored on the held-out libraries' cells, which no
model saw:

* **joint embedding, batch = library** — scIB (``atlas.evaluate.integration``) of the held-out
  cells' embeddings (the mean of z_RNA and z_ATAC, as built; also z_RNA alone and the two side
  by side), labels ``cell_type_coarse``; a model with
  per-domain normalisation embeds each held-out library with that library's own statistics
  (``with_query_domains``, the map-time adaptation a ``batch_key`` gives), the others as unseen;
* **modality mixing, batch = modality** (the paper's protocol) — the RNA-view and ATAC-view
  embeddings of every held-out cell stacked (2 × n rows), labels coarse; baseline: the PCA of the
  RNA and the LSI of the ATAC (each 16-d, fitted on the training libraries) stacked;
* **ATAC from RNA** — per-cell and per-peak Pearson r of the decoder's prediction (E_RNA →
  quantise → D_ATAC, 1e4 + log1p scale) against the measured ATAC, beside the training
  libraries' mean ATAC profile (no model); "decoder + mean" adds the prediction's deviation from
  the training cells' mean view to the mean profile (see the closing note of issue 12);
* **labels** — coarse kNN (k 25, cosine) from the training cells to the held-out cells, paired and RNA-only;
* the loss and codebook perplexity per epoch (the paper's plateau claim).

Mean ± sd over ``--seeds``. Results: ``OUT/results.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_tasks.common import data_file  # noqa: E402
from quality_tasks.mop import ATAC_FILE, BATCH_KEY, RNA_FILE, SPLIT_SEED, atac_scores  # noqa: E402

LABEL = "cell_type_coarse"
N_VALIDATION_LIBRARIES = 4
K = 25
LATENT_BASELINE = 16

#: name → (model config overrides, training settings). "published" is the model as issue 12
#: found it (the quality task's settings); the others change one thing at a time or several.
BASE_TRAIN = {"epochs": 50, "lr": 1e-3, "batch_size": 256, "by_domain": False}
VARIANTS: dict[str, tuple[dict, dict]] = {
    "published": ({}, {}),
    "no_vq": ({"quantize": False}, {}),
    "vq_dsbn_enc": ({"domain_norm": "encoders"}, {"by_domain": True}),
    "no_vq_dsbn_enc": ({"quantize": False, "domain_norm": "encoders"}, {"by_domain": True}),
    "vq_dsbn_all": ({"domain_norm": "all"}, {"by_domain": True}),
    "no_vq_dsbn_all": ({"quantize": False, "domain_norm": "all"}, {"by_domain": True}),
    "vq_self": ({"self_weight": 1.0}, {}),
    "no_vq_self": ({"quantize": False, "self_weight": 1.0}, {}),
    "vq_self_dsbn_enc": ({"self_weight": 1.0, "domain_norm": "encoders"}, {"by_domain": True}),
    "no_vq_self_dsbn_enc": ({"quantize": False, "self_weight": 1.0, "domain_norm": "encoders"}, {"by_domain": True}),
    "paper_budget": ({"hidden": (1024, 512, 256), "codebook_size": 2048, "view_components": 2500},
                     {"epochs": 200, "lr": 1e-4, "batch_size": 1024}),
    "paper_budget_no_vq": ({"hidden": (1024, 512, 256), "codebook_size": 2048, "view_components": 2500,
                            "quantize": False}, {"epochs": 200, "lr": 1e-4, "batch_size": 1024}),
}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_reference():
    """Task 4's reference cells: (rna CSR, atac CSR, labels, libraries)."""
    import anndata as ad

    rna, atac = ad.read_h5ad(data_file(RNA_FILE)), ad.read_h5ad(data_file(ATAC_FILE))
    if not (rna.obs_names == atac.obs_names).all():
        raise SystemExit(f"{RNA_FILE} and {ATAC_FILE} do not hold the same cells in the same order")
    is_ref = np.random.default_rng(SPLIT_SEED).random(rna.n_obs) < 0.8
    rows = np.flatnonzero(is_ref)
    return (sp.csr_matrix(rna.X[rows]).astype(np.float32), sp.csr_matrix(atac.X[rows]).astype(np.float32),
            rna.obs[LABEL].astype(str).to_numpy()[rows], rna.obs[BATCH_KEY].astype(str).to_numpy()[rows])


def validation_libraries(libraries: np.ndarray) -> list[str]:
    names = sorted(set(libraries))
    pick = np.random.default_rng(1).choice(len(names), N_VALIDATION_LIBRARIES, replace=False)
    return sorted(names[i] for i in pick)


def knn_labels(ref: np.ndarray, ref_labels: np.ndarray, query: np.ndarray, k: int = K) -> np.ndarray:
    import faiss

    r = np.ascontiguousarray(ref, dtype=np.float32).copy()
    q = np.ascontiguousarray(query, dtype=np.float32).copy()
    faiss.normalize_L2(r)
    faiss.normalize_L2(q)
    index = faiss.IndexFlatIP(r.shape[1])
    index.add(r)
    _, nn_rows = index.search(q, k)
    votes = ref_labels[nn_rows]
    return np.array([pd.Series(v).value_counts().index[0] for v in votes])


def label_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    from sklearn.metrics import f1_score

    return {"acc": float((pred == truth).mean()), "f1": float(f1_score(truth, pred, average="macro"))}


def baseline_views(r_fit, a_fit, r_val, a_val):
    """16-d PCA of RNA and LSI of ATAC fitted on the training libraries (modality-mixing floor)."""
    from atlas.data.batches import csr_to_batch
    from atlas.models.views import LSIView, PCAView

    pca, lsi = PCAView(r_fit.shape[1], LATENT_BASELINE).fit(r_fit), LSIView(a_fit.shape[1], LATENT_BASELINE).fit(a_fit)
    b = csr_to_batch({"RNA": r_val, "ATAC": a_val})
    with torch.no_grad():
        x_rna = pca(b["RNA_ids"], b["RNA_values"], b["RNA_mask"]).numpy()
        x_atac = lsi(b["ATAC_ids"], b["ATAC_values"], b["ATAC_mask"]).numpy()
    return x_rna, x_atac


def train_variant(name: str, seed: int, data: dict, epochs: int | None = None,
                  checkpoint: Path | None = None) -> dict:
    from atlas.models import CVQVAEConfig, build_model
    from atlas.models.recalibrate import has_domain_normalisation, with_query_domains
    from atlas.train.step import fit_local, minibatches

    overrides, train_over = VARIANTS[name]
    train = {**BASE_TRAIN, **train_over, **({"epochs": epochs} if epochs else {})}
    torch.manual_seed(seed)
    np.random.seed(seed)
    config = CVQVAEConfig(modalities=("RNA", "ATAC"), **overrides)
    model = build_model(config, {"RNA": data["r_fit"].shape[1], "ATAC": data["a_fit"].shape[1]},
                        n_domains=data["n_fit_domains"])
    t = time.perf_counter()
    model.fit_views({"RNA": data["r_fit"], "ATAC": data["a_fit"]}, seed=seed)
    views_s = time.perf_counter() - t
    fit_batch = data["fit_batch"]
    bs = train["batch_size"]
    by_domain = train["by_domain"]
    per_epoch = len(minibatches(fit_batch, bs, seed=0, by_domain=by_domain))
    history = fit_local(model, lambda e: minibatches(fit_batch, bs, seed=seed * 1000 + e, by_domain=by_domain),
                        epochs=train["epochs"], lr=train["lr"], steps_per_epoch=per_epoch,
                        checkpoint=checkpoint, log=lambda e, m: say(f"  epoch {e + 1}/{train['epochs']}: loss "
                                                                       f"{m['loss']:.4f}"))
    # Training time over every session the run took (the checkpoint carries the earlier ones).
    train_s = views_s + history.seconds
    model.eval()
    val_batch = data["val_batch"]
    n_val = val_batch["domain"].shape[0]
    codes = data["val_domain"]  # 0..3 per held-out library

    def embed_with(m, domain: torch.Tensor, modality: str | None = None, rna_only: bool = False) -> np.ndarray:
        b = {**val_batch, "domain": domain}
        if rna_only:
            b = {k: v for k, v in b.items() if not k.startswith("ATAC")}
        if modality is not None:
            return m.encode(b, modality).detach().numpy()
        return m.embed(b).numpy()

    unseen = torch.full((n_val,), -1, dtype=torch.long)
    adapted, domain = model, unseen
    if has_domain_normalisation(model, "all"):
        def record(copy, offset):
            with torch.no_grad():
                copy.embed({**val_batch, "domain": torch.as_tensor(codes + offset)})
        adapted, offset = with_query_domains(model, int(codes.max()) + 1, record, layers="input")
        domain = torch.as_tensor(codes + offset)
    with torch.no_grad():
        z_val = embed_with(adapted, domain)
        z_rna = embed_with(adapted, domain, "RNA")
        z_atac = embed_with(adapted, domain, "ATAC")
        z_val_rna_only = embed_with(adapted, domain, rna_only=True)
        z_fit = model.embed(fit_batch).numpy()
        pred = adapted.predict_other({**val_batch, "domain": domain}, "RNA")
    out = {"variant": name, "seed": seed, "train_s": train_s,
           "loss": [float(e["loss"]) for e in history.epochs],
           "recon": [float(e["recon_1to2"] + e["recon_2to1"]) for e in history.epochs],
           "perplexity": [float(e.get("perplexity_1", 0.0)) for e in history.epochs]}
    from atlas.evaluate.integration import integration_scores

    out["joint"] = integration_scores(z_val, data["l_val"], data["b_val"], data["pre_val"])
    # Which of a paired cell's latents to embed it by (METHODS: "the two views can be averaged").
    out["joint_rna"] = integration_scores(z_rna, data["l_val"], data["b_val"], data["pre_val"])
    out["joint_concat"] = integration_scores(np.hstack([z_rna, z_atac]), data["l_val"], data["b_val"], data["pre_val"])
    stacked = np.vstack([z_rna, z_atac])
    out["mixing"] = integration_scores(stacked, np.concatenate([data["l_val"]] * 2),
                                       np.repeat(["RNA", "ATAC"], n_val), data["pre_mix"])
    # ATAC prediction from RNA.
    view = adapted.views["ATAC"]
    pred_feat = pred["features"].numpy()
    with torch.no_grad():
        fit_view = view.target(fit_batch["ATAC_ids"], fit_batch["ATAC_values"], fit_batch["ATAC_mask"]).mean(0)
        delta = view.inverse(pred["view"]) - view.inverse(fit_view[None, :])
    plus_mean = np.clip(data["atac_mean"][None, :] + delta.numpy(), 0, None)
    out["atac_decoder"] = atac_scores(pred_feat, data["atac_val"], data["var_ok"], data["common"])
    out["atac_decoder_plus_mean"] = atac_scores(plus_mean, data["atac_val"], data["var_ok"], data["common"])
    out["labels_paired"] = label_scores(knn_labels(z_fit, data["l_fit"], z_val), data["l_val"])
    out["labels_rna_only"] = label_scores(knn_labels(z_fit, data["l_fit"], z_val_rna_only), data["l_val"])
    return out


def prepare() -> dict:
    from atlas.data.batches import csr_to_batch
    from atlas.evaluate.integration import pre_integration_pca
    from atlas.models.views import lognorm_counts

    r, a, labels, libraries = load_reference()
    held = validation_libraries(libraries)
    is_val = np.isin(libraries, held)
    fit_libs = sorted(set(libraries[~is_val]))
    code = {lib: i for i, lib in enumerate(fit_libs)}
    fit_rows, val_rows = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    say(f"reference {len(labels):,} cells; training libraries {fit_libs} ({len(fit_rows):,} cells); "
        f"held out {held} ({len(val_rows):,} cells)")
    fit_domain = np.array([code[lib] for lib in libraries[fit_rows]])
    val_code = {lib: i for i, lib in enumerate(held)}
    val_domain = np.array([val_code[lib] for lib in libraries[val_rows]])
    fit_batch = csr_to_batch({"RNA": r[fit_rows], "ATAC": a[fit_rows]}, domain=fit_domain)
    val_batch = csr_to_batch({"RNA": r[val_rows], "ATAC": a[val_rows]}, domain=np.full(len(val_rows), -1))
    rna_val_norm = lognorm_counts(r[val_rows]).toarray()
    atac_fit_norm = lognorm_counts(a[fit_rows])
    atac_val = lognorm_counts(a[val_rows]).toarray().astype(np.float32)
    x_rna, x_atac = baseline_views(r[fit_rows], a[fit_rows], r[val_rows], a[val_rows])
    pre_val = pre_integration_pca(rna_val_norm)
    # Modality mixing's "unintegrated" input: the two views stacked (as the baseline row).
    pre_mix = np.vstack([x_rna, x_atac])
    return {
        "r_fit": r[fit_rows], "a_fit": a[fit_rows], "fit_batch": fit_batch, "val_batch": val_batch,
        "n_fit_domains": len(fit_libs), "val_domain": val_domain,
        "l_fit": labels[fit_rows], "l_val": labels[val_rows], "b_val": libraries[val_rows],
        "pre_val": pre_val, "pre_mix": pre_mix, "baseline_rna": x_rna, "baseline_atac": x_atac,
        "atac_val": atac_val, "atac_mean": np.asarray(atac_fit_norm.mean(0)).ravel().astype(np.float32),
        "var_ok": atac_val.var(0) > 0, "common": (atac_val > 0).mean(0) >= 0.05,
        "fit_libraries": fit_libs, "held_out": held,
    }


def baselines(data: dict) -> dict:
    from atlas.evaluate.integration import integration_scores
    from atlas.models.views import PCAView

    n_val = len(data["l_val"])
    out = {"mixing": integration_scores(data["pre_mix"], np.concatenate([data["l_val"]] * 2),
                                        np.repeat(["RNA", "ATAC"], n_val), data["pre_mix"])}
    out["joint_pca"] = integration_scores(data["pre_val"], data["l_val"], data["b_val"], data["pre_val"])
    pca = PCAView(data["r_fit"].shape[1], 50).fit(data["r_fit"])
    with torch.no_grad():
        fb = data["fit_batch"]
        z_fit = pca(fb["RNA_ids"], fb["RNA_values"], fb["RNA_mask"]).numpy()
        v = data["val_batch"]
        z_val = pca(v["RNA_ids"], v["RNA_values"], v["RNA_mask"]).numpy()
    out["labels_pca_knn"] = label_scores(knn_labels(z_fit, data["l_fit"], z_val), data["l_val"])
    out["atac_reference_mean"] = atac_scores(np.repeat(data["atac_mean"][None, :], n_val, 0), data["atac_val"],
                                             data["var_ok"], data["common"])
    return out


def _ms(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def markdown(results: list[dict], base: dict, data: dict) -> str:
    by = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    lines = ["# CVQVAE on held-out MOp reference libraries", "",
             f"Training libraries {data['fit_libraries']}; held out {data['held_out']} "
             f"({len(data['l_val']):,} cells). Mean ± sd over seeds.", "",
             "| variant | seeds | joint overall | joint bio | joint batch | mixing overall | mixing batch | "
             "ATAC cell r (decoder) | ATAC cell r (decoder + mean) | ATAC peak r (decoder + mean) | "
             "labels acc paired | labels acc RNA-only | final loss | perplexity | train s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, rs in by.items():
        lines.append(
            f"| {name} | {len(rs)} | {_ms([r['joint']['overall'] for r in rs])} | {_ms([r['joint']['bio'] for r in rs])} | "
            f"{_ms([r['joint']['batch'] for r in rs])} | {_ms([r['mixing']['overall'] for r in rs])} | "
            f"{_ms([r['mixing']['batch'] for r in rs])} | {_ms([r['atac_decoder']['cell_r_mean'] for r in rs])} | "
            f"{_ms([r['atac_decoder_plus_mean']['cell_r_mean'] for r in rs])} | "
            f"{_ms([r['atac_decoder_plus_mean']['peak_r_mean'] for r in rs])} | "
            f"{_ms([r['labels_paired']['acc'] for r in rs])} | {_ms([r['labels_rna_only']['acc'] for r in rs])} | "
            f"{_ms([r['loss'][-1] for r in rs])} | {_ms([r['perplexity'][-1] for r in rs])} | "
            f"{_ms([r['train_s'] for r in rs])} |")
    lines += ["", "The joint embedding by which latent embeds a paired cell (overall / bio / batch):", "",
              "| variant | mean of z_RNA and z_ATAC (built) | z_RNA alone | z_RNA and z_ATAC side by side |",
              "| --- | ---: | ---: | ---: |"]
    for name, rs in by.items():
        if all("joint_rna" in r for r in rs):
            lines.append(f"| {name} | " + " | ".join(
                " / ".join(_ms([r[key][m] for r in rs]) for m in ("overall", "bio", "batch"))
                for key in ("joint", "joint_rna", "joint_concat")) + " |")
    lines += ["", "Baselines (no model): modality mixing of PCA(RNA) + LSI(ATAC) stacked, overall "
              f"{base['mixing']['overall']:.3f} (batch {base['mixing']['batch']:.3f}); joint: PCA 50 of RNA overall "
              f"{base['joint_pca']['overall']:.3f}; PCA 50 + kNN labels acc {base['labels_pca_knn']['acc']:.3f}; "
              f"ATAC reference mean cell r {base['atac_reference_mean']['cell_r_mean']:.3f}, "
              f"peak r {base['atac_reference_mean']['peak_r_mean']:.3f}.", "",
              "Loss per epoch (first seed; epochs 1, 10, 25, 50%, last):"]
    for name, rs in by.items():
        loss = rs[0]["loss"]
        picks = sorted({0, min(9, len(loss) - 1), min(24, len(loss) - 1), len(loss) // 2, len(loss) - 1})
        lines.append(f"- {name}: " + ", ".join(f"{i + 1}: {loss[i]:.4f}" for i in picks))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="published,no_vq,vq_dsbn_enc,no_vq_dsbn_enc")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="benchmarks/out/validate_cvqvae")
    parser.add_argument("--epochs", type=int, default=None,
                        help="train every chosen variant this many epochs (a budget that fits the machine; the "
                             "run is recorded as VARIANT@Nep)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare()
    cached = out / "baselines.json"
    base = json.loads(cached.read_text()) if cached.exists() else baselines(data)
    cached.write_text(json.dumps(base))
    say(f"baselines: mixing {base['mixing']['overall']:.3f}, joint PCA {base['joint_pca']['overall']:.3f}, "
        f"PCA+kNN {base['labels_pca_knn']['acc']:.3f}, ATAC mean cell r {base['atac_reference_mean']['cell_r_mean']:.3f}")
    results = []
    done = out / "runs.jsonl"
    if done.exists():
        results = [json.loads(line) for line in done.read_text().splitlines() if line.strip()]
    for variant in args.variants.split(","):
        name = f"{variant}@{args.epochs}ep" if args.epochs else variant
        for seed in [int(s) for s in args.seeds.split(",")]:
            if any(r["variant"] == name and r["seed"] == seed for r in results):
                continue
            say(f"{name} seed {seed}")
            # Each epoch's state is kept, so a stopped run (hours at the paper's budget) resumes.
            ckpt = out / "checkpoints" / f"{name}_seed{seed}.pt"
            r = {**train_variant(variant, seed, data, epochs=args.epochs, checkpoint=ckpt), "variant": name}
            ckpt.unlink(missing_ok=True)
            say(f"  joint {r['joint']['overall']:.3f} (bio {r['joint']['bio']:.3f}, batch {r['joint']['batch']:.3f}); "
                f"mixing {r['mixing']['overall']:.3f}; ATAC cell r {r['atac_decoder']['cell_r_mean']:.3f} / "
                f"+mean {r['atac_decoder_plus_mean']['cell_r_mean']:.3f}; labels {r['labels_paired']['acc']:.3f} / "
                f"RNA-only {r['labels_rna_only']['acc']:.3f}; {r['train_s']:.0f} s")
            results.append(r)
            with done.open("a") as f:
                f.write(json.dumps(r) + "\n")
            (out / "results.md").write_text(markdown(results, base, data))
    (out / "results.json").write_text(json.dumps({"baselines": base, "runs": results}, indent=1))
    (out / "results.md").write_text(markdown(results, base, data))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
