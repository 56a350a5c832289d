"""The atlas artifact: write → verify → load, and refusal of missing, changed, truncated or extra files."""

import json

import faiss
import numpy as np
import pytest
import torch

from atlas.artifact import (
    MANIFEST,
    ArtifactError,
    load_atlas,
    verify_artifact,
    vocabulary_hash,
    write_manifest,
)
from atlas.index import build_hierarchy, search
from atlas.models.config import ConcertoConfig, build_model, config_to_dict

faiss.omp_set_num_threads(2)

VOCAB = {"RNA": [f"GENE{i}" for i in range(20)], "protein": ["CD3", "CD19", "CD14"]}


def _write_artifact(root):
    rng = np.random.default_rng(0)
    n = 60
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    labels = {"l1": rng.choice(["T", "B"], n), "l2": rng.choice(["a", "b"], n)}
    build_hierarchy(emb, np.arange(n), labels, ["l1", "l2"],
                    {"protein": (VOCAB["protein"], rng.random((n, 3)).astype(np.float32))},
                    np.array(["ds1"] * n), use_gpu=False, out_dir=root / "shards")
    config = ConcertoConfig(embed_dim=8)
    model = build_model(config, {"RNA": 20}, 2)
    torch.save(model.state_dict(), root / "model.pt")
    manifest = write_manifest(
        root,
        build_config={"model": config_to_dict(config), "k": np.int64(25), "path": root},
        model={"config": config_to_dict(config), "vocab_sizes": {"RNA": 20}, "n_domains": 2,
               "domain_names": ["donor1", "donor2"]},
        vocabulary=VOCAB,
        store={"uri": "file:///store", "version": 3, "committed_at": "2026-01-01T00:00:00+00:00"},
        metrics={"loss": np.float32(0.5), "missing": float("nan")},
    )
    return manifest, model, emb


@pytest.fixture
def artifact(tmp_path):
    root = tmp_path / "atlas"
    root.mkdir()
    manifest, model, emb = _write_artifact(root)
    return root, manifest, model, emb


def test_write_verify_load(artifact):
    root, manifest, model, emb = artifact
    assert verify_artifact(root)["atlas_version"] == manifest["atlas_version"]
    on_disk = json.loads((root / MANIFEST).read_text())
    assert on_disk["files"]["model.pt"]["bytes"] == (root / "model.pt").stat().st_size
    assert "shards/coarse/index.faiss" in on_disk["files"] and MANIFEST not in on_disk["files"]
    assert on_disk["vocabulary_hash"] == vocabulary_hash(VOCAB)
    assert on_disk["store"]["version"] == 3 and on_disk["metrics"] == {"loss": 0.5, "missing": None}
    assert on_disk["build_config"]["k"] == 25 and on_disk["model"]["kind"] == "concerto"
    assert on_disk["libraries"]["faiss"] and on_disk["libraries"]["torch"]
    assert (root / "vocabulary/RNA.txt").read_text().splitlines()[3] == "GENE3"

    atlas = load_atlas(root)
    assert atlas.version == manifest["atlas_version"] and atlas.vocabulary == VOCAB
    assert atlas.layout.root.name == "coarse" and "fine/T" in atlas.shard_names()
    shard = atlas.shard("fine/T")
    assert atlas.shard("fine/T") is shard  # cached
    _, pos = search(shard.index, emb[shard.soma_joinid], 1)
    np.testing.assert_array_equal(pos[:, 0], np.arange(shard.n_cells))
    with pytest.raises(KeyError):
        atlas.shard("fine/nope")
    rebuilt = atlas.model()
    assert not rebuilt.training and atlas.domain_names == ["donor1", "donor2"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value)


def _flip_byte(path, offset=-1):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_changed_byte_is_refused_naming_the_file(artifact):
    root = artifact[0]
    _flip_byte(root / "shards/fine/B/index.faiss")
    with pytest.raises(ArtifactError, match="modified file shards/fine/B/index.faiss") as err:
        load_atlas(root)
    assert "rebuild the atlas or restore the file" in str(err.value)


