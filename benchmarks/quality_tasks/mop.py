"""Task 4 — MOp SNARE-seq RNA + ATAC (mouse motor cortex, 10,309 cells, 12 libraries).

1. **Split** — ``default_rng(0).random(n) < 0.8`` over cells: 80% reference, 20% query
   (``split.csv``). Everything below is fitted on reference cells only; the query is used for
   scoring, never for choosing settings.
2. **Integration** (scIB metrics, :func:`atlas.evaluate.integration.integration_table`) of the
   *reference* cells' embeddings, labels ``cell_type_coarse`` (and ``cell_type_fine``), batch
   ``Batch``; pre-integration = PCA 50 (arpack) of the reference's 1e4 + log1p RNA. Methods:
   the CVQVAE atlas (RNA + ATAC), its no-VQ ablation ("CVAE", ``quantize: false``, same settings),
   a Concerto RNA + ATAC atlas and a Concerto RNA-only atlas (all four built with
   ``build_atlas`` on Ray Train from one store holding the reference's RNA and ATAC; embedding =
   the one each build writes back to the store, i.e. the atlas's reference embedding), PCA 50 of
   the log-normalised RNA (= the unintegrated input), Harmony on that PCA, and scVI's latent.
3. **ATAC from RNA** for the RNA-only query: the CVQVAE decoder vs the mean ATAC of the 25
   nearest reference cells (``map_query(predict=["ATAC"], predict_method="both")``), the CVAE
   decoder, kNN from the Concerto RNA-only atlas (ATAC profiles in its index), PCA 50 + kNN
   (25 nearest reference cells by cosine on the reference PCA of the RNA, mean of their ATAC),
   and the reference's mean ATAC profile (no model: a floor). Every prediction is on the
   1e4 + log1p scale the atlas stores and decodes ATAC on, and the measured query ATAC is
   normalised the same way.
4. **Label transfer** of the RNA-only query (coarse, fine): the CVQVAE, CVAE and Concerto
   RNA-only atlases (``map_query``, the default k = 25 / 25 hierarchical, no rejection) vs PCA + kNN.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from atlas.mapping.params import K_FINE
from atlas.names import decoder_key, profile_key
from quality_tasks import peers
from quality_tasks.common import (
    data_file,
    fmt,
    from_mapped,
    run_info,
    say,
    score_labels,
    start_ray,
    table,
    write_results,
)

RNA_FILE, ATAC_FILE = "mop_snareseq_c1_rna.h5ad", "mop_snareseq_c1_atac.h5ad"
LEVELS = ["cell_type_coarse", "cell_type_fine"]
BATCH_KEY = "Batch"
SPLIT_SEED = 0
K = 25  # kNN for labels (level 1) and for ATAC profiles: the atlas's k_coarse
QUICK_CELLS = 2000
COMMON_PEAK = 0.05  # a peak open in at least this fraction of query cells is "common"

OURS = ["CVQVAE atlas", "CVAE (no VQ)", "Concerto RNA+ATAC", "Concerto RNA"]
SEEDS = (0, 1, 2)
MIXING = ["CVQVAE atlas", "CVAE (no VQ)", "Concerto RNA+ATAC"]


def task_seeds(quick: bool) -> tuple[int, ...]:
    """Training seeds of the CVQVAE / CVAE builds (quick: two, so the seed path is exercised)."""
    return SEEDS[:2] if quick else SEEDS


def seed_name(name: str, seed: int) -> str:
    """The build of ``name`` with another training seed (seed 0 is ``name`` itself)."""
    return name if seed == 0 else f"{name} · seed {seed}"
INTEGRATION = [*OURS, "PCA (unintegrated)", "Harmony", "scVI"]
ATAC_METHODS = ["CVQVAE decoder", "CVQVAE atlas kNN", "CVAE decoder", "Concerto RNA atlas kNN", "PCA + kNN",
                "reference mean (no model)"]
LABEL_METHODS = ["CVQVAE atlas", "CVAE (no VQ)", "Concerto RNA", "PCA + kNN"]


# -- settings ----------------------------------------------------------------------------------------


def settings(quick: bool, workers: int) -> dict:
    """The build configs (everything but store/output paths) and the peers' budgets.

    CVQVAE: the model defaults (PCA/LSI views of 128 components, MLP 512-256-128, latent 16,
    codebook 512, λ = 1/1/10, β 0.25), batch 256, lr 1e-3 with the method's cosine schedule;
    the ablation differs only in ``quantize: false``. Concerto: the demo's settings (batch 64,
    single-domain minibatches for domain-specific BatchNorm, lr 1e-3, 5 epochs: the top of the
    paper's 3–5).
    """
    from atlas.train.config import default_epochs

    cvq_epochs = 2 if quick else default_epochs("cvqvae")
    concerto_epochs = 1 if quick else 5
    levels = {"levels": LEVELS}
    cvqvae = {
        "model": {"model": "cvqvae", "modalities": ["RNA", "ATAC"]},
        "train": {"epochs": cvq_epochs, "checkpoint_every": 10_000, "seed": 0},
        "scaling": {"num_workers": workers, "use_gpu": False},
    }
    concerto = {
        "data": {"batch_size": 64, "single_domain": True},
        "train": {"epochs": concerto_epochs, "lr": 1e-3, "checkpoint_every": 10_000, "seed": 0},
        "scaling": {"num_workers": workers, "use_gpu": False},
    }
    builds = {
        "CVQVAE atlas": {**cvqvae, "index": {**levels, "profiles": ["ATAC"]}},
        "CVAE (no VQ)": {**cvqvae, "model": {**cvqvae["model"], "quantize": False}, "index": levels},
        "Concerto RNA+ATAC": {**concerto, "model": {"model": "concerto", "modalities": ["RNA", "ATAC"]},
                              "index": levels},
        "Concerto RNA": {**concerto, "model": {"model": "concerto", "modalities": ["RNA"]},
                         "index": {**levels, "profiles": ["ATAC"]}},
    }
    # The VQ ablation over seeds: the same two builds again with other seeds (integration only).
    for seed in task_seeds(quick)[1:]:
        for name in ("CVQVAE atlas", "CVAE (no VQ)"):
            base = builds[name]
            builds[seed_name(name, seed)] = {**base, "train": {**base["train"], "seed": seed}, "index": levels}
    return {"builds": builds, "cvqvae_epochs": cvq_epochs, "concerto_epochs": concerto_epochs,
            "workers": workers, "quick": quick}


def scvi_default_epochs(n_cells: int) -> int:
    """scvi-tools' own default, ``min(round(20000 / n · 400), 400)`` (400 below 20,000 cells)."""
    from scvi.model._utils import get_max_epochs_heuristic

    return int(get_max_epochs_heuristic(n_cells))


