"""The PCA + kNN baseline and the evaluation metrics, end to end on real pbmc10k cells.

The small real atlas (``tiny_atlas``: 800 reference cells, 200 query cells without proteins) is
mapped with ``map_query`` and, on the very same 800 reference cells, with the baseline; both are
scored with the metric functions. The bounds are loose for a tiny 1-epoch model but tight enough
to catch a broken metric (misaligned cells score near the majority-class rate, ~0.33 here).
"""

import anndata as ad
import numpy as np
import pytest

from atlas.evaluate.baselines import PcaKnnBaseline, log_normalise_frame
from atlas.evaluate.metrics import feature_pearson, label_transfer, rejection_auroc
from atlas.mapping.query import map_query
from tests.tiny_atlas import LEVELS, PBMC

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def split(tiny_atlas, dataset):
    """``(reference AnnData with proteins, query AnnData with proteins)``: the tiny atlas's cells."""
    full = ad.read_h5ad(dataset(PBMC))
    cells = np.sort(np.random.default_rng(0).choice(full.n_obs, 1000, replace=False))  # as tests/tiny_atlas.py
    data = full[cells].copy()
    reference, query = data[:800].copy(), data[800:].copy()
    _, tiny_query, _ = tiny_atlas
    assert list(query.obs_names) == list(tiny_query.obs_names), "tests/tiny_atlas.py changed its split"
    return reference, query


@pytest.fixture(scope="module")
def baseline_mapped(split, tiny_atlas):
    reference, _ = split
    _, query, _ = tiny_atlas  # RNA only
    baseline = PcaKnnBaseline().fit(reference, LEVELS, profiles={"protein": "protein_counts"})
    return baseline, baseline.map(query)


def _consistent(result, n_labelled):
    """What any label_transfer result must satisfy, whatever the method."""
    assert result.n_cells == n_labelled == int(result.confusion.to_numpy().sum())
    correct = sum(result.confusion.at[c, c] for c in result.confusion.index if c in result.confusion.columns)
    assert result.accuracy == pytest.approx(correct / result.n_cells)
    assert 0.0 <= result.macro_f1 <= 1.0
    assert result.macro_f1 == pytest.approx(np.mean(list(result.per_class_f1.values())))


def test_baseline_label_transfer_on_real_cells(split, baseline_mapped):
    _, query = split
    _, mapped = baseline_mapped
    assert list(mapped.obs_names) == list(query.obs_names)
    assert mapped.obsm["X_pca"].shape == (query.n_obs, 50)
    l1 = label_transfer(query.obs["cell_type_l1"], mapped.obs["cell_type_l1_pred"])
    l2 = label_transfer(query.obs["cell_type_l2"], mapped.obs["cell_type_l2_pred"])
    _consistent(l1, int((query.obs["cell_type_l1"] != "undefined").sum()))
    _consistent(l2, int((query.obs["cell_type_l2"] != "undefined").sum()))
    assert l1.accuracy > 0.8, l1  # measured 0.91 on these 191 gated cells; majority class is 0.33
    assert l2.accuracy > 0.6, l2  # measured 0.80
    assert set(l1.per_class_f1) == {"B", "CD4 T", "CD8 T", "NK", "monocytes"}  # "undefined" never votes
    # Confidence is informative: misclassified cells are less confident than correct ones.
    labelled = (query.obs["cell_type_l1"] != "undefined").to_numpy()
    wrong = (mapped.obs["cell_type_l1_pred"].to_numpy() != query.obs["cell_type_l1"].to_numpy())[labelled]
    assert rejection_auroc(wrong, mapped.obs["cell_type_l1_confidence"].to_numpy()[labelled]) > 0.6


