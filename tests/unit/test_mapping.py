"""Mapping library: the weighted vote, and a tiny end-to-end map onto a Ray-free artifact."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlas.mapping import MappingError, map_query, mean_profile, weighted_vote

LEVELS = ["cell_type_l1", "cell_type_l2"]


# -- weighted_vote / mean_profile ---------------------------------------------------------------


def test_vote_weights_by_similarity():
    labels = np.array([["A", "B", "B"], ["A", "A", "B"]])
    sims = np.array([[0.9, 0.3, 0.3], [0.5, 0.5, 0.5]])
    pred, conf = weighted_vote(labels, sims)
    assert pred.tolist() == ["A", "A"]  # 0.9 beats 0.6 despite fewer votes
    np.testing.assert_allclose(conf, [0.9 / 1.5, 2 / 3], rtol=1e-6)


def test_vote_negative_similarity_clipped_and_all_nonpositive_counts_equally():
    pred, conf = weighted_vote(np.array([["A", "B", "B"]]), np.array([[0.4, -0.9, -0.9]]))
    assert pred.tolist() == ["A"] and conf[0] == pytest.approx(1.0)
    pred, conf = weighted_vote(np.array([["A", "B", "B"]]), np.array([[-0.1, -0.2, -0.3]]))
    assert pred.tolist() == ["B"] and conf[0] == pytest.approx(2 / 3)


def test_vote_ties_go_to_most_similar_neighbour_then_sorted_label():
    pred, conf = weighted_vote(np.array([["B", "A", "A", "B"]]), np.array([[0.5, 0.4, 0.1, 0.0]]))
    assert pred.tolist() == ["B"]  # 0.5 vs 0.5: B holds the nearest neighbour
    assert conf[0] == pytest.approx(0.5)
    pred, _ = weighted_vote(np.array([["B", "A"]]), np.array([[0.5, 0.5]]))
    assert pred.tolist() == ["A"]  # full tie: first in sorted order


def test_vote_ignores_empty_labels_and_missing_hits():
    labels = np.array([["", "B", "A"], ["", "", ""], ["A", "B", "B"]])
    sims = np.array([[0.99, 0.5, 0.4], [0.9, 0.8, 0.7], [0.3, -np.inf, 0.2]])
    pos = np.array([[0, 1, 2], [3, 4, 5], [6, -1, 7]])
    pred, conf = weighted_vote(labels, sims, positions=pos)
    assert pred.tolist() == ["B", "", "A"]
    np.testing.assert_allclose(conf, [0.5 / 0.9, 0.0, 0.3 / 0.5], rtol=1e-6)
    assert ((conf >= 0) & (conf <= 1)).all()


def test_balanced_vote_lifts_a_rare_label_and_keeps_shares_in_range():
    from atlas.mapping.vote import balance_weights

    # 100 reference cells of A, 25 of B: power 0.5 gives B twice A's weight per neighbour.
    factor = balance_weights({"A": 100, "B": 25, "empty": 0}, 0.5)
    assert factor == {"A": 1.0, "B": 2.0}
    assert balance_weights({"A": 100, "B": 25}, 0.0) == {"A": 1.0, "B": 1.0}
    labels = np.array([["A", "A", "A", "B", "B"], ["A", "A", "A", "A", "B"]])
    sims = np.full((2, 5), 0.5)
    plain, _ = weighted_vote(labels, sims)
    balanced, conf = weighted_vote(labels, sims, label_weight=factor)
    assert plain.tolist() == ["A", "A"] and balanced.tolist() == ["B", "A"]
    np.testing.assert_allclose(conf, [4 / 7, 4 / 6], rtol=1e-6)
    # Labels without a factor count as 1; a missing hit still does not vote.
    same, _ = weighted_vote(labels, sims, label_weight={"Z": 5.0})
    assert same.tolist() == plain.tolist()


def test_mean_profile_skips_missing_hits_and_unmeasured_rows():
    values = np.array([[1.0, 2.0], [3.0, 4.0], [np.nan, np.nan]], np.float32)
    pos = np.array([[0, 1], [2, -1], [1, 2]])
    out = mean_profile(values, pos)
    np.testing.assert_allclose(out[0], [2.0, 3.0])
    assert np.isnan(out[1]).all()
    np.testing.assert_allclose(out[2], [3.0, 4.0])
    csr = mean_profile(sp.csr_matrix(np.nan_to_num(values)), np.array([[0, 1], [1, -1]]))
    np.testing.assert_allclose(csr, [[2.0, 3.0], [3.0, 4.0]])


# -- end to end on a tiny Ray-free artifact -----------------------------------------------------


@pytest.mark.real_data
def test_map_query_hierarchical(tiny_atlas):
    atlas, query, proteins = tiny_atlas
    out = map_query(query, atlas, return_neighbors=True)
    assert list(out.obs_names) == list(query.obs_names)
    for lv in LEVELS:
        for col in (f"{lv}_pred", f"{lv}_confidence", f"{lv}_unknown"):
            assert col in out.obs
        conf = out.obs[f"{lv}_confidence"].to_numpy()
        assert ((conf >= 0) & (conf <= 1)).all()
        assert not out.obs[f"{lv}_unknown"].all()
    # Level-2 predictions agree with the level-1 group they were searched in.
    shard = atlas.shard("coarse")
    parent_of = dict(zip(shard.labels["cell_type_l2"], shard.labels["cell_type_l1"]))
    for l1, l2 in zip(out.obs["cell_type_l1_pred"], out.obs["cell_type_l2_pred"]):
        assert l2 == "unknown" or parent_of[l2] == l1
    # Better than chance after one epoch: the embedding carries the cell types.
    agree = (out.obs["cell_type_l1_pred"].to_numpy() == query.obs["cell_type_l1"].astype(str).to_numpy()).mean()
    assert agree > 0.5
    assert out.obsm["X_atlas"].shape == (query.n_obs, 64)  # teacher + student, 32 each
    # The label heads' class probabilities per level, columns = the reference's classes.
    heads = atlas.heads()
    for lv in LEVELS:
        probabilities = out.obsm[f"{lv}_probabilities"]
        assert list(probabilities.columns) == list(heads.classes[heads.levels.index(lv)])
        assert list(probabilities.index) == list(query.obs_names)
        np.testing.assert_allclose(probabilities.to_numpy().sum(1), 1.0, rtol=1e-5)
    pred = out.obsm["protein_pred"]
    assert isinstance(pred, pd.DataFrame) and list(pred.columns) == proteins
    assert np.isfinite(pred.to_numpy()).all()
    assert out.obsm["atlas_neighbors_soma_joinid"].shape == (query.n_obs, 25)
    assert out.uns["atlas_neighbors"]["dataset_id"].shape == (query.n_obs, 25)
    assert out.uns["atlas"]["alignment"]["RNA"]["fraction"] == 1.0
    assert out.uns["atlas"]["profile_neighbours"] == "embedding+pca"


@pytest.mark.real_data
def test_profiles_come_from_the_profile_space_unless_the_query_lacks_its_genes(tiny_atlas):
    """Proteins are pooled over the 25 nearest cells in the profile space, softmax-weighted; a
    query without a tenth of the genes (the PCA would place it by the genes it lacks) gets the
    embedding's neighbours, equally weighted, and is told so."""
    from atlas.data.normalize import normalize_log1p
    from atlas.mapping.query import predict_profiles
    from atlas.mapping.search import LocalSearcher, search_shard

    atlas, query, _ = tiny_atlas
    cells = query[:30].copy()
    out = map_query(cells, atlas, predict=["protein"], return_neighbors=True, thresholds=None)
    space = atlas.profile_space()
    coarse = atlas.shard("coarse")
    emb = out.obsm["X_atlas"]
    aligned = cells[:, atlas.vocabulary["RNA"]].X
    norm = sp.csr_matrix(aligned, dtype=np.float32)
    norm.data = normalize_log1p(norm.indptr, norm.data)
    hits = search_shard(coarse, space.vectors(emb, space.project(norm)), 25, space="profiles")
    expected = predict_profiles(hits, LocalSearcher(atlas), ["protein"], space.neighbour_weights(hits.similarity))
    np.testing.assert_allclose(out.obsm["protein_pred"].to_numpy(), expected["protein"].to_numpy(), rtol=1e-5)
    # (the tiny atlas's soma_joinids are its shard positions)
    by_embedding = mean_profile(coarse.profiles["protein"][1], out.obsm["atlas_neighbors_soma_joinid"])
    assert not np.allclose(out.obsm["protein_pred"].to_numpy(), by_embedding)

    fewer = cells[:, cells.var_names[: int(cells.n_vars * 0.85)]].copy()
    lacking = map_query(fewer, atlas, predict=["protein"], return_neighbors=True, thresholds=None)
    assert lacking.uns["atlas"]["profile_neighbours"].startswith("embedding (the query has 85% of the RNA")
    np.testing.assert_allclose(lacking.obsm["protein_pred"].to_numpy(),
                               mean_profile(coarse.profiles["protein"][1], lacking.obsm["atlas_neighbors_soma_joinid"]),
                               rtol=1e-5)


