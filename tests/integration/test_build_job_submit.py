"""A CVQVAE build submitted with ``ray job submit`` to a ``ray start --head`` of its own, then mapped."""

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import yaml

import atlas
from atlas.data.batches import normalize_log1p
from atlas.local_cluster import local_head, submit_job
from atlas.mapping import MappingError, map_query
from atlas.store.ingest import ingest
from tests.build_helpers import subset

pytestmark = [pytest.mark.real_data, pytest.mark.ray]

MOP_RNA, MOP_ATAC = "mop_snareseq_c1_rna.h5ad", "mop_snareseq_c1_atac.h5ad"
REPO = Path(__file__).resolve().parents[2]


def test_cvqvae_build_submitted_with_ray_job_submit(dataset, tmp_path):
    """`ray job submit` to a local `ray start --head` (token authentication on)."""
    full_rna, full_atac = ad.read_h5ad(dataset(MOP_RNA)), ad.read_h5ad(dataset(MOP_ATAC))
    rna = subset(full_rna, 2000)
    atac = full_atac[rna.obs_names].copy()
    rna_path, atac_path = tmp_path / "rna.h5ad", tmp_path / "atac.h5ad"
    rna.write_h5ad(rna_path)
    atac.write_h5ad(atac_path)
    store = tmp_path / "mop"
    ingest(store, rna_path, paired={"atac": atac_path}, dataset_id="mop", batch_key="Batch",
           label_keys={"cell_type_coarse": "cell_type_coarse", "cell_type_fine": "cell_type_fine"},
           species="mouse")
    config = {
        "name": "test-cvqvae", "store": str(store), "output": str(tmp_path / "artifact"),
        "model": {"model": "cvqvae", "modalities": ["RNA", "ATAC"], "view_components": 32,
                  "hidden": [64, 32], "codebook_size": 64},
        "data": {"batch_size": 128},
        "train": {"epochs": 1, "lr": 1e-3},
        "scaling": {"num_workers": 2, "use_gpu": False},
        "run": {"storage_path": str(tmp_path / "runs")},
        "index": {"levels": ["cell_type_coarse", "cell_type_fine"]},
    }
    config_path = tmp_path / "build.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with local_head(num_cpus=4, log=tmp_path / "head.log") as head:
        submit_job(head, REPO, ["python", "jobs/build_atlas.py", "--config", str(config_path)])
    built = atlas.load_atlas(tmp_path / "artifact")
    assert built.manifest["model"]["kind"] == "cvqvae"
    assert built.manifest["metrics"]["cells"] == 2000
    epoch = built.manifest["metrics"]["epochs"][0]
    assert epoch["perplexity_1"] > 1 and epoch["perplexity_2"] > 1  # codebook in use, not collapsed
    assert built.layout.root.level == "cell_type_coarse"
    assert built.species == "mouse"
    assert set(built.manifest["mapping"]["thresholds"]) == {"cell_type_coarse", "cell_type_fine"}

    # An RNA-only query of other cells: labels from the index, ATAC from the CVQVAE decoder.
    others = np.setdiff1d(np.arange(full_rna.n_obs), np.flatnonzero(full_rna.obs_names.isin(rna.obs_names)))
    query = full_rna[np.random.default_rng(1).choice(others, 100, replace=False)].copy()
    out = map_query(query, built, predict=["ATAC"], predict_method="decoder")
    atac_pred = out.obsm["ATAC_pred"]
    assert list(atac_pred.columns) == built.vocabulary["ATAC"] and np.isfinite(atac_pred.to_numpy()).all()
    measured = full_atac[query.obs_names]
    measured = sp.csr_matrix(measured.X, dtype=np.float32)
    measured.data = normalize_log1p(measured.indptr, measured.data)
    per_cell = [np.corrcoef(atac_pred.to_numpy()[i], measured[i].toarray().ravel())[0, 1] for i in range(100)]
    assert np.nanmean(per_cell) > 0.05  # the decoder's accessibility profile follows the measured one
    with pytest.raises(MappingError, match="stores no ATAC profiles"):
        map_query(query, built, predict=["ATAC"], predict_method="knn")
