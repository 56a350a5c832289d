"""The profile space (PCA of RNA beside the embedding) and the weighted pooling of profiles."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from atlas.index.profile_space import ProfileSpace, read_profile_space
from atlas.index.shards import Shard, build_hierarchy, load_shard, write_shard
from atlas.mapping.search import search_shard, shard_profile_sums
from atlas.mapping.vote import mean_profile


def _cells(n=60, g=30, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(rng.gamma(1.0, 1.0, size=(1, g)) * rng.gamma(2.0, 1.0, size=(n, 1)), size=(n, g))
    x = sp.csr_matrix(np.log1p(dense).astype(np.float32))
    return x


def test_fit_on_sparse_cells_finds_the_principal_axes_of_the_dense_pca():
    from sklearn.decomposition import PCA

    x = _cells()
    space = ProfileSpace.fit(x, n_components=5)
    dense = PCA(5, svd_solver="full").fit(x.toarray())
    # Same axes up to sign, and the coordinates of the fitted cells are the PCA's.
    np.testing.assert_allclose(np.abs(np.sum(space.components * dense.components_, axis=1)), 1.0, atol=1e-4)
    signs = np.sign(np.sum(space.components * dense.components_, axis=1))
    np.testing.assert_allclose(space.project(x) * signs, dense.transform(x.toarray()), atol=1e-3)
    with pytest.raises(ValueError, match="features"):
        space.project(sp.csr_matrix((2, 29), dtype=np.float32))
    with pytest.raises(ValueError, match="at least 2 cells"):
        ProfileSpace.fit(x[:1], n_components=5)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, (5, 4), elements=st.floats(-10, 10, width=32)),
       arrays(np.float32, (5, 3), elements=st.floats(-10, 10, width=32)),
       st.floats(0.25, 4.0))
def test_vectors_are_unit_rows_whose_similarity_weighs_both_spaces(emb, coords, weight):
    space = ProfileSpace("RNA", np.zeros(2, np.float32), np.zeros((3, 2), np.float32), weight=weight)
    v = space.vectors(emb, coords)
    assert v.shape == (5, 7) and v.dtype == np.float32
    ne, nc = np.linalg.norm(emb, axis=1), np.linalg.norm(coords, axis=1)
    ok = (ne > 1e-3) & (nc > 1e-3)
    np.testing.assert_allclose(np.linalg.norm(v[ok], axis=1), 1.0, rtol=1e-5)
    if ok.sum() >= 2:
        i, j = np.flatnonzero(ok)[:2]
        cos_e = emb[i] @ emb[j] / (ne[i] * ne[j])
        cos_c = coords[i] @ coords[j] / (nc[i] * nc[j])
        expected = (cos_e + weight**2 * cos_c) / (1 + weight**2)
        assert v[i] @ v[j] == pytest.approx(expected, abs=1e-4)
    # A zero row (an empty cell) stays finite.
    assert np.isfinite(space.vectors(np.zeros((1, 4)), np.zeros((1, 3)))).all()


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(0, 4), st.integers(1, 6)),
              elements=st.floats(-1, 1, width=32)))
def test_neighbour_weights_start_at_one_fall_with_similarity_and_skip_missing_hits(sims):
    sims = -np.sort(-sims, axis=1)  # best first, as search returns them
    sims[:, -1:] = -np.inf if sims.shape[1] > 1 else sims[:, -1:]
    w = ProfileSpace("RNA", np.zeros(1, np.float32), np.zeros((1, 1), np.float32)).neighbour_weights(sims)
    assert w.shape == sims.shape and np.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()
    if sims.shape[0] and np.isfinite(sims[:, 0]).all():
        np.testing.assert_allclose(w[:, 0], 1.0)
    assert (w[~np.isfinite(sims)] == 0).all()
    assert (np.diff(w, axis=1) <= 1e-12).all()


def test_save_and_read_back(tmp_path):
    space = ProfileSpace.fit(_cells(), n_components=4, weight=2.0, temperature=0.1)
    entry = space.save(tmp_path)
    back = read_profile_space(tmp_path, entry)
    assert back is not None and back.weight == 2.0 and back.temperature == 0.1 and back.modality == "RNA"
    np.testing.assert_array_equal(back.components, space.components)
    assert read_profile_space(tmp_path, None) is None


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.floats(0.1, 10), st.integers(0, 2**31 - 1))
def test_weighted_mean_profile_is_the_plain_mean_for_equal_weights_and_agrees_dense_and_sparse(n, k, scale, seed):
    rng = np.random.default_rng(seed)
    values = rng.random((8, 3)).astype(np.float32)
    pos = rng.integers(-1, 8, size=(n, k))
    plain = mean_profile(values, pos)
    np.testing.assert_allclose(mean_profile(values, pos, weights=np.full((n, k), scale)), plain, rtol=1e-5)
    w = rng.random((n, k)).astype(np.float32) + 0.01
    dense = mean_profile(values, pos, weights=w)
    np.testing.assert_allclose(mean_profile(sp.csr_matrix(values), pos, weights=w), dense, rtol=1e-5)
    for i in range(n):
        ok = pos[i] >= 0
        if ok.any():
            expected = (w[i, ok, None] * values[pos[i, ok]]).sum(0) / w[i, ok].sum()
            np.testing.assert_allclose(dense[i], expected, rtol=1e-5)
        else:
            assert np.isnan(dense[i]).all()
    with pytest.raises(ValueError, match="weights"):
        mean_profile(values, pos, weights=np.ones((n, k + 1)))


def test_root_shards_carry_the_profile_index_and_search_it(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    vectors = rng.normal(size=(40, 5)).astype(np.float32)
    labels = {"l1": np.repeat(["a", "b"], 20), "l2": np.repeat(["a1", "a2", "b1", "b2"], 10)}
    profile = (["p"], rng.random((40, 1)).astype(np.float32))
    layout = build_hierarchy(emb, np.arange(40), labels, ["l1", "l2"], {"protein": profile}, np.full(40, "d"),
                             use_gpu=False, out_dir=tmp_path, profile_vectors=vectors)
    coarse = load_shard(tmp_path / "coarse")
    assert coarse.profile_index is not None and coarse.profile_index.ntotal == 40
    assert all(load_shard(tmp_path / n).profile_index is None for n in layout.shard_names() if n != "coarse")
    hits = search_shard(coarse, vectors[:3], 4, space="profiles")
    assert hits.position[:, 0].tolist() == [0, 1, 2]  # each cell is its own nearest in that space
    weights = np.ones((3, 4))
    _, sums, counts = shard_profile_sums(coarse, "protein", hits.position, weights * 2)
    np.testing.assert_allclose(sums / counts[:, None], profile[1][hits.position].mean(1), rtol=1e-5)
    fine = load_shard(tmp_path / layout.shard_names()[1])
    with pytest.raises(KeyError, match="no profile index"):
        search_shard(fine, vectors[:1, :], 1, space="profiles")
    with pytest.raises(ValueError, match="unknown search space"):
        search_shard(coarse, emb[:1], 1, space="pca")
    # Round trip of a shard without one, and a wrong-sized one refused.
    write_shard(tmp_path / "copy", fine)
    assert load_shard(tmp_path / "copy").profile_index is None
    with pytest.raises(ValueError, match="profile index has"):
        Shard("x", coarse.index, coarse.soma_joinid, {}, coarse.dataset_id, profile_index=fine.index)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.25, 4.0))
def test_a_query_without_pca_coordinates_ranks_profile_space_vectors_as_the_embedding_does(seed, weight):
    """An atlas that votes in its profile space indexes [embedding, PCA] vectors; a query lacking
    the PCA's genes is searched with a zero PCA block: its neighbours are the embedding's."""
    import faiss

    from atlas.index.faiss_index import normalize
    from atlas.mapping.query import search_vectors

    rng = np.random.default_rng(seed)
    space = ProfileSpace("RNA", np.zeros(6, np.float32), rng.normal(size=(4, 6)).astype(np.float32), weight=weight)
    emb_ref, coords_ref = rng.normal(size=(50, 8)), rng.normal(size=(50, 4))
    index = faiss.IndexFlatIP(12)
    index.add(space.vectors(emb_ref, coords_ref))
    emb_q = rng.normal(size=(5, 8)).astype(np.float32)
    sims, rows = index.search(search_vectors(space, None, emb_q), 10)
    cosine = normalize(emb_q) @ normalize(emb_ref).T
    expected = np.argsort(-cosine, axis=1)[:, :10]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(cosine, expected, 1) / np.sqrt(1 + weight**2), atol=1e-5)
    # With coordinates, the query is searched with its full profile-space vector.
    coords_q = rng.normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(search_vectors(space, coords_q, emb_q), space.vectors(emb_q, coords_q))