# -- data ----------------------------------------------------------------------------------------------


def load_split(out: Path, quick: bool):
    """``(rna, atac, is_reference)``: the same cells in the same order; ``split.csv`` written."""
    import anndata as ad

    rna, atac = ad.read_h5ad(data_file(RNA_FILE)), ad.read_h5ad(data_file(ATAC_FILE))
    if not (rna.obs_names == atac.obs_names).all():
        raise SystemExit(f"{RNA_FILE} and {ATAC_FILE} do not hold the same cells in the same order")
    if quick:
        rows = np.sort(np.random.default_rng(1).choice(rna.n_obs, QUICK_CELLS, replace=False))
        rna, atac = rna[rows].copy(), atac[rows].copy()
    is_ref = np.random.default_rng(SPLIT_SEED).random(rna.n_obs) < 0.8
    pd.DataFrame({
        "cell_id": rna.obs_names.astype(str),
        "split": np.where(is_ref, "reference", "query"),
        BATCH_KEY: rna.obs[BATCH_KEY].astype(str).to_numpy(),
        **{lv: rna.obs[lv].astype(str).to_numpy() for lv in LEVELS},
    }).to_csv(out / "split.csv", index=False)
    return rna, atac, is_ref


def lognorm(x):
    """1e4 + log1p per cell (CSR), the atlas's normalisation of RNA and ATAC."""
    from atlas.models.views import lognorm_counts

    return lognorm_counts(x)


# -- our atlases -----------------------------------------------------------------------------------


def build_all(out: Path, ref_rna, ref_atac, cfg: dict) -> dict:
    """Ingest the reference (RNA + paired ATAC) once, then build every atlas from that store."""
    import shutil

    from atlas.build import build_atlas
    from atlas.store.ingest import ingest
    from atlas.train.config import build_config_from_dict

    store = out / "stores" / "reference"
    shutil.rmtree(store, ignore_errors=True)
    t = time.perf_counter()
    summary = ingest(store, ref_rna, paired={"atac": ref_atac}, dataset_id="mop", batch_key=BATCH_KEY,
                     label_keys={lv: lv for lv in LEVELS}, species="mouse")
    ingest_s = time.perf_counter() - t
    print(f"   ingested {summary.cells_ingested:,} cells ({summary.cells_per_measurement}) in {ingest_s:.1f} s",
          flush=True)
    builds = {"store": str(store), "ingest_s": ingest_s}
    for i, (name, config) in enumerate(cfg["builds"].items()):
        slug = f"b{i}_" + "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
        artifact, runs = out / "artifacts" / slug, out / "runs" / slug
        for path in (artifact, runs):
            shutil.rmtree(path, ignore_errors=True)
        full = {"name": slug, "store": str(store), "output": str(artifact), "run": {"storage_path": str(runs)},
                **config}
        say(f"build {name}: {config['model']} · {config['train']['epochs']} epochs · "
            f"{config['scaling']['num_workers']} Ray Train worker(s)")
        t = time.perf_counter()
        built = build_atlas(build_config_from_dict(full), log=lambda m: print(f"   {m}", flush=True))
        builds[name] = {"artifact": str(artifact), "embedding": f"atlas_{slug}", "build_s": time.perf_counter() - t,
                        "stages_s": built.seconds, "final_loss": built.final_loss, "config": full}
    return builds


def reference_embedding(store: str, name: str, cell_ids: pd.Index) -> np.ndarray:
    """The embedding a build wrote back to the store (``RNA.obsm[name]``), in ``cell_ids`` order."""
    from atlas.data.reader import open_experiment
    from atlas.store.embeddings import read_embedding
    from atlas.store.versions import current_version

    uri = current_version(store).uri
    joinids, values, _ = read_embedding(uri, "RNA", name)
    obs = open_experiment(uri).obs.read(column_names=["soma_joinid", "cell_id"]).concat().to_pandas()
    ids = obs.set_index("soma_joinid").loc[joinids, "cell_id"].astype(str).to_numpy()
    frame = pd.DataFrame(values, index=ids)
    missing = cell_ids.difference(frame.index)
    if len(missing):
        raise RuntimeError(f"{name}: {len(missing)} reference cells have no embedding (e.g. {missing[0]})")
    return frame.loc[cell_ids].to_numpy(np.float32)


