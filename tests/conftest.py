"""Shared fixtures: where the real datasets live, and whether their absence is an error.

Real-data tests skip with a reason on a user's fresh clone (no ../shared/data), but CI sets
``ATLAS_REQUIRE_DATA=1`` so a missing folder fails instead of silently skipping.
"""

import os
from pathlib import Path

import pytest

DATA_ENV = "ATLAS_SHARED_DATA"
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV, DEFAULT_DATA))


def _require(path: Path) -> Path:
    if path.exists():
        return path
    reason = f"real dataset {path} not found (set {DATA_ENV} to the folder with the shared .h5ad files)"
    if os.environ.get("ATLAS_REQUIRE_DATA") == "1":
        pytest.fail(reason + "; CI requires it (ATLAS_REQUIRE_DATA=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real datasets."""
    return _require(shared_data_dir())


@pytest.fixture(scope="session")
def dataset(shared_data):
    """Factory: ``dataset("pbmc10k_...h5ad")`` → path of one real file (skips/fails when absent)."""

    def get(name: str) -> Path:
        return _require(shared_data / name)

    return get


def _init_local_ray():
    import ray

    if not ray.is_initialized():
        # address="local": always a cluster of our own — a head the user (or the demo) started with
        # `ray start` on this machine must not be joined, and cannot take num_cpus.
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture
def ray_local():
    """A real local Ray (shared by the tests that need one; started on first use).

    More logical CPUs than cores: read tasks and training workers must be able to run side by
    side on a 2-core machine. Tests that need a cluster of their own shut it down first.
    """
    return _init_local_ray()


def pytest_sessionfinish(session, exitstatus):
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def tiny_atlas(dataset, tmp_path_factory):
    """``(Atlas, query, protein names)``: a small real Concerto atlas (see ``tests/tiny_atlas.py``)."""
    from tests.tiny_atlas import PBMC, build_tiny_atlas

    return build_tiny_atlas(dataset(PBMC), tmp_path_factory.mktemp("tiny_atlas"))


@pytest.fixture(scope="module")
def mop_store(dataset, tmp_path_factory):
    """A store of the MOp SNARE-seq set (RNA + ATAC, 12 libraries as domains, coarse labels)."""
    from atlas.store.ingest import ingest

    store = tmp_path_factory.mktemp("stores") / "mop"
    ingest(store, dataset("mop_snareseq_c1_rna.h5ad"), paired={"atac": dataset("mop_snareseq_c1_atac.h5ad")},
           dataset_id="mop", batch_key="Batch", label_keys={"cell_type_coarse": "cell_type_coarse"}, species="mouse")
    return store
