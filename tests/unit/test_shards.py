"""Shards and the hierarchy: routing by label, self-retrieval, hash coverage, files round trip."""

import faiss
import numpy as np
import pytest
import scipy.sparse as sp

from atlas.index import Shard, ShardLayout, build_hierarchy, build_index, load_shard, search
from atlas.index.shards import clean_labels, hash_bucket, safe_name

faiss.omp_set_num_threads(2)

N = 400


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(N, 8)).astype(np.float32)
    l1 = rng.choice(np.array(["T cell", "B cell", "NK/ILC", ""], dtype=object), N)
    l1[:5] = None  # NA counts as missing, like ""
    l2 = np.array([f"{a}-{i % 2}" if a else "" for a, i in zip(l1, range(N))], dtype=object)
    l2[::9] = ""
    l3 = np.array([f"{b}.x{i % 3}" if b else "" for b, i in zip(l2, range(N))], dtype=object)
    profiles = {
        "protein": (["CD3", "CD19"], rng.normal(size=(N, 2)).astype(np.float32)),
        "ATAC": ([f"chr1_{i}" for i in range(30)], sp.random(N, 30, density=0.1, format="csr", random_state=0)),
    }
    return {
        "emb": emb,
        "joinids": np.arange(N, dtype=np.int64) + 10_000,
        "labels": {"l1": l1, "l2": l2, "l3": l3},
        "profiles": profiles,
        "datasets": np.where(np.arange(N) % 2, "dsA", "dsB"),
    }


def _build(ref, levels, **kw):
    return build_hierarchy(ref["emb"], ref["joinids"], ref["labels"], levels, ref["profiles"],
                           ref["datasets"], use_gpu=False, **kw)


def test_two_level_hierarchy_routes_cells_to_their_group(reference):
    layout = _build(reference, ["l1", "l2"])
    l1 = clean_labels(reference["labels"]["l1"])
    assert layout.mode == "hierarchy" and layout.root.name == "coarse" and layout.root.level == "l1"

    coarse = layout.shards["coarse"]
    assert coarse.n_cells == N and set(coarse.labels) == {"l1", "l2"}
    np.testing.assert_array_equal(coarse.soma_joinid, reference["joinids"])
    assert (coarse.labels["l1"] == "").sum() == (l1 == "").sum() > 5  # unlabelled cells stay as neighbours

    children = layout.children("coarse")
    assert set(children) == {"T cell", "B cell", "NK/ILC"}
    for value, node in children.items():
        assert node.level == "l2" and node.parent == "coarse" and node.group == (value,)
        shard = layout.shards[node.shards[0]]
        want = reference["joinids"][l1 == value]
        np.testing.assert_array_equal(np.sort(shard.soma_joinid), want)
        assert set(shard.labels) == {"l2"}  # fine shards carry the deeper levels
        assert shard.profiles["protein"][1].shape == (len(want), 2)
        # A reference cell's own embedding finds itself first in its group's shard.
        rows = np.searchsorted(reference["joinids"], shard.soma_joinid)
        _, pos = search(shard.index, reference["emb"][rows], 3)
        np.testing.assert_array_equal(shard.soma_joinid[pos[:, 0]], shard.soma_joinid)
    assert layout.child("coarse", "NK/ILC").name == "fine/NK_ILC"
    assert layout.child("coarse", "unknown") is None


def test_three_levels_nest_by_parent_path(reference):
    layout = _build(reference, ["l1", "l2", "l3"])
    level3 = [n for n in layout.nodes if n.level == "l3"]
    assert level3 and all(n.parent.startswith("fine/") and n.name.startswith(n.parent + "/") for n in level3)
    node = layout.child("fine/T_cell", "T cell-1")
    assert node.group == ("T cell", "T cell-1") and node.name == "fine/T_cell/T_cell-1"
    shard = layout.shards[node.shards[0]]
    l2 = clean_labels(reference["labels"]["l2"])
    np.testing.assert_array_equal(np.sort(shard.soma_joinid), reference["joinids"][l2 == "T cell-1"])
    assert set(shard.labels) == {"l3"}


def test_group_without_next_level_labels_gets_no_shard():
    emb = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    layout = build_hierarchy(emb, np.arange(6), {"a": ["x", "x", "y", "y", "y", ""], "b": ["x1", "", "", "", "", ""]},
                             ["a", "b"], None, ["d"] * 6, use_gpu=False)
    assert [n.name for n in layout.nodes] == ["coarse", "fine/x"]