@pytest.mark.real_data
def test_map_query_thresholds_flag_unknown(tiny_atlas):
    atlas, query, _ = tiny_atlas
    out = map_query(query[:50].copy(), atlas, thresholds=1.01)
    for lv in LEVELS:
        assert out.obs[f"{lv}_unknown"].all()
        assert (out.obs[f"{lv}_pred"] == "unknown").all()
    out = map_query(query[:50].copy(), atlas, thresholds={"cell_type_l2": 1.01}, predict=[])
    assert out.obs["cell_type_l2_unknown"].all() and not out.obs["cell_type_l1_unknown"].all()
    assert "protein_pred" not in out.obsm


@pytest.mark.real_data
def test_map_query_refuses_poor_gene_overlap(tiny_atlas):
    atlas, query, _ = tiny_atlas
    few = query[:20, : query.n_vars // 10].copy()
    with pytest.raises(MappingError, match=r"10\.0% < 50% required"):
        map_query(few, atlas)


@pytest.mark.real_data
def test_map_query_refuses_normalised_values_and_other_species(tiny_atlas):
    atlas, query, _ = tiny_atlas
    logged = query[:20].copy()
    logged.X = np.log1p(logged.X)
    with pytest.raises(MappingError, match="not raw counts"):
        map_query(logged, atlas)
    mouse = query[:20].copy()
    mouse.var_names = [v[:1] + v[1:].lower() for v in mouse.var_names]
    with pytest.raises(MappingError, match="look mouse but atlas .* is human"):
        map_query(mouse, atlas)


@pytest.mark.real_data
def test_map_query_hash_layout_flat_vote(tiny_atlas, tmp_path):
    """A hash-sharded atlas (no hierarchy): every level voted from neighbours merged over shards,
    and proteins pooled over the profile-space neighbours of the three shards exactly as over the
    coarse shard's."""
    import shutil

    from atlas.artifact import load_atlas, write_manifest
    from atlas.index.shards import build_hierarchy

    atlas, query, proteins = tiny_atlas
    coarse = atlas.shard("coarse")
    emb = coarse.index.reconstruct_n(0, coarse.n_cells)
    build_hierarchy(emb, coarse.soma_joinid, coarse.labels, None,
                    {"protein": coarse.profiles["protein"]}, coarse.dataset_id,
                    use_gpu=False, n_hash_shards=3, out_dir=tmp_path / "shards",
                    profile_vectors=coarse.profile_index.reconstruct_n(0, coarse.n_cells))
    for name in ("model.pt", "heads.npz", "profile_space.npz"):
        shutil.copy(atlas.path / name, tmp_path / name)
    m = atlas.manifest
    write_manifest(tmp_path, build_config=m["build_config"], model=m["model"], vocabulary=atlas.vocabulary,
                   store=m["store"], metrics={}, mapping=m["mapping"])
    flat = map_query(query[:40].copy(), load_atlas(tmp_path), k_coarse=10, thresholds=None)
    tree = map_query(query[:40].copy(), atlas, k_coarse=10, thresholds=None)
    # Same reference cells, same k: the merged flat level-1 vote equals the coarse vote.
    assert (flat.obs["cell_type_l1_pred"] == tree.obs["cell_type_l1_pred"]).all()
    assert "cell_type_l2_pred" in flat.obs
    np.testing.assert_allclose(flat.obsm["protein_pred"].to_numpy(), tree.obsm["protein_pred"].to_numpy(), rtol=1e-5)
    assert list(flat.obsm["protein_pred"].columns) == proteins
    assert flat.uns["atlas"]["profile_neighbours"] == tree.uns["atlas"]["profile_neighbours"] == "embedding+pca"


@pytest.mark.real_data
def test_calibrated_thresholds_are_stored_and_used_by_default(tiny_atlas):
    atlas, query, _ = tiny_atlas
    section = atlas.manifest["mapping"]
    assert section["n_cells"] == 400 and section["rejection_rate"] == 0.05
    for lv in LEVELS:
        assert 0.0 < section["thresholds"][lv] <= 1.0
        assert 0.3 < section["loo_accuracy"][lv] <= 1.0
    default = map_query(query, atlas, predict=[])
    none = map_query(query, atlas, predict=[], thresholds=None)
    lv = "cell_type_l1"
    below = none.obs[f"{lv}_confidence"] < section["thresholds"][lv]
    assert (default.obs[f"{lv}_unknown"] == (below | none.obs[f"{lv}_unknown"])).all()
    assert default.uns["atlas"]["thresholds"][lv] == section["thresholds"][lv]
    assert not none.obs[f"{lv}_unknown"].any()


def test_leave_one_out_search_skips_the_query_cell_itself():
    from atlas.index.faiss_index import build_index
    from atlas.index.shards import Shard
    from atlas.mapping.search import search_shard

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    shard = Shard("s", build_index(x, kind="flat", use_gpu=False), np.arange(100, 150),
                  {"l": np.array(["a"] * 50)}, np.array(["d"] * 50))
    plain = search_shard(shard, x[:5], 3)
    assert (plain.soma_joinid[:, 0] == np.arange(100, 105)).all()  # each cell finds itself first
    loo = search_shard(shard, x[:5], 3, exclude=np.arange(100, 105))
    assert not (loo.soma_joinid == np.arange(100, 105)[:, None]).any()
    np.testing.assert_array_equal(loo.soma_joinid, search_shard(shard, x[:5], 4).soma_joinid[:, 1:])


def _three_types(seed: int, n: int, dim: int, spread: float):
    """Cells of three types A/B/C around random centres, indexed in memory: (emb, labels, layout, searcher)."""
    from atlas.index.shards import build_hierarchy
    from atlas.mapping.search import LocalSearcher

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, dim)) * spread
    truth = rng.integers(0, 3, n)
    emb = (centers[truth] + rng.normal(size=(n, dim))).astype(np.float32)
    labels = {"l1": np.array(["A", "B", "C"])[truth]}
    layout = build_hierarchy(emb, np.arange(n), labels, ["l1"], None, np.full(n, "d"), use_gpu=False)

    class InMemory:  # the layout's shards, built without out_dir
        def shard(self, name, **_):
            return layout.shards[name]

    return emb, labels, layout, LocalSearcher(InMemory())


