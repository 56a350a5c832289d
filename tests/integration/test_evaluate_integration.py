"""scIB integration scores on real cells (NeurIPS 2021 BMMC CITE-seq subset, 2 batches).

The scores come from scib-metrics' own functions; these tests check that our neighbour graph
and argument order reproduce :class:`scib_metrics.benchmark.Benchmarker` metric by metric, and
that the aggregates move the right way for embeddings whose structure is known.
"""

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

from atlas.errors import AtlasError
from atlas.evaluate.integration import BATCH, BIO, aggregate, integration_scores, pre_integration_pca

pytestmark = pytest.mark.real_data
BMMC = "neurips21_bmmc_cite_starter_rna_with_adt.h5ad"


@pytest.fixture(scope="module")
def bmmc(dataset):
    """The cells of the nine types with at least 20 cells (396 of 600, both batches). scib-metrics
    compiles its per-type silhouette and kBET for every subset size: the 41 types of the whole set
    cost ~40 s of JAX compilation here without testing anything more."""
    adata = ad.read_h5ad(dataset(BMMC))
    counts = adata.obs["cell_type"].value_counts()
    adata = adata[adata.obs["cell_type"].isin(counts.index[counts >= 20]).to_numpy()].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    pre = pre_integration_pca(adata.X.toarray())
    return adata, pre


def test_scores_equal_scib_metrics_benchmarker(bmmc):
    from scib_metrics.benchmark import Benchmarker

    adata, pre = bmmc
    rng = np.random.default_rng(0)
    embedding = (pre[:, :20] + rng.normal(scale=0.5, size=(adata.n_obs, 20))).astype(np.float32)
    ours = integration_scores(embedding, adata.obs["cell_type"], adata.obs["batch"], pre)

    adata = adata.copy()
    adata.obsm["pre"], adata.obsm["emb"] = pre, embedding
    bench = Benchmarker(adata, batch_key="batch", label_key="cell_type", embedding_obsm_keys=["emb"],
                        pre_integrated_embedding_obsm_key="pre", progress_bar=False)
    bench.benchmark()
    theirs = bench._results["emb"]
    names = {"nmi": "nmi_ari_cluster_labels_kmeans_nmi", "ari": "nmi_ari_cluster_labels_kmeans_ari",
             "silhouette_label": "silhouette_label", "isolated_labels": "isolated_labels", "clisi": "clisi_knn",
             "ilisi": "ilisi_knn", "kbet": "kbet_per_label", "graph_connectivity": "graph_connectivity",
             "pcr_comparison": "pcr_comparison", "bras": "bras"}
    for ours_name, their_name in names.items():
        assert ours[ours_name] == pytest.approx(float(theirs[their_name]), abs=1e-6), ours_name
    assert 0.0 <= ours["silhouette_batch"] <= 1.0


def test_label_structure_raises_bio_and_batch_offsets_lower_batch_scores(bmmc):
    adata, pre = bmmc
    labels, batch = adata.obs["cell_type"].astype(str).to_numpy(), adata.obs["batch"].astype(str).to_numpy()
    rng = np.random.default_rng(1)
    codes = {name: rng.normal(scale=4.0, size=16) for name in np.unique(labels)}
    by_label = np.stack([codes[name] for name in labels]) + rng.normal(size=(len(labels), 16))
    noise = rng.normal(size=by_label.shape)
    structured = integration_scores(by_label, labels, batch, pre)
    random = integration_scores(noise, labels, batch, pre)
    assert structured["bio"] > random["bio"] + 0.2
    # The same label structure, but each batch moved apart: cell types stay, batches separate.
    shifted = by_label + (batch == np.unique(batch)[0])[:, None] * 12.0
    separated = integration_scores(shifted, labels, batch, pre)
    assert separated["batch"] < structured["batch"] - 0.1
    assert separated["ilisi"] < structured["ilisi"]


def test_aggregate_weights_bio_and_batch_by_scib_rule():
    scores = {name: 1.0 for name in BIO} | {name: 0.0 for name in BATCH}
    scores["nmi"] = 0.5  # bio = mean(0.5, 1, 1, 1, 1) = 0.9
    assert aggregate(scores) == pytest.approx({"bio": 0.9, "batch": 0.0, "overall": 0.54})
    with pytest.raises(AtlasError, match="missing"):
        aggregate({"nmi": 1.0})


def test_refuses_mismatched_rows_and_single_batch(bmmc):
    adata, pre = bmmc
    x = pre[:, :10]
    with pytest.raises(AtlasError, match="same cells"):
        integration_scores(x[:-1], adata.obs["cell_type"], adata.obs["batch"], pre)
    with pytest.raises(AtlasError, match="two batches"):
        integration_scores(x, adata.obs["cell_type"], np.zeros(adata.n_obs), pre)


def test_numba_compiles_after_ray_data_progress_bars():
    """Ray Data's progress bars (``tqdm_ray.instance()``) replaced builtins.print in the driver and
    numba then failed to compile any function that can print (pynndescent in UMAPs: "Untyped global
    name 'print'", or no lowering for it, depending on import order). ``import atlas`` turns that
    patch off. Fresh processes, both import orders; a small function that prints fails the same way
    pynndescent did (checked: without ``import atlas`` both scripts fail)."""
    import os
    import subprocess
    import sys

    compile_ = (
        "@numba.njit\n"
        "def total(n):\n"
        "    s = 0\n"
        "    for i in range(n):\n"
        "        s += i\n"
        "    if s < 0:\n"
        "        print('negative', s)\n"
        "    return s\n"
        "print('total', total(10))\n"
    )
    bar = ("from ray.experimental import tqdm_ray\n"
           "tqdm_ray.instance()\n"  # what a Ray Data progress bar does first
           "assert isinstance(builtins.print, types.BuiltinFunctionType), builtins.print\n")
    imports = "import builtins, types\nimport atlas\n"
    numba_first = imports + "import numba\n" + bar + compile_
    bar_first = imports + bar + "import numba\n" + compile_
    env = {k: v for k, v in os.environ.items() if k != "RAY_TQDM_PATCH_PRINT"}
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env) for script in (numba_first, bar_first)]
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
        assert "total 45" in out
