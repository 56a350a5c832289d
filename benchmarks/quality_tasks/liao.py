"""Task 5 — liao2020 COVID-19 lung lavage, cross-patient: two patients' labelled cells → the third's.

Whole transcriptome (33,539 genes, the sparse index-value path), the authors' labels at two levels
(``cell_type_coarse`` ⊃ ``cell_type_fine``), labelled cells only (``annotated``). Reference:
patients C144 and C146 (the first two in sorted order); query: C149, mapped with its patient as
the query batch. ``benchmarks/validate_heads.py`` validates on the two reference patients only.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from quality_tasks.common import data_file
from quality_tasks.protein_transfer import run_task

FILE = "liao2020_covid_balf_3patients_rna_labelled.h5ad"
LEVELS = ["cell_type_coarse", "cell_type_fine"]


def run(out: Path, *, quick: bool = False) -> dict:
    adata = ad.read_h5ad(data_file(FILE))
    adata = adata[adata.obs["annotated"].astype(bool).to_numpy()].copy()
    patient = adata.obs["patient"].astype(str)
    patients = sorted(patient.unique())
    is_ref = patient.isin(patients[:2]).to_numpy()
    if quick:
        adata = adata[np.random.default_rng(0).random(adata.n_obs) < 0.3].copy()
        is_ref = adata.obs["patient"].astype(str).isin(patients[:2]).to_numpy()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"cell_id": adata.obs_names, "patient": adata.obs["patient"].astype(str),
                  "split": np.where(is_ref, "reference", "query")}).to_csv(out / "split.csv", index=False)
    return run_task(out, title="Task 5 — liao2020 lung lavage, cross-patient", adata=adata, is_ref=is_ref,
                    levels=LEVELS, batch_key="patient", unlabeled=(), epochs=1 if quick else 5, batch_size=64,
                    run_scanvi=True, modality="RNA",
                    split_note=(f"labelled cells of patients {patients[0]} and {patients[1]} → reference; "
                                f"patient {patients[2]} → query"), quick=quick)
