"""Streaming cells from a real SOMA store through real Ray Data (and Ray Train workers)."""

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from atlas.data.batches import batch_to_dense, normalize_log1p
from atlas.data.dataset import (
    ExactlyOnceDataConfig,
    StreamConfig,
    build_plan,
    iter_batches,
    make_dataset,
    vocabulary_sizes,
)
from atlas.data.reader import open_experiment

pytestmark = [pytest.mark.real_data, pytest.mark.ray]

MOP_RNA = "mop_snareseq_c1_rna.h5ad"
MOP_ATAC = "mop_snareseq_c1_atac.h5ad"


def _expected(path: Path, cells: list[str], vocabulary: list[str]) -> sp.csr_matrix:
    """Normalised counts of the source file for ``cells``, columns in vocabulary order."""
    a = ad.read_h5ad(path)
    a = a[cells, vocabulary]
    x = sp.csr_matrix(a.X, dtype=np.float32)
    x.data = normalize_log1p(x.indptr, x.data)
    return x


def test_one_epoch_yields_every_cell_once_with_both_modalities_joined(mop_store, dataset, ray_local):
    config = StreamConfig(modalities=("RNA", "ATAC"), batch_size=128, block_size=2048, shuffle=True)
    plan = build_plan(mop_store, config)
    ds = make_dataset(plan)
    batches = list(iter_batches(ds, plan, shuffle_buffer=1024))
    joinids = np.concatenate([b["soma_joinid"].numpy() for b in batches])
    assert joinids.size == np.unique(joinids).size == open_experiment(plan.uri).obs.count == 10_309
    assert not np.array_equal(joinids, np.sort(joinids)), "shuffle had no effect"

    # Values equal the source's normalised counts, cell by cell, for both modalities.
    exp = open_experiment(plan.uri)
    obs = exp.obs.read(column_names=["soma_joinid", "cell_id"]).concat().to_pandas().set_index("soma_joinid")
    batch = batches[3]
    cells = obs.loc[batch["soma_joinid"].numpy(), "cell_id"].tolist()
    sizes = vocabulary_sizes(mop_store, ["RNA", "ATAC"])
    for modality, name in [("RNA", MOP_RNA), ("ATAC", MOP_ATAC)]:
        vocab = exp.ms[modality].var.read(column_names=["soma_joinid", "var_id"]).concat().to_pandas()
        vocab = vocab.sort_values("soma_joinid")["var_id"].tolist()
        assert len(vocab) == sizes[modality]
        expected = _expected(dataset(name), cells, vocab).toarray()
        np.testing.assert_allclose(batch_to_dense(batch, modality, sizes[modality]).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("single_domain", [False, True])
def test_label_codes_reach_the_batches_with_their_cells(mop_store, ray_local, single_domain):
    """Label heads learn from these codes: through Ray Data's blocks, the local shuffle buffer and
    single-domain slicing, every cell must keep its own label."""
    config = StreamConfig(modalities=("RNA",), batch_size=128, block_size=2048, shuffle=True,
                          single_domain=single_domain)
    plan = build_plan(mop_store, config, label_levels=("cell_type_coarse",))
    exp = open_experiment(plan.uri)
    obs = exp.obs.read(column_names=["soma_joinid", "cell_type_coarse"]).concat().to_pandas()
    truth = obs.set_index("soma_joinid")["cell_type_coarse"].astype(str)
    assert plan.label_classes == (tuple(sorted(set(truth) - {""})),)
    seen = 0
    for batch in iter_batches(make_dataset(plan), plan, shuffle_buffer=512):
        codes = batch["labels"].numpy()
        assert codes.shape == (batch["soma_joinid"].numel(), 1)
        names = np.asarray(plan.label_classes[0] + ("",))[codes[:, 0]]  # -1 → ""
        np.testing.assert_array_equal(names, truth.loc[batch["soma_joinid"].numpy()].to_numpy())
        seen += codes.shape[0]
    assert seen == 10_309


def test_single_domain_minibatches(mop_store, ray_local):
    config = StreamConfig(modalities=("RNA",), batch_size=64, block_size=1024, single_domain=True)
    plan = build_plan(mop_store, config)
    assert len(plan.domain_names) == 12
    seen = []
    for batch in iter_batches(make_dataset(plan), plan):
        assert batch["domain"].unique().numel() == 1
        assert batch["soma_joinid"].numel() <= 64
        seen.append(batch["soma_joinid"].numpy())
    seen = np.concatenate(seen)
    assert seen.size == np.unique(seen).size == 10_309


def test_each_cell_exactly_once_per_epoch_across_two_train_workers(mop_store, ray_local, tmp_path):
    """Both sources a build streams from — the store itself and its training snapshot — in one
    Ray Train run (one worker group: its start-up is most of this test's time)."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    plans = {("snapshot" if snapshot else "store"): build_plan(
        mop_store, StreamConfig(modalities=("RNA",), batch_size=100, block_size=777, snapshot=snapshot))
        for snapshot in (False, True)}
    out = tmp_path / "seen"
    out.mkdir()

    def loop(cfg):
        context = ray.train.get_context()
        for source, plan in cfg["plans"].items():
            shard = ray.train.get_dataset_shard(source)
            for epoch in range(2):
                ids = [b["soma_joinid"].tolist() for b in iter_batches(shard, plan, epoch=epoch, shuffle_buffer=500)]
                path = Path(cfg["out"]) / f"{source}_epoch{epoch}_rank{context.get_world_rank()}.json"
                path.write_text(json.dumps(sum(ids, [])))

    trainer = TorchTrainer(
        loop,
        train_loop_config={"plans": plans, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        datasets={source: make_dataset(plan) for source, plan in plans.items()},
        dataset_config=ExactlyOnceDataConfig(),
        run_config=RunConfig(name="exactly-once", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    for source in plans:
        orders = []
        for epoch in range(2):
            per_rank = [json.loads((out / f"{source}_epoch{epoch}_rank{r}.json").read_text()) for r in range(2)]
            assert all(len(ids) > 0 for ids in per_rank), f"{source}: a worker got no cells"
            everything = per_rank[0] + per_rank[1]
            assert len(everything) == len(set(everything)) == 10_309, source
            orders.append(per_rank[0])
        assert orders[0] != orders[1], f"{source}: both epochs came in the same order"


def test_tfidf_is_fitted_on_the_store_and_matches_the_formula(mop_store, dataset):
    from atlas.data.batches import fit_idf, tfidf_log1p
    from atlas.data.reader import read_block

    config = StreamConfig(modalities=("ATAC",), batch_size=256, block_size=2048, shuffle=False,
                          normalization={"ATAC": "tfidf"})
    plan = build_plan(mop_store, config)
    exp = open_experiment(plan.uri)
    vocab = exp.ms["ATAC"].var.read(column_names=["soma_joinid", "var_id"]).concat().to_pandas()
    vocab = vocab.sort_values("soma_joinid")["var_id"].tolist()
    source = ad.read_h5ad(dataset(MOP_ATAC))[:, vocab]
    counts = sp.csr_matrix(source.X, dtype=np.float32)
    np.testing.assert_allclose(plan.idf["ATAC"], fit_idf(counts), rtol=1e-6)  # streamed == in memory

    block = plan.blocks[0]
    table = next(read_block(plan, block))
    obs = exp.obs.read(column_names=["soma_joinid", "cell_id"]).concat().to_pandas().set_index("soma_joinid")
    cells = obs.loc[table.column("soma_joinid").to_numpy(), "cell_id"].tolist()
    expected = sp.csr_matrix(source[cells].X, dtype=np.float32)
    expected.data = tfidf_log1p(expected.indptr, expected.indices, expected.data, plan.idf["ATAC"])
    from atlas.data.collate import table_to_batch

    batch = table_to_batch(table, ("ATAC",))
    np.testing.assert_allclose(batch_to_dense(batch, "ATAC", len(vocab)).numpy(), expected.toarray(), rtol=1e-5, atol=1e-6)