def test_missing_file_is_refused(artifact):
    root = artifact[0]
    (root / "shards/coarse/cells.parquet").unlink()
    with pytest.raises(ArtifactError, match="missing file shards/coarse/cells.parquet"):
        verify_artifact(root)


def test_truncated_file_is_refused(artifact):
    root = artifact[0]
    path = root / "model.pt"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="truncated file model.pt"):
        load_atlas(root)


def test_unexpected_file_is_refused(artifact):
    root = artifact[0]
    (root / "shards/fine/T/extra.txt").write_text("hello")
    with pytest.raises(ArtifactError, match="unexpected file shards/fine/T/extra.txt"):
        load_atlas(root)


def test_missing_or_unreadable_manifest_is_refused(artifact, tmp_path):
    root = artifact[0]
    (root / MANIFEST).write_text('{"format_version": 1, "files": {')
    with pytest.raises(ArtifactError, match="unreadable"):
        load_atlas(root)
    (root / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_atlas(root)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_atlas(tmp_path / "nowhere")


def test_lazy_verification_checks_a_shard_when_it_is_loaded(artifact):
    root = artifact[0]
    _flip_byte(root / "shards/fine/B/cells.parquet", offset=len((root / "shards/fine/B/cells.parquet").read_bytes()) // 2)
    atlas = load_atlas(root, verify="lazy")  # sizes match: opens
    atlas.shard("fine/T")  # an untouched shard loads
    with pytest.raises(ArtifactError, match="shards/fine/B/cells.parquet"):
        atlas.shard("fine/B")


def test_manifest_needs_the_model_section(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="domain_names"):
        write_manifest(tmp_path, build_config={}, model={"config": {}, "vocab_sizes": {}, "n_domains": 1},
                       vocabulary={}, store={"uri": "u", "version": 1, "committed_at": None}, metrics={})


def test_idf_species_and_mapping_sections_round_trip(tmp_path):
    """A TF-IDF atlas stores its reference idf; a query is normalised with it, as the reader does."""
    import scipy.sparse as sp

    from atlas.data.batches import fit_idf
    from atlas.data.reader import transform
    from atlas.mapping.align import normalize_aligned

    root = tmp_path / "atlas"
    root.mkdir()
    _write_artifact(root)
    manifest = json.loads((root / MANIFEST).read_text())
    rng = np.random.default_rng(3)
    reference = sp.random(40, 20, density=0.3, random_state=1, format="csr", dtype=np.float32)
    reference.data = np.ceil(reference.data * 5)
    idf = fit_idf(reference)
    (root / MANIFEST).unlink()
    write_manifest(root, build_config={"data": {"normalization": {"RNA": "tfidf"}}}, model=manifest["model"],
                   vocabulary=VOCAB, store=manifest["store"], metrics={}, species="human",
                   mapping={"thresholds": {"l1": 0.4}}, idf={"RNA": idf})
    for verify in ("full", "lazy"):
        atlas = load_atlas(root, verify=verify)
        assert atlas.species == "human" and atlas.manifest["mapping"]["thresholds"] == {"l1": 0.4}
        np.testing.assert_array_equal(atlas.idf("RNA"), idf)
        assert atlas.idf("protein") is None
    query = sp.csr_matrix(rng.integers(0, 4, size=(5, 20)).astype(np.float32))
    ours = normalize_aligned(query, atlas, "RNA")
    indptr, indices, values = transform(query, "tfidf", idf, None)
    np.testing.assert_array_equal(ours.indices, indices)
    np.testing.assert_allclose(ours.data, values, rtol=1e-6)
    with pytest.raises(ValueError, match="idf has shape"):
        write_manifest(root, build_config={}, model=manifest["model"], vocabulary=VOCAB,
                       store=manifest["store"], metrics={}, idf={"RNA": idf[:5]})