def modality_embeddings(artifact: str, ref_rna, ref_atac) -> dict[str, np.ndarray]:
    """Each reference cell's embedding from its RNA alone and from its ATAC alone, through the
    mapping path (alignment to the atlas vocabulary, the build's normalisation, the frozen model),
    every library normalised with its own statistics in every layer: the statistics the build's
    recalibration gave the reference (nothing changes for a model without per-domain layers)."""
    import scipy.sparse as sp

    from atlas import load_atlas
    from atlas.mapping.embedding import embed_prepared, max_features_of
    from atlas.mapping.query import prepare_query

    atlas = load_atlas(artifact)
    query = ref_rna.copy()
    query.obs = query.obs[[]]
    query.obsm["ATAC"] = pd.DataFrame.sparse.from_spmatrix(
        sp.csr_matrix(ref_atac.X, dtype=np.float32), index=query.obs_names, columns=ref_atac.var_names.astype(str))
    aligned, _, _ = prepare_query(query, atlas)
    codes = pd.Categorical(ref_rna.obs[BATCH_KEY].astype(str)).codes.astype(np.int64)
    model = atlas.model("cpu")
    out = {}
    for m in ("RNA", "ATAC"):
        alone = {k: (v if k == m else sp.csr_matrix(v.shape, dtype=np.float32)) for k, v in aligned.items()}
        out[m], _ = embed_prepared(alone, model, max_features=max_features_of(atlas.manifest), domains=codes,
                                   layers="all")
    return out


def raw_views(ref_rna, ref_atac, dim: int = 16) -> np.ndarray:
    """The modality-mixing baseline: PCA of the RNA and LSI of the ATAC (``dim`` each, the
    latent width) of the reference cells, stacked — two unrelated spaces, i.e. no alignment."""
    import scipy.sparse as sp
    import torch

    from atlas.data.batches import csr_to_batch
    from atlas.models.views import LSIView, PCAView

    r, a = sp.csr_matrix(ref_rna.X, dtype=np.float32), sp.csr_matrix(ref_atac.X, dtype=np.float32)
    b = csr_to_batch({"RNA": r, "ATAC": a})
    with torch.no_grad():
        x_rna = PCAView(r.shape[1], dim).fit(r)(b["RNA_ids"], b["RNA_values"], b["RNA_mask"]).numpy()
        x_atac = LSIView(a.shape[1], dim).fit(a)(b["ATAC_ids"], b["ATAC_values"], b["ATAC_mask"]).numpy()
    return np.vstack([x_rna, x_atac]).astype(np.float32)


def epoch_curves(artifact: str) -> dict:
    """Loss (and CVQVAE perplexity) per epoch from the artifact manifest: a training diagnostic."""
    from atlas.artifact import read_manifest

    epochs = read_manifest(artifact)["metrics"]["epochs"]
    out = {"loss": [round(float(e["loss"]), 4) for e in epochs]}
    for key in ("perplexity_1", "perplexity_2"):
        if epochs and key in epochs[0]:
            out[key] = [round(float(e[key]), 1) for e in epochs]
    return out


# -- scoring ATAC --------------------------------------------------------------------------------------


def atac_scores(pred: np.ndarray, measured: np.ndarray, var_ok: np.ndarray, common: np.ndarray) -> dict:
    """Per-peak Pearson r across query cells (peaks with nonzero measured variance; a peak the
    method predicts constant has undefined r and counts as 0) and per-cell Pearson r across peaks."""
    pred = np.asarray(pred, dtype=np.float32)
    if not np.isfinite(pred).all():
        bad = ~np.isfinite(pred).all(axis=1)
        raise RuntimeError(f"{int(bad.sum())} query cells have a non-finite ATAC prediction")
    x, y = pred[:, var_ok], measured[:, var_ok]
    dx, dy = x - x.mean(0), y - y.mean(0)
    num = (dx * dy).sum(0, dtype=np.float64)
    den = np.sqrt((dx * dx).sum(0, dtype=np.float64) * (dy * dy).sum(0, dtype=np.float64))
    constant = den == 0
    r_peak = np.where(constant, 0.0, num / np.where(constant, 1.0, den))
    r_common = r_peak[common[var_ok]]
    del dx, dy, x, y
    px, py = pred - pred.mean(1, keepdims=True), measured - measured.mean(1, keepdims=True)
    num = (px * py).sum(1, dtype=np.float64)
    den = np.sqrt((px * px).sum(1, dtype=np.float64) * (py * py).sum(1, dtype=np.float64))
    r_cell = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return {"peak_r_mean": float(r_peak.mean()), "peak_r_median": float(np.median(r_peak)),
            "peak_r_q90": float(np.quantile(r_peak, 0.9)), "peaks_scored": int(var_ok.sum()),
            "peaks_predicted_constant": int(constant.sum()),
            "common_peak_r_mean": float(r_common.mean()) if r_common.size else float("nan"),
            "common_peak_r_median": float(np.median(r_common)) if r_common.size else float("nan"),
            "common_peaks": int(r_common.size),
            "cell_r_mean": float(np.nanmean(r_cell)) if np.isfinite(r_cell).any() else float("nan"),
            "cell_r_median": float(np.nanmedian(r_cell)) if np.isfinite(r_cell).any() else float("nan")}


def pca_knn_atac(baseline, query_rna, ref_atac_norm) -> np.ndarray:
    """Mean normalised ATAC of the K nearest reference cells (cosine on the baseline's reference PCA)."""
    import faiss

    from atlas.mapping.vote import mean_profile

    ref = np.array(baseline.reference_pca_, dtype=np.float32, order="C")
    q = np.array(baseline.transform(query_rna), dtype=np.float32, order="C")
    faiss.normalize_L2(ref)
    faiss.normalize_L2(q)
    index = faiss.IndexFlatIP(ref.shape[1])
    index.add(ref)
    _, rows = index.search(q, K)
    return np.asarray(mean_profile(ref_atac_norm, rows), dtype=np.float32)


def as_dense(frame) -> np.ndarray:
    return frame.to_numpy(np.float32) if hasattr(frame, "to_numpy") else np.asarray(frame, np.float32)


# -- the task ----------------------------------------------------------------------------------------


