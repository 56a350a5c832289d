"""Task 3 — the 422k-cell ADTnorm protein atlas (13 studies, 9 antibodies), three whole studies held out."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from quality_tasks.common import data_file
from quality_tasks.protein_transfer import run_task

FILE = "adtnorm_13studies_adt9_422k.h5ad"
LEVELS = ["cell_type_l1", "cell_type_l2"]
HELD_OUT = 3
SEED = 0


def run(out: Path, *, quick: bool = False) -> dict:
    adata = ad.read_h5ad(data_file(FILE))
    studies = sorted(adata.obs["study_name"].astype(str).unique())
    held_out = sorted(np.random.default_rng(SEED).choice(studies, HELD_OUT, replace=False).tolist())
    if quick:
        adata = adata[np.random.default_rng(0).random(adata.n_obs) < 0.02].copy()
    study = adata.obs["study_name"].astype(str)
    is_ref = ~study.isin(held_out).to_numpy()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"cell_id": adata.obs_names, "study_name": study,
                  "split": np.where(is_ref, "reference", "query")}).to_csv(out / "split.csv", index=False)
    return run_task(out, title="Task 3 — ADTnorm 13-study protein atlas, 3 studies held out", adata=adata,
                    is_ref=is_ref, levels=LEVELS, batch_key="batch", unlabeled=("undefined",),
                    epochs=1 if quick else 2, batch_size=256, run_scanvi=False,
                    split_note=(f"whole studies {', '.join(held_out)} (drawn with default_rng({SEED}) from the "
                                f"{len(studies)} sorted study names) → query; the other {len(studies) - HELD_OUT} → "
                                "reference"), quick=quick)