def test_baseline_level2_is_voted_within_the_level1_group(split, baseline_mapped):
    reference, _ = split
    _, mapped = baseline_mapped
    children = reference.obs.groupby("cell_type_l1", observed=True)["cell_type_l2"].agg(lambda s: set(s) - {"undefined"})
    for l1, l2 in zip(mapped.obs["cell_type_l1_pred"], mapped.obs["cell_type_l2_pred"]):
        if children.get(l1):
            assert l2 in children[l1], (l1, l2)
        else:  # B cells carry no level-2 label: nothing can vote there
            assert l2 == "unknown", (l1, l2)
    assert (mapped.obs["cell_type_l1_pred"] == "B").any()


def test_protein_prediction_pearson_on_real_cells(split, baseline_mapped, tiny_atlas):
    _, query = split
    atlas, rna_query, proteins = tiny_atlas
    measured = log_normalise_frame(query.obsm["protein_counts"])
    itself = feature_pearson(measured, measured)
    assert list(itself.per_feature.index) == proteins
    np.testing.assert_allclose(itself.per_feature.to_numpy(), 1.0, atol=1e-12)
    _, mapped = baseline_mapped
    base = feature_pearson(mapped.obsm["protein_pred"], measured)
    assert base.n_cells == query.n_obs
    assert base.mean > 0.7, base.per_feature  # measured 0.81
    assert base.per_feature["CD14_TotalSeqB"] > 0.9  # the monocyte marker: measured 0.96
    atlas_mapped = map_query(rna_query, atlas, thresholds=None)
    concerto = feature_pearson(atlas_mapped.obsm["protein_pred"], measured)
    assert 0.3 < concerto.mean <= 1.0, concerto.per_feature  # a 1-epoch 32-d model: measured 0.51


def test_atlas_and_baseline_scored_the_same_way(split, baseline_mapped, tiny_atlas):
    _, query = split
    atlas, rna_query, _ = tiny_atlas
    atlas_mapped = map_query(rna_query, atlas, thresholds=None)
    _, base = baseline_mapped
    n = int((query.obs["cell_type_l1"] != "undefined").sum())
    scores = {}
    for name, mapped in (("concerto", atlas_mapped), ("pca_knn", base)):
        result = label_transfer(query.obs["cell_type_l1"], mapped.obs.loc[query.obs_names, "cell_type_l1_pred"])
        _consistent(result, n)
        scores[name] = result.accuracy
    # Far above the majority-class rate (0.33) for both; the tiny model is much weaker than the baseline.
    assert scores["concerto"] > 0.5 and scores["pca_knn"] > 0.8, scores


def test_unseen_type_rejection_on_real_cells(split, tiny_atlas):
    reference, query = split
    _, rna_query, _ = tiny_atlas
    without_cd8 = reference[reference.obs["cell_type_l1"] != "CD8 T"].copy()
    mapped = PcaKnnBaseline().fit(without_cd8, LEVELS).map(rna_query)
    l1 = query.obs["cell_type_l1"].to_numpy()
    labelled = l1 != "undefined"
    unseen = l1 == "CD8 T"
    assert unseen.sum() >= 10
    assert not (mapped.obs["cell_type_l1_pred"] == "CD8 T").any()  # a removed type is never predicted
    auroc = rejection_auroc(unseen[labelled], mapped.obs["cell_type_l1_confidence"].to_numpy()[labelled])
    assert 0.0 <= auroc <= 1.0


def test_baseline_on_a_panel_narrower_than_its_pca(dataset):
    """A 9-antibody panel: PCA keeps all 9 components (full SVD; arpack cannot) and still maps."""
    full = ad.read_h5ad(dataset("adtnorm_13studies_adt9_422k.h5ad"))
    cells = full[np.random.default_rng(0).choice(full.n_obs, 2000, replace=False)].copy()
    reference, query = cells[:1500].copy(), cells[1500:].copy()
    baseline = PcaKnnBaseline().fit(reference, ["cell_type_l1"], unlabeled=("undefined",))
    assert baseline.pca_.n_components_ == 9
    mapped = baseline.map(query)
    result = label_transfer(query.obs["cell_type_l1"].astype(str), mapped.obs["cell_type_l1_pred"], ignore=("undefined",))
    assert result.accuracy > 0.7  # gated protein labels on their own antibodies: well above chance (~0.3)
