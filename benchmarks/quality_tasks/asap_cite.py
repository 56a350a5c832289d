"""Task 2 — ASAP/CITE PBMC proteins: CITE-seq batches c1, c2 as the reference, ASAP-seq c3, c4 as the query."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from quality_tasks.common import data_file
from quality_tasks.protein_transfer import run_task

FILE = "asap_cite_pbmc_adt216_4batches.h5ad"
LEVELS = ["coarse_cluster", "cluster"]


def run(out: Path, *, quick: bool = False) -> dict:
    adata = ad.read_h5ad(data_file(FILE))
    adata.obs["cluster"] = "cluster " + adata.obs["cluster"].astype(str)  # a name, not a number
    if quick:
        adata = adata[np.random.default_rng(0).random(adata.n_obs) < 0.2].copy()
    is_ref = adata.obs["batch"].astype(str).isin(["c1", "c2"]).to_numpy()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"cell_id": adata.obs_names, "batch": adata.obs["batch"].astype(str),
                  "split": np.where(is_ref, "reference", "query")}).to_csv(out / "split.csv", index=False)
    return run_task(out, title="Task 2 — ASAP/CITE PBMC proteins, CITE-seq → ASAP-seq", adata=adata,
                    is_ref=is_ref, levels=LEVELS, batch_key="batch", unlabeled=(),
                    epochs=1 if quick else 5, batch_size=64, run_scanvi=True,
                    split_note="batches c1, c2 (CITE-seq) → reference; c3, c4 (ASAP-seq) → query", quick=quick)
