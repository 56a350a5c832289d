"""Reading rows of a training snapshot (atlas.data.snapshot.read_rows) and cutting epochs
(epoch_blocks): properties against scipy's CSR row indexing and a plain exactly-once check."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import given
from hypothesis import strategies as st

from atlas.data.plan import ReadBlock, ReadPlan
from atlas.data.snapshot import epoch_blocks, read_rows

N_ROWS = 40


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A snapshot's CSR arrays with empty rows first, last and in between, and chunks smaller than
    most rows' runs (so reads cross chunk boundaries)."""
    rng = np.random.default_rng(0)
    dense = (rng.random((N_ROWS, 30)) < 0.3) * rng.integers(1, 9, (N_ROWS, 30))
    dense[[0, 7, 8, N_ROWS - 1]] = 0
    csr = sp.csr_matrix(dense, dtype=np.float32)
    path = tmp_path_factory.mktemp("snapshot") / "s"
    group = zarr.open_group(str(path), mode="w")
    group.create_array("RNA/indptr", data=csr.indptr.astype(np.int64))
    group.create_array("RNA/indices", data=csr.indices.astype(np.int32), chunks=(16,))
    group.create_array("RNA/values", data=csr.data, chunks=(16,))
    group.attrs["modalities"] = ["RNA"]
    return str(path), csr


ROWS = st.one_of(
    st.permutations(list(range(N_ROWS))),
    st.lists(st.integers(0, N_ROWS - 1), unique=True, max_size=N_ROWS),
    st.lists(st.integers(0, N_ROWS - 1), unique=True, max_size=N_ROWS).map(sorted),
    st.integers(0, N_ROWS - 1).flatmap(lambda a: st.integers(a, N_ROWS).map(lambda b: list(range(a, b)))),
)


@given(rows=ROWS)
def test_read_rows_equals_csr_row_indexing(snapshot, rows):
    path, csr = snapshot
    rows = np.asarray(rows, np.int64)
    indptr, indices, values = read_rows(path, "RNA", rows)
    expected = csr[rows]
    np.testing.assert_array_equal(indptr, expected.indptr)
    np.testing.assert_array_equal(indices, expected.indices)
    np.testing.assert_array_equal(values, expected.data)


def _plan(n, domains, single_domain, block, chunk, shuffle=True):
    rows = np.arange(n, dtype=np.int64)
    joinids = rows * 3 + 5  # anything but the rows themselves
    labels = (rows % 4).astype(np.int32)[:, None]
    plan = ReadPlan(uri="unused", modalities=("RNA",), domain_names=tuple(map(str, np.unique(domains))),
                    blocks=(ReadBlock(joinids=joinids, domains=domains, labels=labels, rows=rows),),
                    batch_size=8, single_domain=single_domain, shuffle=shuffle, seed=3,
                    label_levels=("l",), snapshot="unused", snapshot_chunk=chunk, snapshot_block=block)
    return plan, joinids


@given(n=st.integers(1, 300), n_domains=st.integers(1, 4), single_domain=st.booleans(),
       block=st.integers(1, 64), chunk=st.integers(1, 40), epoch=st.integers(0, 3))
def test_every_epoch_covers_every_cell_once_and_keeps_it_whole(n, n_domains, single_domain, block, chunk, epoch):
    domains = np.sort(np.arange(n) % n_domains).astype(np.int32)  # a snapshot groups domains
    plan, joinids = _plan(n, domains, single_domain, block, chunk)
    blocks = epoch_blocks(plan, epoch)
    rows = np.concatenate([b.rows for b in blocks])
    assert np.array_equal(np.sort(rows), np.arange(n))
    for b in blocks:
        assert len(b) <= block
        np.testing.assert_array_equal(b.joinids, joinids[b.rows])  # each row keeps its own cell …
        np.testing.assert_array_equal(b.domains, domains[b.rows])  # … domain …
        np.testing.assert_array_equal(b.labels[:, 0], b.rows % 4)  # … and labels
        if single_domain:
            assert np.unique(b.domains).size == 1
    # Re-cutting an epoch's blocks again gives a valid epoch too (the datasource re-plans from them).
    again = epoch_blocks(replace(plan, blocks=tuple(blocks)), epoch + 1)
    assert np.array_equal(np.sort(np.concatenate([b.rows for b in again])), np.arange(n))


def test_epochs_differ_and_repeat_with_the_seed():
    plan, _ = _plan(500, np.zeros(500, np.int32), False, 64, 16)
    first = np.concatenate([b.rows for b in epoch_blocks(plan, 0)])
    assert np.array_equal(first, np.concatenate([b.rows for b in epoch_blocks(plan, 0)]))
    assert not np.array_equal(first, np.concatenate([b.rows for b in epoch_blocks(plan, 1)]))