def test_calibration_threshold_rejects_about_the_requested_fraction():
    from atlas.mapping.calibrate import calibrate_thresholds
    from atlas.mapping.query import assign_labels

    emb, labels, layout, searcher = _three_types(1, 600, 16, 2)
    out = calibrate_thresholds(emb, np.arange(600), labels, searcher, layout, ["l1"],
                               rejection_rate=0.1, max_cells=600)
    obs, _ = assign_labels(emb, np.ones(600, bool), searcher, layout, ["l1"], exclude=np.arange(600))
    rejected = (obs["l1_confidence"] < out["thresholds"]["l1"]).mean()
    assert rejected <= 0.1 and out["loo_accuracy"]["l1"] > 0.8


def test_sparse_obsm_frames_are_read_without_densifying():
    import anndata as ad

    from atlas.mapping.align import query_matrix, query_modalities

    peaks = sp.random(6, 50, density=0.1, random_state=0, format="csr", dtype=np.float32)
    peaks.data = np.ceil(peaks.data * 3)
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(6)]))
    adata.obsm["ATAC"] = pd.DataFrame.sparse.from_spmatrix(peaks, index=adata.obs_names,
                                                           columns=[f"chr1:{i}" for i in range(50)])
    assert query_modalities(adata) == ["ATAC"]
    csr, features = query_matrix(adata, "ATAC")
    assert features[3] == "chr1:3" and (csr != peaks).nnz == 0