def run(out: Path, *, quick: bool = False, workers: int = 1, scvi_epochs: int = 100,
        fine_integration: bool = True) -> dict:
    """Run the task; ``out`` receives split.csv, results.md, results.json and the stores/atlases.

    ``workers``: Ray Train workers per build. 1 by default: with 2, a CVQVAE build aborts (gloo
    "collective mismatch") when the workers get unequal numbers of minibatches, because the
    codebook's EMA ``all_reduce`` runs inside ``forward`` and DDP's ``join()`` only shadows the
    gradient all-reduces; and on a 2-core machine one worker avoids DDP overhead.
    ``scvi_epochs``: scVI's budget (scvi-tools' default would be 400 for this many cells).
    Torch and BLAS run one thread in this process (the builds' workers do too): on a shared
    2-core machine two threads per process oversubscribe the cores (scVI measured ~10x slower).
    """
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            return _run(out, quick=quick, workers=workers, scvi_epochs=scvi_epochs,
                        fine_integration=fine_integration)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, *, quick: bool, workers: int, scvi_epochs: int, fine_integration: bool) -> dict:
    started, load_start = time.perf_counter(), os.getloadavg()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = settings(quick, workers)
    timings: dict[str, float] = {}

    say(f"split {RNA_FILE} + {ATAC_FILE} 80/20 (seed {SPLIT_SEED}{', quick: 2,000-cell subsample' if quick else ''})")
    rna, atac, is_ref = load_split(out, quick)
    ref_rna, ref_atac = rna[is_ref].copy(), atac[is_ref].copy()
    query_full = rna[~is_ref].copy()
    query = query_full.copy()
    query.obs = query.obs[[]]  # an RNA-only query: counts and cell ids, nothing else
    truth = query_full.obs[LEVELS].astype(str).copy()
    truth.index = truth.index.astype(str)
    ref_ids = pd.Index(ref_rna.obs_names.astype(str))
    ref_batch = ref_rna.obs[BATCH_KEY].astype(str).to_numpy()
    print(f"   reference {ref_rna.n_obs:,} cells, query {query.n_obs:,} cells", flush=True)

    # -- embeddings that need no Ray -------------------------------------------------------------
    from atlas.evaluate.integration import integration_table, pre_integration_pca

    say("PCA 50 of the reference's log-normalised RNA (pre-integration and the unintegrated method)")
    t = time.perf_counter()
    ref_rna_norm = lognorm(ref_rna.X).toarray()
    pca = pre_integration_pca(ref_rna_norm, 50).astype(np.float32)
    timings["pca_s"] = time.perf_counter() - t
    embeddings: dict[str, np.ndarray] = {}

    # -- our atlases -----------------------------------------------------------------------------
    import ray

    t = time.perf_counter()
    start_ray(workers)
    timings["ray_start_s"] = time.perf_counter() - t
    try:
        builds = build_all(out, ref_rna, ref_atac, cfg)
    finally:
        ray.shutdown()
    built = [n for n in cfg["builds"]]
    for name in built:
        embeddings[name] = reference_embedding(builds["store"], builds[name]["embedding"], ref_ids)
        builds[name]["curves"] = epoch_curves(builds[name]["artifact"])
        print(f"   {name}: built in {builds[name]['build_s']:.1f} s, curves {builds[name]['curves']}", flush=True)
    embeddings["PCA (unintegrated)"] = pca

    say("modality mixing (the paper's protocol): RNA-view and ATAC-view embeddings of every reference cell stacked")
    per_modality = {n: modality_embeddings(builds[n]["artifact"], ref_rna, ref_atac)
                    for n in built if n in MIXING or any(n.startswith(m + " · seed") for m in MIXING)}
    stacked = {n: np.vstack([v["RNA"], v["ATAC"]]) for n, v in per_modality.items()}
    stacked["PCA (RNA) + LSI (ATAC)"] = raw_views(ref_rna, ref_atac)

    say("Harmony on the PCA (batch = Batch)")
    t = time.perf_counter()
    embeddings["Harmony"] = peers.harmony_embedding(pca, ref_batch)
    timings["harmony_s"] = time.perf_counter() - t

    n_scvi = 3 if quick else scvi_epochs
    say(f"scVI latent (batch = Batch, {n_scvi} epochs; scvi-tools' default {scvi_default_epochs(ref_rna.n_obs)})")
    embeddings["scVI"], timings["scvi_s"] = peers.scvi_embedding(ref_rna, ref_batch, epochs=n_scvi)

    # -- integration scores ----------------------------------------------------------------------
    integration = {}
    for level in LEVELS if fine_integration else LEVELS[:1]:
        say(f"scIB integration scores, labels {level}")
        t = time.perf_counter()
        names = INTEGRATION + [n for n in built if n not in INTEGRATION] if level == LEVELS[0] else INTEGRATION
        frame = integration_table({n: embeddings[n] for n in names}, ref_rna.obs[level].astype(str).to_numpy(),
                                  ref_batch, pca)
        timings[f"scib_{level}_s"] = time.perf_counter() - t
        integration[level] = {n: {k: float(v) for k, v in row.items()} for n, row in frame.iterrows()}
        print(frame.round(3).to_string(), flush=True)
    say(f"scIB of the stacked modality embeddings, labels {LEVELS[0]}, batch = modality")
    t = time.perf_counter()
    coarse = ref_rna.obs[LEVELS[0]].astype(str).to_numpy()
    frame = integration_table(stacked, np.concatenate([coarse, coarse]), np.repeat(["RNA", "ATAC"], ref_rna.n_obs),
                              stacked["PCA (RNA) + LSI (ATAC)"])
    timings["scib_mixing_s"] = time.perf_counter() - t
    mixing = {n: {k: float(v) for k, v in row.items()} for n, row in frame.iterrows()}
    print(frame.round(3).to_string(), flush=True)

    # -- mapping the RNA-only query: labels and ATAC ---------------------------------------------
    from atlas import load_atlas
    from atlas.evaluate.baselines import PcaKnnBaseline
    from atlas.mapping.query import map_query

    say("map the RNA-only query: ATAC prediction and label transfer")
    mapped, map_s = {}, {}
    plans = {"CVQVAE atlas": "both", "CVAE (no VQ)": "decoder", "Concerto RNA": "knn"}
    for name, method in plans.items():
        atlas = load_atlas(builds[name]["artifact"])
        t = time.perf_counter()
        mapped[name] = map_query(query, atlas, levels=LEVELS, predict=["ATAC"], predict_method=method,
                                 k_coarse=K, k_fine=K_FINE, thresholds=None)
        map_s[name] = time.perf_counter() - t
        print(f"   {name}: map_query ({method}) {map_s[name]:.1f} s", flush=True)
    t = time.perf_counter()
    baseline = PcaKnnBaseline().fit(ref_rna, LEVELS, unlabeled=())
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    base = baseline.map(query)
    ref_atac_norm = lognorm(ref_atac.X)
    atac_preds = {
        "CVQVAE decoder": as_dense(mapped["CVQVAE atlas"].obsm[decoder_key("ATAC")]),
        "CVQVAE atlas kNN": as_dense(mapped["CVQVAE atlas"].obsm[profile_key("ATAC")]),
        "CVAE decoder": as_dense(mapped["CVAE (no VQ)"].obsm[profile_key("ATAC")]),
        "Concerto RNA atlas kNN": as_dense(mapped["Concerto RNA"].obsm[profile_key("ATAC")]),
        "PCA + kNN": pca_knn_atac(baseline, query, ref_atac_norm),
    }
    base_map_s = time.perf_counter() - t
    mean_profile = np.asarray(ref_atac_norm.mean(0), dtype=np.float32).ravel()
    atac_preds["reference mean (no model)"] = np.broadcast_to(mean_profile, (query.n_obs, mean_profile.size))

    peaks = [str(p) for p in atac.var_names]
    for name in ("CVQVAE atlas", "CVAE (no VQ)", "Concerto RNA"):
        key = decoder_key("ATAC") if name == "CVQVAE atlas" else profile_key("ATAC")
        columns = [str(c) for c in mapped[name].obsm[key].columns]
        if columns != peaks:
            raise RuntimeError(f"{name}: predicted ATAC columns are not the file's peaks in its order")
    measured = lognorm(atac[~is_ref].X).toarray().astype(np.float32)
    var_ok = measured.var(0) > 0
    common = (measured > 0).mean(0) >= COMMON_PEAK
    say(f"score ATAC: {int(var_ok.sum()):,} of {len(peaks):,} peaks vary across the {query.n_obs:,} query cells")
    atac_result = {}
    for name in ATAC_METHODS:
        atac_result[name] = atac_scores(atac_preds[name], measured, var_ok, common)
        print(f"   {name}: {atac_result[name]}", flush=True)
    del atac_preds, measured

    labels = {}
    for name in ("CVQVAE atlas", "CVAE (no VQ)", "Concerto RNA"):
        labels[name] = score_labels(from_mapped(mapped[name], LEVELS), truth, LEVELS, ())
        labels[name]["map_s"] = map_s[name]
    labels["PCA + kNN"] = score_labels(from_mapped(base, LEVELS), truth, LEVELS, ())
    labels["PCA + kNN"].update(fit_s=fit_s, map_s=base_map_s)

    result = {
        "task": "mop",
        "split": {"seed": SPLIT_SEED, "rule": "default_rng(0).random(n) < 0.8 → reference",
                  "reference": int(ref_rna.n_obs), "query": int(query.n_obs), "file": str(out / "split.csv"),
                  "subsample": QUICK_CELLS if quick else None},
        "settings": {"workers": workers, "cvqvae_epochs": cfg["cvqvae_epochs"],
                     "concerto_epochs": cfg["concerto_epochs"], "scvi_epochs": n_scvi,
                     "scvi_default_epochs": scvi_default_epochs(ref_rna.n_obs), "torch_threads": 1,
                     "blas_threads": 1, "k_coarse": K, "k_fine": K_FINE,
                     "thresholds": None, "quick": quick,
                     "builds": {n: {k: v for k, v in c.items() if k in ("model", "data", "train", "scaling", "index")}
                                for n, c in cfg["builds"].items()}},
        "integration": integration,
        "mixing": mixing,
        "seeds": list(task_seeds(quick)),
        "atac": atac_result,
        "labels": labels,
        "builds": {n: {k: builds[n][k] for k in ("build_s", "stages_s", "final_loss", "curves")} for n in built},
        "timings": {**timings, "ingest_s": builds["ingest_s"], "map_s": map_s, "pca_knn_fit_s": fit_s,
                    "pca_knn_map_s": base_map_s},
        "run": run_info(started, load_start),
    }
    write_results(out, result, markdown(result))
    return result


