"""faiss index layer: exact search equals brute force, approximate indexes keep recall, files round trip."""

import faiss
import numpy as np
import pytest

from atlas.index import TorchFlatIndex, build_index, index_kind, load_index, merge_topk, save_index, search
from atlas.index.faiss_index import RECALL_K, TARGET_RECALL, _want_gpu, ivf_nlist, tune_nprobe

faiss.omp_set_num_threads(2)


def _cosine_topk(ref: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    r = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    qq = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qq @ r.T
    pos = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, pos, axis=1), pos


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, d)) * 3
    return (centres[rng.integers(50, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def clustered():
    x = _clustered(20_000, 32, seed=1)
    rng = np.random.default_rng(2)
    queries = x[rng.choice(len(x), 200, replace=False)] + rng.normal(scale=0.3, size=(200, 32)).astype(np.float32)
    _, exact = _cosine_topk(x, queries, 10)
    return x, queries, exact


def test_flat_equals_bruteforce_cosine():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(500, 16)).astype(np.float32) * rng.uniform(0.1, 5, size=(500, 1)).astype(np.float32)
    q = rng.normal(size=(40, 16)).astype(np.float32)
    index = build_index(ref, kind="auto", use_gpu=False)
    assert index_kind(index) == "flat"
    sims, pos = search(index, q, 7)
    want_sims, want_pos = _cosine_topk(ref, q, 7)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    assert sims.dtype == np.float32 and pos.dtype == np.int64


def test_input_is_not_modified_and_k_is_capped():
    x = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    before = x.copy()
    index = build_index(x, kind="flat", use_gpu=False)
    np.testing.assert_array_equal(x, before)
    sims, pos = search(index, x[:2], 10)
    assert pos.shape == (2, 4) and sorted(pos[0]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="dimensions"):
        search(index, np.ones((1, 5), np.float32), 2)


def test_auto_switches_to_ivf_above_exact_below():
    x = _clustered(2_000, 8, seed=3)
    index = build_index(x, exact_below=1_000, use_gpu=False)
    assert index_kind(index) == "ivf"
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nlist == ivf_nlist(2_000) and 1 <= ivf.nprobe <= ivf.nlist


def test_ivf_probes_the_fewest_lists_that_reach_the_target_recall(clustered):
    """Tuned at build on reference cells' nearest other cells: the chosen probe count reaches the
    target there, half of it does not, and new cells near the reference are found as well."""
    x, queries, exact = clustered
    index = build_index(x, kind="ivf", use_gpu=False, seed=0)
    ivf = faiss.extract_index_ivf(index)
    chosen = ivf.nprobe
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    rows = np.sort(np.random.default_rng(0).choice(len(x), 1000, replace=False))
    _, truth = _cosine_topk(x, x[rows], RECALL_K + 1)

    def recall_at(nprobe):
        ivf.nprobe = nprobe
        _, found = search(index, unit[rows], RECALL_K + 1)
        return np.mean([len((set(a) & set(b)) - {r}) / RECALL_K for a, b, r in zip(found, truth, rows)])

    assert recall_at(chosen) >= TARGET_RECALL
    if chosen > 1:
        assert recall_at(chosen // 2) < TARGET_RECALL
    assert tune_nprobe(index, unit, seed=0)[0] == chosen  # reproducible
    _, pos = search(index, queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(pos, exact)]) >= 0.95
    # An explicit nprobe is kept as given.
    assert faiss.extract_index_ivf(build_index(x, kind="ivf", use_gpu=False, nprobe=3)).nprobe == 3
    # A tiny index: every list if nothing less reaches the target.
    small = build_index(x[:100], kind="ivf", use_gpu=False, nlist=2)
    assert faiss.extract_index_ivf(small).nprobe in (1, 2)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_at_10(clustered, kind, tmp_path):
    x, queries, exact = clustered
    index = build_index(x, kind=kind, use_gpu=False, seed=0)
    assert index_kind(index) == kind
    _, pos = search(index, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(pos, exact)])
    assert recall >= 0.9, f"{kind} recall@10 = {recall:.3f}"

    # The search parameters (nprobe / efSearch) travel inside the file: same answers after a reload.
    save_index(index, tmp_path / "index.faiss")
    loaded = load_index(tmp_path / "index.faiss")
    np.testing.assert_array_equal(search(loaded, queries, 10)[1], pos)


def test_ivf_build_is_reproducible_with_a_seed():
    x = _clustered(3_000, 8, seed=4)
    a = search(build_index(x, kind="ivf", use_gpu=False, seed=5), x[:50], 5)[1]
    b = search(build_index(x, kind="ivf", use_gpu=False, seed=5), x[:50], 5)[1]
    np.testing.assert_array_equal(a, b)


def test_flat_save_load_round_trip(tmp_path):
    x = _clustered(300, 8, seed=5)
    index = build_index(x, kind="flat", use_gpu=False)
    save_index(index, tmp_path / "i.faiss")
    loaded = load_index(tmp_path / "i.faiss")
    assert loaded.ntotal == 300 and index_kind(loaded) == "flat"
    for a, b in zip(search(index, x[:5], 3), search(loaded, x[:5], 3)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError):
        load_index(tmp_path / "nope.faiss")


def test_torch_fallback_matches_faiss_flat(tmp_path):
    x = _clustered(400, 8, seed=6)
    flat = build_index(x, kind="flat", use_gpu=False)
    vectors = flat.reconstruct_n(0, flat.ntotal)
    torch_index = TorchFlatIndex(vectors, device="cpu")
    assert index_kind(torch_index) == "flat"
    sims_t, pos_t = search(torch_index, x[:20], 5)
    sims_f, pos_f = search(flat, x[:20], 5)
    np.testing.assert_array_equal(pos_t, pos_f)
    np.testing.assert_allclose(sims_t, sims_f, atol=1e-5)
    save_index(torch_index, tmp_path / "t.faiss")  # saved in faiss form
    np.testing.assert_array_equal(search(load_index(tmp_path / "t.faiss"), x[:20], 5)[1], pos_f)


def test_merge_topk_equals_search_over_the_union():
    x = _clustered(600, 8, seed=7)
    q = x[:10]
    parts = [np.arange(0, 250), np.arange(250, 600)]
    results = [search(build_index(x[p], kind="flat", use_gpu=False), q, 6) for p in parts]
    sims, pos, src = merge_topk(results, 6)
    global_pos = np.where(src == 0, parts[0][0] + pos, parts[1][0] + pos)
    want_sims, want_pos = search(build_index(x, kind="flat", use_gpu=False), q, 6)
    np.testing.assert_array_equal(global_pos, want_pos)
    np.testing.assert_allclose(sims, want_sims, atol=1e-6)


@pytest.mark.skipif(
    _want_gpu(None) is not None,
    reason="asserts the error a machine without any GPU gives for use_gpu=True; where faiss or "
           "torch sees a GPU, a GPU index is built instead",
)
def test_use_gpu_true_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no GPU"):
        build_index(np.ones((3, 2), np.float32), use_gpu=True)
