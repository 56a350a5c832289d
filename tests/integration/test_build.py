"""The distributed atlas build on real Ray, a real SOMA store and real faiss, with real data.

The other builds: ``test_build_job_submit.py`` (CVQVAE via ``ray job submit``),
``test_build_multinode.py`` and ``test_build_fault.py`` (a killed worker).
"""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import atlas
from atlas.build import build_atlas
from atlas.data.batches import csr_to_batch, normalize_log1p
from atlas.data.reader import open_experiment
from atlas.models.recalibrate import DomainStatistics
from atlas.store.embeddings import read_embedding
from atlas.store.versions import current_version
from tests.build_helpers import concerto_config

pytestmark = [pytest.mark.real_data, pytest.mark.ray]


@pytest.fixture(scope="module")
def concerto_build(pbmc, tmp_path_factory):
    """One 2-worker Concerto build on the pbmc store, shared by the tests that inspect it."""
    from tests.conftest import _init_local_ray

    _init_local_ray()
    store, _ = pbmc
    tmp = tmp_path_factory.mktemp("concerto")
    # Trained from the training snapshot (the other builds here read the store directly).
    return build_atlas(concerto_config(store, tmp / "artifact", tmp, data={"snapshot": True}))


def test_two_worker_concerto_build_produces_a_verified_artifact(pbmc, concerto_build):
    store, cells = pbmc
    summary = concerto_build
    atlas_ = atlas.load_atlas(summary.artifact)
    manifest = atlas_.manifest

    n = open_experiment(current_version(store).uri).obs.count
    assert summary.cells == manifest["metrics"]["cells"] == n
    assert manifest["store"]["version"] == 1 and manifest["store"]["embedding_version"] == 2
    assert manifest["build_config"]["model"]["model"] == "concerto"
    history = manifest["extra"]["history"]
    assert len(history["worker_nodes"]) == 2
    assert history["epochs"][0]["cells"] == n  # every cell once in the epoch, over both workers
    assert manifest["build_config"]["data"]["snapshot"] is True
    assert len([p for p in (store / "snapshots").iterdir() if not p.name.startswith(".")]) == 1

    # Coarse index over every cell + one fine shard per level-1 group.
    groups = {g for g in cells.obs["cell_type_l1"].astype(str).unique() if g not in ("", "nan")}
    fine = {node.group[-1] for node in atlas_.layout.nodes if node.level == "cell_type_l2"}
    assert atlas_.layout.root.n_cells == n and fine <= groups and len(fine) >= len(groups) - 1

    # The embedding written back to the store is the one the index was made of (below), and the
    # artifact's model reproduces it from the source counts (normalisation and vocabulary agree).
    joinids, stored, meta = read_embedding(current_version(store).uri, "RNA", "atlas_test-concerto")
    assert meta["atlas_version"] == atlas_.version and joinids.size == n
    coarse = atlas_.shard("coarse")
    order = np.argsort(coarse.soma_joinid)

    model = atlas_.model()
    # Its normalisation statistics are the trained model's exact ones over the reference, not the
    # moving averages two workers kept during training (those cost 13 points on ADTnorm).
    everything = csr_to_batch({"RNA": sp.csr_matrix(cells.X, dtype=np.float32)}, domain=np.zeros(n))
    exact = DomainStatistics(model)
    with exact.recording():
        model.embed(everything)
    for name, layer in exact.layers.items():  # teacher and student: both embed the cells
        mean = exact.sum[name][0] / exact.count[name][0]
        np.testing.assert_allclose(layer.running_mean[0].numpy(), mean.numpy(), rtol=1e-3, atol=1e-6)
    # The index levels' labels reached the workers: one head per level, trained (head loss
    # logged), and the heads mapping applies (heads.npz, numpy) are the model's. (One epoch of
    # 16 steps per worker barely moves them; benchmarks/quality.py measures what they learn.)
    heads = manifest["model"]["heads"]
    assert heads["levels"] == ["cell_type_l1", "cell_type_l2"]
    truth = cells.obs["cell_type_l1"].astype(str).to_numpy()
    assert heads["classes"][0] == sorted(set(truth) - {"", "nan"})
    assert all("head_loss" in step for step in history["steps"])
    embedding = np.asarray(stored, dtype=np.float32)
    in_model = model.head_probabilities(torch.from_numpy(embedding))
    in_artifact = atlas_.heads().probabilities(embedding)
    for level, p in zip(heads["levels"], in_model):
        np.testing.assert_allclose(in_artifact[level], p.numpy(), rtol=1e-4, atol=1e-6)
    # The teacher + student embedding's confidence is vote share x head probability: no distance
    # term (validated by leaving whole types out; see atlas/build.py::_calibrate).
    assert "typical_similarity" not in manifest["mapping"]
    # The vote is weighted by label rarity from the indexed cells' own counts.
    balance = manifest["mapping"]["vote_balance"]
    assert balance["power"] == 0.5
    labelled = truth[(truth != "") & (truth != "nan")]
    assert balance["counts"]["cell_type_l1"] == dict(zip(*np.unique(labelled, return_counts=True)))
    sample = np.arange(0, n, 97)
    counts = sp.csr_matrix(cells.X[sample], dtype=np.float32)
    with torch.no_grad():
        again = model.embed(csr_to_batch({"RNA": counts}, domain=np.zeros(sample.size))).numpy()
    np.testing.assert_allclose(again, stored[sample], rtol=1e-4, atol=1e-4)

    # Protein profiles in the shard are the cells' normalised protein values.
    features, values = coarse.profiles["protein"]
    protein = cells.obsm["protein_counts"]
    assert features == list(protein.columns)
    expected = sp.csr_matrix(np.asarray(protein, dtype=np.float32))
    expected.data = normalize_log1p(expected.indptr, expected.data)
    np.testing.assert_allclose(values[order], expected.toarray(), rtol=1e-5, atol=1e-5)

    # The profile space: a PCA of the cells' normalised RNA (fitted on all 2,000, fewer than the
    # cap); labels are voted in it (label_space "auto" → "profiles" for an RNA Concerto), so every
    # shard's index holds each cell's embedding beside its PCA coordinates, and no second index.
    space = atlas_.profile_space()
    assert manifest["build_config"]["index"]["label_space"] == "profiles"
    assert manifest["mapping"]["profile_space"]["components"] == space.components.shape[0] == 50
    assert manifest["mapping"]["profile_space"]["labels"] is True
    rna = sp.csr_matrix(cells.X, dtype=np.float32)
    rna.data = normalize_log1p(rna.indptr, rna.data)
    np.testing.assert_allclose(space.mean, np.asarray(rna.mean(0)).ravel(), rtol=1e-4, atol=1e-5)
    coords = space.project(rna)
    in_index = coarse.index.reconstruct_n(0, n)[order]
    np.testing.assert_allclose(in_index, space.vectors(stored, coords), atol=1e-4)
    assert all(atlas_.shard(s).profile_index is None for s in atlas_.shard_names())


def test_tampered_artifact_is_refused(concerto_build, tmp_path):
    import shutil

    copy = tmp_path / "artifact"
    shutil.copytree(concerto_build.artifact, copy)
    atlas.load_atlas(copy)  # the untouched copy verifies
    target = copy / "model.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(atlas.ArtifactError, match="model.pt"):
        atlas.load_atlas(copy)