# -- report ----------------------------------------------------------------------------------------------


def _verdict(values: dict[str, float | None], ours: list[str], what: str, *, all_winners: bool = True) -> list[str]:
    """One line per method of ours: best, or who beats it and by how much (higher = better);
    ``all_winners=False`` names only the best method."""
    known = {n: v for n, v in values.items() if v is not None and np.isfinite(v)}
    if not known:
        return []
    top_name = max(known, key=known.get)
    lines = []
    for name in ours:
        if name not in known:
            continue
        v = known[name]
        if name == top_name:
            second = max((x for n, x in known.items() if n != name), default=None)
            margin = f" (ahead by {v - second:.3f})" if second is not None else ""
            lines.append(f"- {what}, {name}: {fmt(v)} — best{margin}.")
        else:
            better = sorted(((x, n) for n, x in known.items() if x > v), reverse=True)
            if not better:
                lines.append(f"- {what}, {name}: {fmt(v)} — tied for best.")
                continue
            if not all_winners:
                better = better[:1]
            who = ", ".join(f"{n} by {x - v:.3f}" for x, n in better)
            if not all_winners and len([1 for x in known.values() if x > v]) > 1:
                who = f"the best, {who} ({len([1 for x in known.values() if x > v])} methods ahead)"
            lines.append(f"- {what}, {name}: {fmt(v)} — **loses** to {who}.")
    return lines