@pytest.mark.real_data
@pytest.mark.parametrize("where", ["first", "middle", "last", "all"])
def test_a_cell_with_no_counts_is_unknown_with_confidence_zero_wherever_it_sits(tiny_atlas, where):
    """A query whose last cell had no counts over the atlas's features crashed mapping
    (``add.reduceat`` out of bounds); one in the middle got confidence 0.4."""
    import scipy.sparse as sp

    atlas, query, _ = tiny_atlas
    cells = query[:5].copy()
    x = sp.csr_matrix(cells.X, dtype=np.float32).tolil()
    empty = {"first": [0], "middle": [2], "last": [4], "all": [0, 1, 2, 3, 4]}[where]
    for row in empty:
        x[row] = 0
    cells.X = x.tocsr()
    out = map_query(cells, atlas, predict=["protein"])
    assert out.uns["atlas"]["n_no_data"] == len(empty)
    for lv in LEVELS:
        assert (out.obs[f"{lv}_pred"].iloc[empty] == "unknown").all()
        assert (out.obs[f"{lv}_confidence"].iloc[empty] == 0).all()
        assert out.obs[f"{lv}_unknown"].iloc[empty].all()
    assert np.isnan(out.obsm["protein_pred"].to_numpy()[empty]).all()
    # The other cells map exactly as they do without the empty ones beside them.
    rest = [i for i in range(5) if i not in empty]
    if rest:
        alone = map_query(cells[rest].copy(), atlas, predict=["protein"])
        for lv in LEVELS:
            assert out.obs[f"{lv}_pred"].iloc[rest].tolist() == alone.obs[f"{lv}_pred"].tolist()
            np.testing.assert_allclose(out.obs[f"{lv}_confidence"].iloc[rest], alone.obs[f"{lv}_confidence"], rtol=1e-5)
        np.testing.assert_allclose(out.obsm["protein_pred"].to_numpy()[rest], alone.obsm["protein_pred"].to_numpy(),
                                   rtol=1e-5)


