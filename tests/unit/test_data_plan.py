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