def _sampled(values: list) -> str:
    """``1: v, 5: v, 10: v, …, last: v`` (epochs 1-based) for a per-epoch curve."""
    n = len(values)
    picks = sorted({0, n - 1, *[e - 1 for e in (5, 10, 20, 30, 40, 60, 80, 100) if e <= n]})
    return ", ".join(f"{i + 1}: {values[i]}" for i in picks) if n else "—"


def summary(r: dict) -> list[str]:
    """The headline comparisons, ours against the best alternative, with signed margins."""
    out = []
    others = [n for n in INTEGRATION if n not in OURS]
    for level, rows in r["integration"].items():
        overall = {n: rows[n]["overall"] for n in rows}
        ours = max(OURS, key=overall.get)
        peer = max(others, key=overall.get)
        d = overall[ours] - overall[peer]
        pca = overall["PCA (unintegrated)"]
        line = (f"- Integration ({level}): our best is {ours} (overall {fmt(overall[ours])}); the best other method "
                f"is {peer} ({fmt(overall[peer])}): "
                + (f"ours **loses by {-d:.3f}**" if d < 0 else f"ours wins by {d:.3f}"))
        if pca > overall[ours]:
            line += f", and also loses to the unintegrated PCA ({fmt(pca)}) by {pca - overall[ours]:.3f}"
        vq = overall["CVQVAE atlas"] - overall["CVAE (no VQ)"]
        out.append(line + f". CVQVAE − CVAE (VQ ablation): {vq:+.3f} (paper: +0.150).")
    a = r["atac"]
    dec, knn = a["CVQVAE decoder"], a["PCA + kNN"]
    out.append(f"- ATAC from RNA, per-peak r mean: CVQVAE decoder {fmt(dec['peak_r_mean'])} vs PCA + kNN "
               f"{fmt(knn['peak_r_mean'])} ({dec['peak_r_mean'] - knn['peak_r_mean']:+.3f}), CVQVAE atlas kNN "
               f"{fmt(a['CVQVAE atlas kNN']['peak_r_mean'])}. Every method's r is small: single-cell ATAC here has "
               "~100 open peaks per cell of 25,734.")
    floor = "reference mean (no model)"
    best = max((n for n in a if n != floor), key=lambda n: a[n]["cell_r_mean"])
    gap = a[floor]["cell_r_mean"] - a[best]["cell_r_mean"]
    out.append(f"- ATAC per-cell r: the best method ({best}, {fmt(a[best]['cell_r_mean'])}) "
               + (f"**loses to the reference's mean profile** ({fmt(a[floor]['cell_r_mean'])}, by {gap:.3f}): no "
                  "method's cell-specific prediction beats each peak's average accessibility on this measure."
                  if gap > 0 else f"beats the reference's mean profile ({fmt(a[floor]['cell_r_mean'])})."))
    lab = r["labels"]
    for lv in LEVELS:
        base = lab["PCA + kNN"][lv]["accuracy"]
        mine = ("CVQVAE atlas", "Concerto RNA")
        parts = [f"{n} {fmt(lab[n][lv]['accuracy'])} ({lab[n][lv]['accuracy'] - base:+.3f})" for n in mine]
        lose = all(lab[n][lv]["accuracy"] < base for n in mine)
        out.append(f"- Label transfer to the RNA-only query, {lv} accuracy vs PCA + kNN ({fmt(base)}): "
                   + ", ".join(parts) + (": **both of ours lose**." if lose else "."))
    return out


def cvqvae_defaults() -> str:
    """``atlas build``'s CVQVAE settings in words (what the task's CVQVAE builds leave out)."""
    from atlas.data.dataset import StreamConfig
    from atlas.models import CVQVAEConfig
    from atlas.train.config import TrainConfig, default_single_domain

    c, d, t = CVQVAEConfig(), StreamConfig(), TrainConfig()
    single = "single-library" if default_single_domain(c) else "mixed"
    return (f"batch {d.batch_size} {single} minibatches, lr {t.lr:g} with a cosine schedule, PCA/LSI views of "
            f"{c.view_components} components (first LSI component dropped), MLP {'-'.join(map(str, c.hidden))}, "
            f"latent {c.latent_dim}, codebook {c.codebook_size}, EMA {c.decay}, β {c.beta}, "
            f"λ {'/'.join(f'{x:g}' for x in c.lambdas)}, self-reconstruction weight {c.self_weight:g}, "
            f"per-library normalisation: {c.domain_norm}")


