"""The read plan: a plain value that says which cells each read task reads."""

import numpy as np
import pytest

from atlas.data.plan import plan_blocks


def _cells(n=10_000, n_domains=4, seed=0):
    rng = np.random.default_rng(seed)
    joinids = rng.permutation(n * 2)[:n]
    return joinids, rng.integers(0, n_domains, n)


@pytest.mark.parametrize("single_domain", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_cell_in_exactly_one_block(shuffle, single_domain):
    joinids, domains = _cells()
    blocks = plan_blocks(joinids, domains, block_size=700, shuffle=shuffle, single_domain=single_domain, seed=1)
    got = np.concatenate([b.joinids for b in blocks])
    assert got.size == joinids.size and set(got.tolist()) == set(joinids.tolist())
    lookup = dict(zip(joinids.tolist(), domains.tolist()))
    for b in blocks:
        assert len(b) <= 700
        assert [lookup[j] for j in b.joinids.tolist()] == b.domains.tolist()
        if single_domain:
            assert np.unique(b.domains).size == 1


@pytest.mark.parametrize("single_domain", [False, True])
def test_labels_travel_with_their_cells(single_domain):
    joinids, domains = _cells(n=3000)
    labels = np.stack([joinids % 7, np.where(joinids % 5 == 0, -1, joinids % 11)], axis=1)
    blocks = plan_blocks(joinids, domains, block_size=400, shuffle=True, single_domain=single_domain, seed=2,
                         labels=labels)
    lookup = {j: tuple(row) for j, row in zip(joinids.tolist(), labels.tolist())}
    for b in blocks:
        assert b.labels is not None and b.labels.shape == (len(b), 2) and b.labels.dtype == np.int32
        assert [lookup[j] for j in b.joinids.tolist()] == [tuple(r) for r in b.labels.tolist()]
    assert all(b.labels is None for b in plan_blocks(joinids, domains, block_size=400, shuffle=True))


def test_label_codes_survive_arrow_slicing():
    """The read task's labels column → the batch's [cells, levels] codes, for any slice of a block."""
    import pyarrow as pa

    from atlas.data.collate import table_to_batch

    codes = np.arange(30, dtype=np.int32).reshape(10, 3)
    codes[4] = -1
    table = pa.table({"soma_joinid": pa.array(np.arange(10), pa.int64()), "domain": pa.array(np.zeros(10), pa.int32()),
                      "labels": pa.FixedSizeListArray.from_arrays(pa.array(codes.ravel()), 3)})
    for start, length in ((0, 10), (3, 4), (9, 1)):
        batch = table_to_batch(table.slice(start, length), ())
        np.testing.assert_array_equal(batch["labels"].numpy(), codes[start : start + length])
    joined = table_to_batch(pa.concat_tables([table.slice(7, 3), table.slice(0, 2)]), ())
    np.testing.assert_array_equal(joined["labels"].numpy(), np.concatenate([codes[7:], codes[:2]]))


def test_shuffle_is_seeded_and_changes_order():
    joinids, domains = _cells()
    a = plan_blocks(joinids, domains, block_size=500, shuffle=True, seed=3)
    b = plan_blocks(joinids, domains, block_size=500, shuffle=True, seed=3)
    c = plan_blocks(joinids, domains, block_size=500, shuffle=True, seed=4)
    flat = lambda blocks: np.concatenate([x.joinids for x in blocks])  # noqa: E731
    np.testing.assert_array_equal(flat(a), flat(b))
    assert not np.array_equal(flat(a), flat(c))
    assert not np.array_equal(flat(a), np.sort(joinids))


def test_unshuffled_blocks_are_sorted_ranges():
    joinids, domains = _cells()
    blocks = plan_blocks(joinids, domains, block_size=1000, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([b.joinids for b in blocks]), np.sort(joinids))


def test_duplicate_cells_are_refused():
    with pytest.raises(ValueError, match="twice"):
        plan_blocks(np.array([1, 2, 2]), np.zeros(3), block_size=10, shuffle=False)