def test_hash_shards_cover_each_cell_once(reference):
    layout = _build(reference, None, n_hash_shards=3)
    assert layout.mode == "hash" and layout.root.shards == ("hash/0", "hash/1", "hash/2")
    ids = np.concatenate([layout.shards[s].soma_joinid for s in layout.root.shards])
    np.testing.assert_array_equal(np.sort(ids), reference["joinids"])
    assert all(layout.shards[s].n_cells > N / 6 for s in layout.root.shards)  # roughly balanced
    assert set(layout.shards["hash/0"].labels) == {"l1", "l2", "l3"}
    # More cells than max_shard_cells allows: more hash shards.
    assert len(_build(reference, None, n_hash_shards=1, max_shard_cells=150).root.shards) == 3


def test_max_shard_cells_splits_a_large_group(reference):
    layout = _build(reference, ["l1", "l2"], max_shard_cells=60)
    coarse = layout.root
    assert len(coarse.shards) == -(-N // 60) and coarse.shards[0] == "coarse/part-0"
    ids = np.concatenate([layout.shards[s].soma_joinid for s in coarse.shards])
    np.testing.assert_array_equal(np.sort(ids), reference["joinids"])


def test_write_load_round_trip(reference, tmp_path):
    layout = _build(reference, ["l1", "l2"], out_dir=tmp_path)
    assert layout.shards == {}  # written, not kept in memory
    assert ShardLayout.read(tmp_path) == layout
    in_memory = _build(reference, ["l1", "l2"])
    for name in layout.shard_names():
        loaded, want = load_shard(tmp_path / name), in_memory.shards[name]
        assert (loaded.name, loaded.level, loaded.group) == (want.name, want.level, want.group)
        np.testing.assert_array_equal(loaded.soma_joinid, want.soma_joinid)
        np.testing.assert_array_equal(loaded.dataset_id, want.dataset_id)
        for level in want.labels:
            np.testing.assert_array_equal(loaded.labels[level], want.labels[level])
        np.testing.assert_array_equal(loaded.profiles["protein"][1], want.profiles["protein"][1])
        assert loaded.profiles["ATAC"][0] == want.profiles["ATAC"][0]
        assert sp.issparse(loaded.profiles["ATAC"][1])
        assert (loaded.profiles["ATAC"][1] != want.profiles["ATAC"][1]).nnz == 0
        q = reference["emb"][:5]
        np.testing.assert_array_equal(search(loaded.index, q, 4)[1], search(want.index, q, 4)[1])
    only = load_shard(tmp_path / "coarse", modalities=["protein"])
    assert set(only.profiles) == {"protein"}
    assert (tmp_path / "fine/NK_ILC/shard.json").is_file()


def test_an_ivf_shard_says_how_many_lists_it_probes(reference, tmp_path):
    import json

    _build(reference, ["l1"], out_dir=tmp_path, index_kind="ivf")
    meta = json.loads((tmp_path / "coarse" / "shard.json").read_text())
    index = load_shard(tmp_path / "coarse").index
    assert meta["index_kind"] == "ivf"
    assert meta["search"] == {"nprobe": faiss.extract_index_ivf(index).nprobe}


def test_shard_checks_lengths_and_reserved_names():
    index = build_index(np.eye(3, dtype=np.float32), use_gpu=False)
    ok = dict(name="s", index=index, soma_joinid=np.arange(3), dataset_id=np.array(["d"] * 3))
    with pytest.raises(ValueError, match="labels"):
        Shard(labels={"l1": np.array(["a"])}, **ok)
    with pytest.raises(ValueError, match="may not be named"):
        Shard(labels={"dataset_id": np.array(["a"] * 3)}, **ok)
    with pytest.raises(ValueError, match="profile"):
        Shard(labels={}, profiles={"protein": (["a", "b"], np.zeros((3, 1), np.float32))}, **ok)


def test_names_and_hashing_helpers():
    assert safe_name("CD4+ T cell") == "CD4_T_cell" and safe_name("../x") == "x"
    assert safe_name("part-1") == "part-1_" and safe_name("profiles") == "profiles_"
    np.testing.assert_array_equal(clean_labels(["a", None, np.nan, ""]), ["a", "", "", ""])
    b = hash_bucket(np.arange(1000), 4)
    np.testing.assert_array_equal(b, hash_bucket(np.arange(1000), 4))  # stable
    assert np.bincount(b).min() > 200
    # Labels that collide after cleaning get distinct folders.
    emb = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
    layout = build_hierarchy(emb, np.arange(4), {"a": ["CD4+", "CD4-", "CD4+", "CD4-"], "b": ["p", "q", "r", "s"]},
                             ["a", "b"], None, ["d"] * 4, use_gpu=False)
    fine = [n.name for n in layout.nodes[1:]]
    assert len(set(fine)) == 2 and all(f.startswith("fine/CD4-") for f in fine)