def test_heads_scale_the_vote_share_by_the_probability_of_the_voted_label():
    from atlas.mapping.heads import Heads
    from atlas.mapping.query import assign_labels

    emb, _, layout, searcher = _three_types(2, 300, 8, 3)
    plain, _ = assign_labels(emb, np.ones(300, bool), searcher, layout, ["l1"])
    # A head that is uniform over A and B and has no class C: C gets probability 0.
    uniform = Heads(("l1",), (("A", "B"),), ((np.zeros((2, 8), np.float32), np.zeros(2, np.float32)),))
    scaled, _ = assign_labels(emb, np.ones(300, bool), searcher, layout, ["l1"], heads=uniform)
    assert (scaled["l1_pred"] == plain["l1_pred"]).all()  # the vote decides the label
    is_c = plain["l1_pred"].to_numpy() == "C"
    np.testing.assert_allclose(scaled["l1_confidence"][~is_c], plain["l1_confidence"][~is_c] / 2, rtol=1e-6)
    assert (scaled["l1_confidence"][is_c] == 0).all()
    # A type whose reference cells sit much closer to each other than these cells sit to them:
    # its confidences shrink by that ratio; types without a typical value keep theirs.
    is_a = plain["l1_pred"].to_numpy() == "A"
    far, _ = assign_labels(emb, np.ones(300, bool), searcher, layout, ["l1"],
                           typical={"level": "l1", "values": {"A": 1e6}})
    assert (far["l1_confidence"][is_a] < 1e-5).all()
    np.testing.assert_array_equal(far["l1_confidence"][~is_a], plain["l1_confidence"][~is_a])
    near, _ = assign_labels(emb, np.ones(300, bool), searcher, layout, ["l1"],
                            typical={"level": "l1", "values": {"A": 1e-6, "B": 1e-6, "C": 1e-6}})
    np.testing.assert_array_equal(near["l1_confidence"], plain["l1_confidence"])  # capped at 1
    # A head for another level leaves this level's vote share alone.
    other = Heads(("l2",), (("x",),), ((np.zeros((1, 8), np.float32), np.zeros(1, np.float32)),))
    same, _ = assign_labels(emb, np.ones(300, bool), searcher, layout, ["l1"], heads=other)
    np.testing.assert_array_equal(same["l1_confidence"], plain["l1_confidence"])


def test_relative_and_typical_similarity():
    from atlas.mapping.confidence import neighbour_similarity, relative_similarity, typical_similarity

    sims = np.array([[0.9, 0.7, -np.inf], [0.5, 0.5, 0.5], [-np.inf, -np.inf, -np.inf]], np.float32)
    np.testing.assert_allclose(neighbour_similarity(sims), [0.8, 0.5, 0.0], rtol=1e-6)
    typical = typical_similarity(sims, np.array(["A", "A", ""]))
    assert typical == {"A": pytest.approx(0.65)}
    got = relative_similarity(np.array([0.325, 0.9, 0.1]), np.array(["A", "A", "Z"]), typical)
    np.testing.assert_allclose(got, [0.5, 1.0, 1.0])


