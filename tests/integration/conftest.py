"""Fixtures of the integration tests (the project-wide ones are in ``tests/conftest.py``)."""

import anndata as ad
import pytest

from atlas.store.ingest import ingest
from tests.build_helpers import PBMC10K, subset


@pytest.fixture(scope="module")
def pbmc(dataset, tmp_path_factory):
    """A 2,000-cell pbmc10k store (RNA + protein, two label levels) and its source cells.

    Module-scoped: each build test file gets a fresh copy (a few seconds to ingest), because a
    build writes its embeddings back to the store as a new version, and ``test_build.py`` checks
    the version numbers its own build made.
    """
    cells = subset(ad.read_h5ad(dataset(PBMC10K)), 2000)
    store = tmp_path_factory.mktemp("build") / "pbmc"
    ingest(store, cells, dataset_id="pbmc10k", obsm_modalities={"protein": "protein_counts"},
           label_keys={"cell_type_l1": "cell_type_l1", "cell_type_l2": "cell_type_l2"}, species="human")
    return store, cells
