"""Re-running a build: the embedding write-back replaces its namesake in a new store version
(older versions keep theirs), and everything that could stop a build after training is checked
before it starts (issue: a rebuild trained for 86 s and then lost it all)."""

import anndata as ad
import numpy as np
import pytest

from atlas.build import build_atlas, preflight
from atlas.store.embeddings import read_embedding, write_embedding
from atlas.store.ingest import ingest
from atlas.store.versions import current_version, read_record
from atlas.train.config import ConfigError, build_config_from_dict

pytestmark = pytest.mark.real_data

PBMC10K = "pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"


@pytest.fixture(scope="module")
def store(dataset, tmp_path_factory):
    cells = ad.read_h5ad(dataset(PBMC10K))[:300].copy()
    path = tmp_path_factory.mktemp("rebuild") / "store"
    ingest(path, cells, dataset_id="pbmc10k", obsm_modalities={"protein": "protein_counts"},
           label_keys={"cell_type_l1": "cell_type_l1"}, species="human")
    return path


def _write(store, value: float, name: str = "atlas_same-name"):
    joinids = np.arange(300)
    return write_embedding(store, "RNA", name, [(joinids, np.full((300, 4), value, np.float32))], {"run": value})


def test_the_same_embedding_name_again_replaces_it_in_a_new_version_only(store):
    first = _write(store, 1.0)
    second = _write(store, 2.0)  # was: StoreError "the store already has an embedding"
    assert second.version == first.version + 1
    _, old, old_meta = read_embedding(first.uri, "RNA", "atlas_same-name")
    _, new, new_meta = read_embedding(second.uri, "RNA", "atlas_same-name")
    assert (old == 1.0).all() and old_meta["run"] == 1.0  # the published version is untouched
    assert (new == 2.0).all() and new_meta["run"] == 2.0
    history = read_record(store)["history"]
    assert history[-1]["replaced"] is True and "replaced" not in history[-2]
    # Other embeddings and the counts are carried over unchanged.
    third = _write(store, 3.0, name="atlas_other")
    _, kept, _ = read_embedding(third.uri, "RNA", "atlas_same-name")
    assert (kept == 2.0).all()


def _config(store, tmp_path, **index):
    return build_config_from_dict({
        "name": "preflight", "store": str(store), "output": str(tmp_path / "artifact"),
        "model": {"model": "concerto", "modalities": ["RNA"], "embed_dim": 16},
        "train": {"epochs": 1}, "scaling": {"num_workers": 1, "use_gpu": False},
        "run": {"storage_path": str(tmp_path / "runs")},
        "index": {"levels": ["cell_type_l1"], **index},
    })


@pytest.mark.parametrize(("index", "message"), [
    ({"levels": ["cell_type_l1", "cell_type_l9"]}, "obs has no column(s) ['cell_type_l9']"),
    ({"profiles": ["ATAC"]}, "index.profiles: the store has no modality ['ATAC']"),
    ({"profile_space": -1}, "index.profile_space must be ≥ 0"),
    ({"profile_space": 0, "label_space": "profiles"}, "index.label_space: profiles needs a profile space"),
])
def test_a_bad_build_config_fails_before_training(store, tmp_path, index, message):
    config = _config(store, tmp_path, **index)
    with pytest.raises(ConfigError) as err:
        preflight(config, current_version(store).uri, writes_store=True)
    assert message in str(err.value)
    # Through build_atlas: the same error, and no training run was started (no Ray, no run folder).
    lines = []
    with pytest.raises(ConfigError):
        build_atlas(config, log=lines.append)
    assert not lines  # it stopped before its first step
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_good_config_passes_preflight(store, tmp_path):
    preflight(_config(store, tmp_path, profiles=["protein"]), current_version(store).uri, writes_store=True)
