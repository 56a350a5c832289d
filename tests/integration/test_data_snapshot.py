"""The training snapshot (atlas.data.snapshot) against the store it copies: real SOMA, real zarr,
real Ray Data."""

import os

import numpy as np
import pytest
import zarr

from atlas.data.arrow import list_column_csr
from atlas.data.dataset import StreamConfig, build_plan, iter_batches, make_dataset
from atlas.data.reader import read_block
from atlas.data.snapshot import SNAPSHOTS, ensure_snapshot, epoch_blocks, snapshot_key

pytestmark = [pytest.mark.real_data]

N_CELLS = 10_309


def _cells(plan, blocks):
    """joinid → (domain, labels, {modality: (ids, values)}) of every cell the blocks emit."""
    out = {}
    for block in blocks:
        for table in read_block(plan, block):
            if plan.single_domain:
                assert len(set(table.column("domain").to_pylist())) == 1, "a minibatch mixed domains"
            columns = {}
            for m in plan.modalities:
                columns[m] = (list_column_csr(table.column(f"{m}_ids")), list_column_csr(table.column(f"{m}_values"))[1])
            labels = table.column("labels").to_pylist() if plan.label_levels else None
            for i, joinid in enumerate(table.column("soma_joinid").to_pylist()):
                assert joinid not in out, f"cell {joinid} came twice in one epoch"
                values = {m: (ids[ptr[i]:ptr[i + 1]].tolist(), vals[ptr[i]:ptr[i + 1]])
                          for m, ((ptr, ids), vals) in columns.items()}
                out[joinid] = (table.column("domain")[i].as_py(), None if labels is None else labels[i], values)
    return out


@pytest.mark.parametrize("single_domain", [False, True])
def test_every_epoch_holds_every_cell_once_with_the_stores_values(mop_store, single_domain):
    kwargs = dict(modalities=("RNA", "ATAC"), batch_size=128, block_size=2048, shuffle=True,
                  single_domain=single_domain, normalization={"ATAC": "tfidf"})
    direct = build_plan(mop_store, StreamConfig(**kwargs), label_levels=("cell_type_coarse",))
    snap = build_plan(mop_store, StreamConfig(**kwargs, snapshot=True, snapshot_chunk_size=100),
                      label_levels=("cell_type_coarse",))
    assert snap.snapshot is not None and direct.snapshot is None
    assert os.path.dirname(snap.snapshot) == str(mop_store / SNAPSHOTS)
    truth = _cells(direct, direct.blocks)
    assert len(truth) == N_CELLS
    orders = []
    for epoch in range(2):
        blocks = epoch_blocks(snap, epoch)
        got = _cells(snap, blocks)
        assert got.keys() == truth.keys()
        for joinid in list(truth)[::97]:
            domain, labels, values = got[joinid]
            assert (domain, labels) == truth[joinid][:2]
            for m in ("RNA", "ATAC"):
                assert values[m][0] == truth[joinid][2][m][0]
                np.testing.assert_allclose(values[m][1], truth[joinid][2][m][1], rtol=1e-6)
        orders.append(np.concatenate([b.joinids for b in blocks]))
    assert not np.array_equal(orders[0], orders[1]), "two epochs in the same order"


def test_a_snapshot_is_written_once_and_reused(mop_store):
    config = StreamConfig(modalities=("RNA",), batch_size=64, block_size=1024, snapshot=True)
    messages = []
    first = build_plan(mop_store, config, log=messages.append)
    written = os.path.getmtime(os.path.join(first.snapshot, "zarr.json"))
    again = build_plan(mop_store, config, log=messages.append)
    assert again.snapshot == first.snapshot
    assert os.path.getmtime(os.path.join(again.snapshot, "zarr.json")) == written
    assert any("reusing" in m for m in messages)
    # Another selection of cells is another snapshot.
    other = build_plan(mop_store, StreamConfig(modalities=("RNA",), snapshot=True, obs_filter="batch == '09A'"))
    assert other.snapshot != first.snapshot and other.n_cells < N_CELLS


def test_an_unfinished_snapshot_is_never_read(mop_store):
    plan = build_plan(mop_store, StreamConfig(modalities=("RNA",), batch_size=64, block_size=1024))
    location = mop_store / "unfinished"
    target = location / snapshot_key(plan, 0)
    # What a write killed before its last step leaves: a group without ``complete``.
    group = zarr.open_group(str(target), mode="w")
    group.create_array("soma_joinid", data=np.zeros(3, np.int64))
    path = ensure_snapshot(plan, location)
    assert path == target
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs["complete"] and group["soma_joinid"].shape == (N_CELLS,)
    assert not list(location.glob(".writing-*"))


@pytest.mark.ray
def test_ray_data_streams_single_domain_minibatches_from_a_snapshot(mop_store, ray_local):
    config = StreamConfig(modalities=("RNA",), batch_size=64, block_size=1024, single_domain=True, snapshot=True)
    plan = build_plan(mop_store, config, label_levels=("cell_type_coarse",))
    ds = make_dataset(plan)
    for epoch in range(2):
        seen = []
        for batch in iter_batches(ds, plan, epoch=epoch):
            assert batch["domain"].unique().numel() == 1
            assert batch["soma_joinid"].numel() <= 64
            assert batch["labels"].shape == (batch["soma_joinid"].numel(), 1)
            seen.append(batch["soma_joinid"].numpy())
        seen = np.concatenate(seen)
        assert seen.size == np.unique(seen).size == N_CELLS


def test_a_snapshot_that_cannot_be_written_says_what_to_do(mop_store, tmp_path):
    from atlas.errors import AtlasError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = StreamConfig(modalities=("RNA",), snapshot=True, snapshot_dir=str(blocker / "snapshots"))
    with pytest.raises(AtlasError, match="data.snapshot_dir another folder, or set data.snapshot: false"):
        build_plan(mop_store, config)