@pytest.mark.real_data
def test_an_atlas_that_votes_in_its_profile_space(tiny_atlas, tmp_path):
    """index.label_space: profiles — every shard indexes the profile-space vectors; a query is
    searched with its own (embedding + PCA), or, lacking the PCA's genes, with its embedding alone,
    and then finds exactly the neighbours the embedding's own index gives."""
    import shutil

    from atlas.artifact import load_atlas, write_manifest
    from atlas.index.shards import build_hierarchy

    atlas, query, _ = tiny_atlas
    coarse = atlas.shard("coarse")
    vectors = coarse.profile_index.reconstruct_n(0, coarse.n_cells)
    build_hierarchy(vectors, coarse.soma_joinid, coarse.labels, LEVELS, {"protein": coarse.profiles["protein"]},
                    coarse.dataset_id, use_gpu=False, out_dir=tmp_path / "shards")
    for name in ("model.pt", "heads.npz", "profile_space.npz"):
        shutil.copy(atlas.path / name, tmp_path / name)
    m = atlas.manifest
    mapping = {**m["mapping"], "profile_space": {**m["mapping"]["profile_space"], "labels": True}}
    write_manifest(tmp_path, build_config=m["build_config"], model=m["model"], vocabulary=atlas.vocabulary,
                   store=m["store"], metrics={}, mapping=mapping)
    voting = load_atlas(tmp_path)
    cells = query[:40].copy()
    out = map_query(cells, voting, predict=["protein"], return_neighbors=True, thresholds=None)
    assert out.uns["atlas"]["label_neighbours"] == out.uns["atlas"]["profile_neighbours"] == "embedding+pca"
    # Its coarse neighbours are the profile space's (the ones the default atlas pools proteins over).
    default = map_query(cells, atlas, predict=["protein"], thresholds=None)
    np.testing.assert_allclose(out.obsm["protein_pred"].to_numpy(), default.obsm["protein_pred"].to_numpy(),
                               rtol=1e-5, atol=1e-6)
    assert (out.obs["cell_type_l1_pred"] != "unknown").all()

    fewer = cells[:, cells.var_names[: int(cells.n_vars * 0.85)]].copy()
    lacking = map_query(fewer, voting, return_neighbors=True, thresholds=None)
    by_embedding = map_query(fewer, atlas, return_neighbors=True, thresholds=None)
    assert lacking.uns["atlas"]["label_neighbours"].startswith("embedding (the query has 85%")
    np.testing.assert_array_equal(lacking.obsm["atlas_neighbors_soma_joinid"],
                                  by_embedding.obsm["atlas_neighbors_soma_joinid"])
    assert list(lacking.obs["cell_type_l1_pred"]) == list(by_embedding.obs["cell_type_l1_pred"])
    assert list(lacking.obs["cell_type_l2_pred"]) == list(by_embedding.obs["cell_type_l2_pred"])


def test_fine_searches_go_out_together_where_the_searcher_can_and_vote_the_same():
    """The service answers every fine node's search in one round (``search_many``); the labels
    must be those of one search per node."""
    from atlas.index.shards import build_hierarchy
    from atlas.mapping.labels import assign_labels
    from atlas.mapping.search import LocalSearcher, search_all

    rng = np.random.default_rng(1)
    truth = rng.integers(0, 6, 300)  # six level-2 types, two per level-1 type
    emb = (rng.normal(size=(6, 8))[truth] * 4 + rng.normal(size=(300, 8))).astype(np.float32)
    labels = {"l1": np.array(list("AABBCC"))[truth], "l2": np.array(["A1", "A2", "B1", "B2", "C1", "C2"])[truth]}
    layout = build_hierarchy(emb, np.arange(300), labels, ["l1", "l2"], None, np.full(300, "d"), use_gpu=False)

    class InMemory:
        def shard(self, name, **_):
            return layout.shards[name]

    searcher = LocalSearcher(InMemory())

    class Batching(LocalSearcher):
        def __init__(self, inner):
            super().__init__(inner.atlas)
            self.rounds: list[int] = []

        def search_many(self, requests):
            self.rounds.append(len(requests))
            return [self.search(r.shard_names, r.queries, r.k, r.exclude, r.space) for r in requests]

    batching = Batching(searcher)
    levels = list(layout.levels)
    one_by_one, _ = assign_labels(emb, np.ones(len(emb), bool), searcher, layout, levels)
    together, _ = assign_labels(emb, np.ones(len(emb), bool), batching, layout, levels)
    pd.testing.assert_frame_equal(one_by_one, together)
    assert batching.rounds and max(batching.rounds) > 1, "the fine nodes were searched one call at a time"
    assert search_all(searcher, []) == []
