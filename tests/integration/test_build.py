"""The distributed atlas build on real Ray, a real SOMA store and real faiss, with real data."""

import json
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import psutil
import pytest
import scipy.sparse as sp
import torch
import yaml

import atlas
from atlas.build import build_atlas
from atlas.data.batches import csr_to_batch, normalize_log1p
from atlas.data.dataset import build_plan, vocabulary_sizes
from atlas.data.reader import open_experiment
from atlas.local_cluster import local_head, submit_job
from atlas.mapping import MappingError, map_query
from atlas.models.recalibrate import DomainStatistics
from atlas.store.embeddings import read_embedding
from atlas.store.ingest import ingest
from atlas.store.versions import current_version
from atlas.train.config import build_config_from_dict
from atlas.train.trainer import train

pytestmark = [pytest.mark.real_data, pytest.mark.ray]

PBMC10K = "pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"
MOP_RNA, MOP_ATAC = "mop_snareseq_c1_rna.h5ad", "mop_snareseq_c1_atac.h5ad"
REPO = Path(__file__).resolve().parents[2]


def _subset(adata: ad.AnnData, n: int, seed: int = 0) -> ad.AnnData:
    rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, n, replace=False))
    return adata[rows].copy()


@pytest.fixture(scope="module")
def pbmc(dataset, tmp_path_factory):
    """A 2,000-cell pbmc10k store (RNA + protein, two label levels) and its source cells."""
    cells = _subset(ad.read_h5ad(dataset(PBMC10K)), 2000)
    store = tmp_path_factory.mktemp("build") / "pbmc"
    ingest(store, cells, dataset_id="pbmc10k", obsm_modalities={"protein": "protein_counts"},
           label_keys={"cell_type_l1": "cell_type_l1", "cell_type_l2": "cell_type_l2"}, species="human")
    return store, cells


def _concerto_config(store, output, tmp, **overrides):
    config = {
        "name": "test-concerto", "store": str(store), "output": str(output),
        "model": {"model": "concerto", "modalities": ["RNA"], "embed_dim": 32},
        "data": {"batch_size": 64, "single_domain": True},
        "train": {"epochs": 1, "lr": 1e-3, "checkpoint_every": 10},
        "scaling": {"num_workers": 2, "use_gpu": False},
        "run": {"storage_path": str(tmp / "runs"), "max_failures": 2},
        "index": {"levels": ["cell_type_l1", "cell_type_l2"], "profiles": ["protein"]},
    }
    for section, values in overrides.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return build_config_from_dict(config)


@pytest.fixture(scope="module")
def concerto_build(pbmc, tmp_path_factory):
    """One 2-worker Concerto build on the pbmc store, shared by the tests that inspect it."""
    from tests.conftest import _init_local_ray

    _init_local_ray()
    store, _ = pbmc
    tmp = tmp_path_factory.mktemp("concerto")
    # Trained from the training snapshot (the other builds here read the store directly).
    return build_atlas(_concerto_config(store, tmp / "artifact", tmp, data={"snapshot": True}))


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


def test_cvqvae_build_submitted_with_ray_job_submit(dataset, tmp_path):
    """`ray job submit` to a local `ray start --head` (token authentication on)."""
    rna = _subset(ad.read_h5ad(dataset(MOP_RNA)), 2000)
    atac = ad.read_h5ad(dataset(MOP_ATAC))[rna.obs_names].copy()
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
    full_rna = ad.read_h5ad(dataset(MOP_RNA))
    others = np.setdiff1d(np.arange(full_rna.n_obs), np.flatnonzero(full_rna.obs_names.isin(rna.obs_names)))
    query = full_rna[np.random.default_rng(1).choice(others, 100, replace=False)].copy()
    out = map_query(query, built, predict=["ATAC"], predict_method="decoder")
    atac_pred = out.obsm["ATAC_pred"]
    assert list(atac_pred.columns) == built.vocabulary["ATAC"] and np.isfinite(atac_pred.to_numpy()).all()
    measured = ad.read_h5ad(dataset(MOP_ATAC))[query.obs_names]
    measured = sp.csr_matrix(measured.X, dtype=np.float32)
    measured.data = normalize_log1p(measured.indptr, measured.data)
    per_cell = [np.corrcoef(atac_pred.to_numpy()[i], measured[i].toarray().ravel())[0, 1] for i in range(100)]
    assert np.nanmean(per_cell) > 0.05  # the decoder's accessibility profile follows the measured one
    with pytest.raises(MappingError, match="stores no ATAC profiles"):
        map_query(query, built, predict=["ATAC"], predict_method="knn")


def test_multi_node_training_places_workers_on_different_nodes(pbmc, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    store, _ = pbmc
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, resources={"trainer_slot": 1})
        ray.init(address=cluster.address)
        build = _concerto_config(store, tmp_path / "artifact", tmp_path, name="test-multinode",
                                 scaling={"resources_per_worker": {"CPU": 1, "trainer_slot": 1}})
        plan = build_plan(store, build.data)
        result = train(build, plan, vocabulary_sizes(store, ["RNA"]))
        nodes = result.history["worker_nodes"]
        assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
        assert result.history["epochs"][0]["cells"] == 2000
    finally:
        ray.shutdown()
        cluster.shutdown()


def _registered_checkpoints(run: Path) -> list:
    """Checkpoints Ray Train has registered (a checkpoint folder alone may still be uploading)."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("checkpoint_results", [])
    except (OSError, ValueError):
        return []


def _train_worker_pids(started_after: float) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline", "create_time"])
            if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::RayTrainWorker")
            and p.info["create_time"] >= started_after]


def test_killed_worker_resumes_from_last_checkpoint(pbmc, ray_local, tmp_path):
    store, _ = pbmc
    build = _concerto_config(store, tmp_path / "artifact", tmp_path, name="test-fault",
                             train={"epochs": 2, "checkpoint_every": 8})
    plan = build_plan(store, build.data)
    sizes = vocabulary_sizes(store, ["RNA"])
    baseline = train(build, plan, sizes)

    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=train(build, plan, sizes)))
    started = time.time()
    runner.start()
    deadline = time.monotonic() + 300
    killed = None
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        runs = [r for r in (tmp_path / "runs").glob("test-fault-*") if r.name != Path(baseline.run_path).name]
        workers = _train_worker_pids(started)
        if runs and _registered_checkpoints(runs[0]) and workers:
            killed = workers[-1]
            psutil.Process(killed).kill()
        time.sleep(0.5)
    runner.join(timeout=600)
    assert killed is not None, "training ended before a checkpoint could be interrupted"
    result = outcome["result"]
    assert result.history.get("resumes"), "the run did not resume from a checkpoint"
    assert len(result.history["epochs"]) == 2
    final, reference = result.history["epochs"][-1]["loss"], baseline.history["epochs"][-1]["loss"]
    assert abs(final - reference) < 0.1 * reference, (final, reference)
