"""The MOp quality task's own arithmetic on real SNARE-seq cells (fast: no training, no Ray).

The task itself (``benchmarks/quality_tasks/mop.py``) takes minutes; these check the parts whose
mistakes would silently change its numbers: the ATAC Pearson scores, the PCA + kNN ATAC
baseline and the report's "loses by" lines.
"""

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from quality_tasks import mop  # noqa: E402

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def mop_cells(dataset):
    rna, atac = ad.read_h5ad(dataset(mop.RNA_FILE)), ad.read_h5ad(dataset(mop.ATAC_FILE))
    rows = np.sort(np.random.default_rng(0).choice(rna.n_obs, 600, replace=False))
    return rna[rows].copy(), atac[rows].copy()


def test_atac_scores_match_scipy_on_real_peaks(mop_cells):
    _, atac = mop_cells
    measured = mop.lognorm(atac.X[:200]).toarray().astype(np.float32)
    keep = np.flatnonzero((measured > 0).sum(0) >= 3)[:300]  # peaks open in a few cells
    measured = measured[:, keep]
    rng = np.random.default_rng(1)
    pred = measured + rng.normal(0, 0.5, measured.shape).astype(np.float32)
    pred[:, 0] = 1.0  # a peak predicted constant: r undefined → counted as 0
    var_ok = measured.var(0) > 0
    common = (measured > 0).mean(0) >= 0.05
    got = mop.atac_scores(pred, measured, var_ok, common)

    r_peak = np.array([0.0 if j == 0 else stats.pearsonr(pred[:, j], measured[:, j])[0]
                       for j in np.flatnonzero(var_ok)])
    assert got["peaks_scored"] == var_ok.sum() and got["peaks_predicted_constant"] == 1
    assert got["peak_r_mean"] == pytest.approx(r_peak.mean(), abs=1e-5)
    assert got["peak_r_median"] == pytest.approx(np.median(r_peak), abs=1e-5)
    assert got["common_peak_r_mean"] == pytest.approx(r_peak[common[var_ok]].mean(), abs=1e-5)
    r_cell = [stats.pearsonr(pred[i], measured[i])[0] for i in range(len(pred)) if measured[i].std() > 0]
    assert got["cell_r_mean"] == pytest.approx(np.mean(r_cell), abs=1e-5)


def test_pca_knn_atac_is_the_mean_of_the_nearest_reference_cells(mop_cells):
    from atlas.evaluate.baselines import PcaKnnBaseline

    rna, atac = mop_cells
    ref, query = np.arange(500), np.arange(500, 600)
    baseline = PcaKnnBaseline().fit(rna[ref], mop.LEVELS, unlabeled=())
    ref_atac = mop.lognorm(atac.X[ref])
    got = mop.pca_knn_atac(baseline, rna[query], ref_atac)

    a = baseline.reference_pca_ / np.linalg.norm(baseline.reference_pca_, axis=1, keepdims=True)
    q = baseline.transform(rna[query])
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    nearest = np.argsort(-(q @ a.T), axis=1)[:, : mop.K]
    expected = np.stack([np.asarray(ref_atac[row].mean(0)).ravel() for row in nearest])
    assert got.shape == (len(query), atac.n_vars)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_report_says_where_ours_loses_and_by_how_much():
    names = mop.INTEGRATION
    metrics = ["overall", "bio", "batch", "nmi", "ari", "silhouette_label", "isolated_labels", "clisi",
               "silhouette_batch", "ilisi", "kbet", "graph_connectivity", "pcr_comparison", "bras"]
    integration = {n: {m: 0.5 for m in metrics} for n in names}
    integration["Harmony"]["overall"] = 0.7
    integration["CVQVAE atlas"]["overall"] = 0.6
    atac = {n: {"peak_r_mean": 0.1, "peak_r_median": 0.1, "peak_r_q90": 0.2, "common_peak_r_mean": 0.2,
                "common_peak_r_median": 0.2, "common_peaks": 10, "peaks_scored": 100, "peaks_predicted_constant": 0,
                "cell_r_mean": 0.1, "cell_r_median": 0.1} for n in mop.ATAC_METHODS}
    atac["PCA + kNN"]["peak_r_mean"] = 0.15
    level = {"accuracy": 0.8, "macro_f1": 0.6}
    labels = {n: {lv: dict(level) for lv in mop.LEVELS} for n in mop.LABEL_METHODS}
    build = {"build_s": 1.0, "stages_s": {"train": 1.0}, "final_loss": 1.0, "curves": {"loss": [2.0, 1.0]}}
    result = {
        "split": {"reference": 80, "query": 20},
        "settings": {"quick": False, "workers": 1, "cvqvae_epochs": 2, "concerto_epochs": 1, "scvi_epochs": 3,
                     "scvi_default_epochs": 400},
        "integration": {"cell_type_coarse": integration}, "atac": atac, "labels": labels,
        "mixing": {n: {m: 0.4 for m in metrics} for n in [*mop.MIXING, "PCA (RNA) + LSI (ATAC)"]}, "seeds": [0],
        "builds": {n: build for n in mop.OURS},
        "timings": {"ingest_s": 1.0, "pca_s": 1.0, "harmony_s": 1.0, "scvi_s": 1.0, "scib_cell_type_coarse_s": 1.0,
                    "map_s": {"CVQVAE atlas": 1.0}, "pca_knn_fit_s": 1.0, "pca_knn_map_s": 1.0},
        "run": {"finished": "now", "wall_s": 1.0, "cpus": 2, "commit": "x", "load_average_start": [1, 1, 1],
                "load_average_end": [1, 1, 1]},
    }
    text = mop.markdown(result)
    assert "overall (cell_type_coarse), CVQVAE atlas: 0.600 — **loses** to Harmony by 0.100." in text
    assert "per-peak r mean, CVQVAE decoder: 0.100 — **loses** to PCA + kNN by 0.050." in text
    assert "VQ ablation (cell_type_coarse): CVQVAE − CVAE overall = +0.100" in text
    assert "- joint: CVQVAE − CVAE = +0.100 (larger sd 0.000; within 2 sd)" in text
    assert "## Modality mixing" in text and "self-reconstruction weight" in text
