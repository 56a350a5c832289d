"""Fixtures of the integration tests (the project-wide ones are in ``tests/conftest.py``)."""

import anndata as ad
import pytest

from atlas.store.ingest import ingest
from tests.build_helpers import PBMC10K, subset


@pytest.fixture(scope="module")
def pbmc(dataset, tmp_path_factory):
    """A 2,000-cell pbmc10k store (RNA + protein, two label levels) and its source cells.

    Module-scoped: the build tests live in several files so that parallel test workers can
    take them apart; each file ingests its own copy (a few seconds).
    """
    cells = subset(ad.read_h5ad(dataset(PBMC10K)), 2000)
    store = tmp_path_factory.mktemp("build") / "pbmc"
    ingest(store, cells, dataset_id="pbmc10k", obsm_modalities={"protein": "protein_counts"},
           label_keys={"cell_type_l1": "cell_type_l1", "cell_type_l2": "cell_type_l2"}, species="human")
    return store, cells