def _mean_sd(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else fmt(float(v.mean()))


def mixing_and_seeds(r: dict) -> list[str]:
    """The paper's modality-mixing protocol and the VQ ablation over training seeds."""
    from atlas.evaluate.integration import BATCH, BIO

    mix, seeds = r["mixing"], r["seeds"]
    level = LEVELS[0]
    joint = r["integration"][level]
    metrics = ["overall", "bio", "batch", *BIO, *BATCH]
    lines = [f"## Modality mixing (the paper's protocol): RNA-view and ATAC-view embeddings stacked, batch = modality, "
             f"labels `{level}`", "",
             *table([[n, *[mix[n][m] for m in metrics]] for n in mix], ["embedding", *metrics]), "",
             "Each reference cell twice: once embedded from its RNA alone, once from its ATAC alone (its library's "
             "own normalisation statistics); the baseline stacks the PCA of the RNA and the LSI of the ATAC (16-d "
             "each), two unrelated spaces. `pcr_comparison` is against that baseline.", "",
             f"## The VQ ablation over training seeds {', '.join(map(str, seeds))} (mean ± sd; labels `{level}`)", ""]
    rows = []
    for name in ("CVQVAE atlas", "CVAE (no VQ)"):
        names = [seed_name(name, sd) for sd in seeds]
        rows.append([name, _mean_sd([joint[n]["overall"] for n in names if n in joint]),
                     _mean_sd([joint[n]["bio"] for n in names if n in joint]),
                     _mean_sd([joint[n]["batch"] for n in names if n in joint]),
                     _mean_sd([mix[n]["overall"] for n in names if n in mix]),
                     _mean_sd([mix[n]["batch"] for n in names if n in mix])])
    lines += table(rows, ["model", "joint overall", "joint bio", "joint batch", "mixing overall", "mixing batch"])
    diffs = {}
    for protocol, source in (("joint", joint), ("mixing", mix)):
        a = np.array([source[seed_name("CVQVAE atlas", sd)]["overall"] for sd in seeds
                      if seed_name("CVQVAE atlas", sd) in source])
        b = np.array([source[seed_name("CVAE (no VQ)", sd)]["overall"] for sd in seeds
                      if seed_name("CVAE (no VQ)", sd) in source])
        if len(a) and len(b):
            sd = max(a.std(ddof=1) if len(a) > 1 else 0.0, b.std(ddof=1) if len(b) > 1 else 0.0)
            diffs[protocol] = (a.mean() - b.mean(), sd)
    lines += [""] + [f"- {p}: CVQVAE − CVAE = {d:+.3f} (larger sd {sd:.3f}; " +
                     ("more than 2 sd" if sd and abs(d) > 2 * sd else "within 2 sd") + ")" for p, (d, sd) in diffs.items()]
    return lines + [""]


def markdown(r: dict) -> str:
    from atlas.evaluate.integration import BATCH, BIO, EXTRA

    s, sp_ = r["settings"], r["split"]
    lines = [f"# Task 4 — MOp SNARE-seq RNA + ATAC ({sp_['reference']:,} reference / {sp_['query']:,} query cells"
             f"{', QUICK: 2,000-cell subsample, tiny epochs — not a result' if s['quick'] else ''})", ""]
    lines += ["Split: `default_rng(0).random(n) < 0.8` over cells → reference (written to `split.csv`). Every "
              "model and baseline is fitted on the reference cells only; nothing was tuned on the query.", ""]
    lines += ["## Summary", "", *summary(r), ""]

    metrics = ["overall", "bio", "batch", *BIO, *BATCH, *EXTRA]
    for level, rows in r["integration"].items():
        lines += [f"## Integration of the reference cells (scIB metrics; labels `{level}`, batch `{BATCH_KEY}`)", "",
                  *table([[n, *[rows[n][m] for m in metrics]] for n in INTEGRATION if n in rows],
                         ["method", *metrics]), ""]
        lines += _verdict({n: rows[n]["overall"] for n in rows}, OURS, f"overall ({level})")
        lines += _verdict({n: rows[n]["bio"] for n in rows}, OURS, f"bio ({level})", all_winners=False)
        lines += _verdict({n: rows[n]["batch"] for n in rows}, OURS, f"batch ({level})", all_winners=False)
        cvq, cvae = rows.get("CVQVAE atlas"), rows.get("CVAE (no VQ)")
        if cvq and cvae:
            d = cvq["overall"] - cvae["overall"]
            lines.append(f"- VQ ablation ({level}): CVQVAE − CVAE overall = {d:+.3f} (paper, NeurIPS 2021 multiome: "
                         "0.840 vs 0.690, +0.150)" + ("; **the ablation does not reproduce here**." if d <= 0 else "."))
        lines += [""]
    lines += ["overall = 0.6 · bio + 0.4 · batch, group means of the ten scIB metrics without min–max scaling "
              "across methods (`atlas.evaluate.integration`); `bras` is reported but not averaged. "
              "The pre-integration PCA (for `pcr_comparison`) is the same PCA 50 as the unintegrated row, so that "
              "row's `pcr_comparison` is 0 by construction. CVQVAE/CVAE embedding = mean of the RNA and ATAC "
              "encoders' pre-quantisation latents (16-d); Concerto RNA+ATAC = the sum of the two modality outputs "
              "(128-d); Concerto RNA = the RNA teacher (128-d). Label `Mis` (1,119 cells in the full file) is kept as "
              "a class, as the study annotated it.", ""]

    lines += mixing_and_seeds(r)

    a = r["atac"]
    any_atac = next(iter(a.values()))
    lines += [f"## ATAC from RNA on the {sp_['query']:,} RNA-only query cells", "",
              *table([[n, a[n]["peak_r_mean"], a[n]["peak_r_median"], a[n]["peak_r_q90"], a[n]["common_peak_r_mean"],
                       a[n]["cell_r_mean"], a[n]["cell_r_median"], str(a[n]["peaks_predicted_constant"])]
                      for n in ATAC_METHODS if n in a],
                     ["method", "per-peak r mean", "per-peak r median", "per-peak r 90th pct",
                      f"per-peak r mean, {any_atac['common_peaks']:,} common peaks", "per-cell r mean",
                      "per-cell r median", "peaks predicted constant"]), "",
              f"Per-peak r: Pearson r across query cells for each of the {any_atac['peaks_scored']:,} peaks that vary "
              "in the measured query (a peak a method predicts constant has no r and counts as 0). Per-cell r: "
              f"Pearson r across all peaks for each query cell. Common peaks: open in ≥ {COMMON_PEAK:.0%} of the "
              "query cells (where a per-cell signal exists at all: a query cell has ~100 open peaks of 25,734). "
              "Scale: the decoders (LSI inverse) and the kNN means both give 1e4 + log1p values (the batches' "
              "scale), so the measured query ATAC is normalised the same "
              f"way (library size 1e4, log1p). kNN = unweighted mean of the {K} nearest reference cells; PCA + kNN: "
              "cosine on PCA 50 of the scaled reference RNA (`PcaKnnBaseline`'s projection). "
              "The reference mean is one profile for every cell: its per-peak r is undefined (0 here), "
              "its per-cell r is what peak-wise mean accessibility alone gives (no cell-specific information).", ""]
    lines += _verdict({n: a[n]["peak_r_mean"] for n in a}, ["CVQVAE decoder", "CVQVAE atlas kNN",
                                                               "Concerto RNA atlas kNN"], "per-peak r mean")
    lines += _verdict({n: a[n]["common_peak_r_mean"] for n in a}, ["CVQVAE decoder", "CVQVAE atlas kNN",
                                                                      "Concerto RNA atlas kNN"], "common-peak r mean")
    lines += _verdict({n: a[n]["cell_r_mean"] for n in a}, ["CVQVAE decoder", "CVQVAE atlas kNN",
                                                               "Concerto RNA atlas kNN"], "per-cell r mean")
    lines += [""]

    lab = r["labels"]
    rows = []
    for lv in LEVELS:
        for metric in ("accuracy", "macro_f1"):
            rows.append([f"{lv} {metric}", *[lab[n][lv][metric] for n in LABEL_METHODS]])
    lines += [f"## Label transfer to the RNA-only query (k = {K} coarse, k = 5 within the predicted coarse group, "
              "no rejection)", "", *table(rows, ["metric", *LABEL_METHODS]), ""]
    for lv in LEVELS:
        for metric in ("accuracy", "macro_f1"):
            lines += _verdict({n: lab[n][lv][metric] for n in LABEL_METHODS}, ["CVQVAE atlas", "Concerto RNA"],
                              f"{lv} {metric}")
    lines += ["", "A CVQVAE query cell is embedded by the RNA encoder alone, while its reference cells are the mean of "
              "the RNA and ATAC encoders: the label transfer tests how well the two latents are aligned.", ""]

    b, t = r["builds"], r["timings"]
    lines += ["## Settings and timings", ""]
    lines += [f"- Ray Train workers: {s['workers']} per build (local in-process Ray); one store holds the reference's "
              f"RNA + ATAC (ingest {t['ingest_s']:.1f} s) and every build reads it. One worker: on 2 cores a second "
              "worker competes with the first for the same cores (README, training), and all four builds use the "
              "same setting so the comparison is like for like. (A 2-worker CVQVAE build used to abort in gloo when "
              "the workers got unequal numbers of minibatches; fixed in atlas/train/loop.py, the codebook's "
              "collectives stay local in the uneven tail.) Torch and BLAS: 1 thread per process (2 threads per "
              "process on this shared 2-core machine oversubscribed it: scVI ran ~10x slower).",
              f"- CVQVAE and CVAE: {s['cvqvae_epochs']} epochs and `atlas build`'s CVQVAE defaults "
              f"({cvqvae_defaults()}); the CVAE differs only in `quantize: false`. The paper trains 200 epochs "
              "of batch 1,024 on 40k cells (~8k steps); here ~32 steps per epoch.",
              f"- Concerto (both): {s['concerto_epochs']} epochs, batch 64 single-domain minibatches "
              "(domain BN over the 12 libraries), lr 1e-3 with polynomial decay, embed 128, dropout 0.1.",
              f"- scVI: {s['scvi_epochs']} epochs, 30 latent, 2 layers, batch = Batch, counts of all 1,677 genes. "
              f"scvi-tools' default `min(round(20000 / n · 400), 400)` is {s.get('scvi_default_epochs', 'n/a')} for "
              f"{sp_['reference']:,} cells (it is 400 for any n below 20,000, not ~97); {s['scvi_epochs']} epochs "
              f"({'quick mode' if s['quick'] else 'the budget of task 1, to keep this task near 25 min'}), "
              "so scVI runs with "
              f"{s['scvi_epochs'] / max(s.get('scvi_default_epochs') or 1, 1):.0%} of its default epochs and may be "
              "understated.",
              "- Harmony: harmonypy on the PCA 50, batch = Batch, seed 0.", ""]
    rows = [[n, b[n]["build_s"], b[n]["stages_s"].get("train"), b[n]["stages_s"].get("embed"),
             b[n]["stages_s"].get("index"), b[n]["final_loss"]] for n in OURS]
    lines += table(rows, ["build", "total (s)", "train (s)", "embed (s)", "index (s)", "final loss"])
    lines += [""]
    for n in OURS:
        c = b[n]["curves"]
        extra = (f"; codebook perplexity (codes in use, of 512) RNA {_sampled(c['perplexity_1'])} / ATAC "
                 f"{_sampled(c['perplexity_2'])}"
                 if "perplexity_1" in c and any(c["perplexity_1"]) else "")
        lines.append(f"- {n}: loss at epochs {_sampled(c['loss'])}{extra}")
    lines += ["", f"Other timings (s): PCA {t['pca_s']:.1f}, Harmony {t['harmony_s']:.1f}, scVI {t['scvi_s']:.1f}, "
              + ", ".join(f"scIB {k[5:-2]} {v:.1f}" for k, v in t.items() if k.startswith("scib_"))
              + ", map_query " + ", ".join(f"{n} {v:.1f}" for n, v in t["map_s"].items())
              + f", PCA + kNN fit {t['pca_knn_fit_s']:.1f} / map {t['pca_knn_map_s']:.1f}.", ""]
    run = r["run"]
    lines.append(f"Run {run['finished']}, {run['wall_s']:.0f} s wall on {run['cpus']} CPU cores, "
                 f"commit {run['commit']}, "
                 f"load average (1/5/15 min) {', '.join(f'{x:.1f}' for x in run['load_average_start'])} at start → "
                 f"{', '.join(f'{x:.1f}' for x in run['load_average_end'])} at end (a shared machine: times are "
                 "indicative).")
    return "\n".join(lines) + "\n"
