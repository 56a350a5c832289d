"""The peers a user would otherwise pick, run in this process with the settings stated here.

* scANVI with scArches surgery (scvi-tools): scVI pre-trained on the reference with the
  architecture scArches recommends (``encode_covariates``, layer norm, no batch norm), scANVI
  from it per label level, then ``SCANVI.load_query_data`` + query-only training.
* totalVI with scArches surgery: reference with proteins, query with its proteins missing
  (all-zero, which totalVI treats as not measured), proteins imputed with the reference batch.
* CellTypist: a logistic-regression model trained on the reference (1e4 + log1p, all features),
  per label level, in its SGD mode (its default solver call fails on scikit-learn >= 1.8);
  ``majority_voting`` off (it over-clusters the query, which a per-cell comparison should not).
* Harmony (harmonypy) on the reference PCA, and scVI's latent space, for integration scores.

Epoch budgets are capped for a 2-core CPU (``Budget``); every table states them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

UNLABELED = "Unknown"  # scvi-tools' unlabelled category for scANVI


@dataclass(frozen=True)
class Budget:
    scvi_epochs: int = 100
    scanvi_epochs: int = 20
    query_epochs: int = 100
    totalvi_epochs: int = 100


def _quiet():
    import logging

    import scvi
    import torch

    # One thread: on a shared 2-core machine two torch threads oversubscribe it (scVI epochs ran
    # 10-25x slower in the MOp task); Concerto's Ray Train workers also use one thread each.
    torch.set_num_threads(1)
    scvi.settings.seed = 0
    scvi.settings.verbosity = logging.WARNING
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return scvi


def _train_kwargs() -> dict:
    return {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}


def _counts_adata(adata, labels: pd.Series | None, batch: np.ndarray, level: str | None):
    import anndata as ad

    out = ad.AnnData(X=adata.X.copy(), obs=pd.DataFrame(index=adata.obs_names.astype(str)), var=adata.var[[]].copy())
    out.obs["batch"] = pd.Categorical(np.asarray(batch).astype(str))
    if level is not None:
        out.obs[level] = labels.astype(str).to_numpy() if labels is not None else UNLABELED
    return out


def scanvi_surgery(reference, query, levels: list[str], *, ref_batch, query_batch,
                   unlabeled: tuple[str, ...] = (), budget: Budget = Budget()) -> dict:
    """Labels (hard and soft) for the query per level, the query latent, and timings."""
    scvi = _quiet()
    t0 = time.perf_counter()
    ref_labels = {lv: reference.obs[lv].astype(str).where(~reference.obs[lv].astype(str).isin(
        ("nan", "", *unlabeled)), UNLABELED) for lv in levels}
    ref = _counts_adata(reference, ref_labels[levels[0]], ref_batch, levels[0])
    for lv in levels[1:]:
        ref.obs[lv] = ref_labels[lv].to_numpy()
    scvi.model.SCVI.setup_anndata(ref, batch_key="batch")
    vae = scvi.model.SCVI(ref, n_latent=30, n_layers=2, encode_covariates=True, deeply_inject_covariates=False,
                          use_layer_norm="both", use_batch_norm="none")
    vae.train(max_epochs=budget.scvi_epochs, **_train_kwargs())
    fit_s, map_s = time.perf_counter() - t0, 0.0
    out = {"pred": {}, "confidence": {}, "latent": None}
    for lv in levels:
        t = time.perf_counter()
        lvae = scvi.model.SCANVI.from_scvi_model(vae, UNLABELED, labels_key=lv, adata=ref.copy())
        lvae.train(max_epochs=budget.scanvi_epochs, n_samples_per_label=100, **_train_kwargs())
        fit_s += time.perf_counter() - t
        t = time.perf_counter()
        q = _counts_adata(query, None, query_batch, lv)
        model = scvi.model.SCANVI.load_query_data(q, lvae)
        model.train(max_epochs=budget.query_epochs, plan_kwargs={"weight_decay": 0.0}, **_train_kwargs())
        soft = model.predict(soft=True)
        out["pred"][lv] = pd.Series(soft.idxmax(axis=1).to_numpy(), index=q.obs_names)
        out["confidence"][lv] = pd.Series(soft.max(axis=1).to_numpy(), index=q.obs_names)
        if out["latent"] is None:
            out["latent"] = model.get_latent_representation()
        map_s += time.perf_counter() - t
    out["fit_s"], out["map_s"] = fit_s, map_s
    return out


def totalvi_surgery(reference, query, protein_key: str, *, ref_batch, query_batch, budget: Budget = Budget()) -> dict:
    """Proteins imputed for an RNA-only query: ``{"protein": DataFrame (cells × proteins), ...}``."""
    scvi = _quiet()
    t0 = time.perf_counter()
    ref = _counts_adata(reference, None, ref_batch, None)
    ref.obsm["protein"] = reference.obsm[protein_key].copy()
    scvi.model.TOTALVI.setup_anndata(ref, batch_key="batch", protein_expression_obsm_key="protein")
    model = scvi.model.TOTALVI(ref, latent_distribution="normal", n_layers_decoder=2)
    model.train(max_epochs=budget.totalvi_epochs, **_train_kwargs())
    fit_s = time.perf_counter() - t0
    t = time.perf_counter()
    q = _counts_adata(query, None, query_batch, None)
    proteins = reference.obsm[protein_key]
    q.obsm["protein"] = pd.DataFrame(0.0, index=q.obs_names, columns=proteins.columns)
    qmodel = scvi.model.TOTALVI.load_query_data(q, model)
    qmodel.train(max_epochs=budget.query_epochs, plan_kwargs={"weight_decay": 0.0}, **_train_kwargs())
    ref_batches = sorted(set(np.asarray(ref_batch).astype(str)))
    _, protein = qmodel.get_normalized_expression(q, n_samples=25, return_mean=True, transform_batch=ref_batches)
    return {"protein": pd.DataFrame(np.asarray(protein), index=q.obs_names, columns=proteins.columns),
            "fit_s": fit_s, "map_s": time.perf_counter() - t}


def _log_normalised(adata):
    import anndata as ad

    from atlas.evaluate.baselines import _log_normalised as log_norm

    return ad.AnnData(X=log_norm(adata.X), obs=pd.DataFrame(index=adata.obs_names.astype(str)),
                      var=pd.DataFrame(index=adata.var_names.astype(str)))


def celltypist_transfer(reference, query, levels: list[str], *, unlabeled: tuple[str, ...] = ()) -> dict:
    """CellTypist models trained on the reference (one per level), applied to the query."""
    import celltypist

    ref, q = _log_normalised(reference), _log_normalised(query)
    out = {"pred": {}, "confidence": {}, "fit_s": 0.0, "map_s": 0.0}
    for lv in levels:
        labels = reference.obs[lv].astype(str)
        keep = ~labels.isin(("nan", "", *unlabeled)).to_numpy()
        t = time.perf_counter()
        # CellTypist 1.7.1's default (LogisticRegression(multi_class="ovr")) no longer runs on
        # scikit-learn >= 1.8, which removed that argument; its SGD mode is the same one-vs-rest
        # logistic regression (log loss), fitted by stochastic gradient descent.
        model = celltypist.train(ref[keep], labels=labels[keep].to_numpy(), n_jobs=2, feature_selection=False,
                                 check_expression=False, use_SGD=True, max_iter=1000)
        out["fit_s"] += time.perf_counter() - t
        t = time.perf_counter()
        result = celltypist.annotate(q, model=model, majority_voting=False)
        out["pred"][lv] = result.predicted_labels["predicted_labels"].astype(str).set_axis(q.obs_names)
        out["confidence"][lv] = result.probability_matrix.max(axis=1).set_axis(q.obs_names)
        out["map_s"] += time.perf_counter() - t
    return out


def harmony_embedding(pca: np.ndarray, batch) -> np.ndarray:
    import harmonypy

    meta = pd.DataFrame({"batch": np.asarray(batch).astype(str)})
    result = harmonypy.run_harmony(np.asarray(pca, dtype=np.float64), meta, ["batch"], random_state=0, verbose=False)
    z = np.asarray(result.Z_corr)
    return (z.T if z.shape[0] != len(meta) else z).astype(np.float32)


def scvi_embedding(adata, batch, *, epochs: int) -> tuple[np.ndarray, float]:
    scvi = _quiet()
    t = time.perf_counter()
    a = _counts_adata(adata, None, batch, None)
    scvi.model.SCVI.setup_anndata(a, batch_key="batch")
    model = scvi.model.SCVI(a, n_latent=30, n_layers=2)
    model.train(max_epochs=epochs, **_train_kwargs())
    return model.get_latent_representation().astype(np.float32), time.perf_counter() - t
