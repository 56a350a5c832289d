"""The demo's dataset rebuilt from its public sources (atlas.demo_data), without a network.

A local mirror of the four raw files is written from the shared files (the totalVI CSVs from the
pbmc10k h5ad, ADTnorm's two .rda tables from the ADTnorm h5ad, which holds their rows) and served
through file:// URLs; the rebuild must give the shared file's content fingerprint.
"""

import json
import shutil
import socket

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from atlas import demo_data
from atlas.demo_data import (
    ADT_RDA,
    EXPECTED_FINGERPRINT,
    EXPECTED_PARTS,
    FEATURE_RDA,
    PBMC10K,
    PROTEIN_CSV,
    RNA_CSV,
    adtnorm_labels,
    demo_dataset,
    fingerprint,
    fingerprint_parts,
)
from atlas.errors import AtlasError

ADTNORM = "adtnorm_13studies_adt9_422k.h5ad"
# 10x's own antibody order (its feature reference), not the shared file's sorted one: the rebuild
# must not depend on the CSV's row order.
TENX_ORDER = ["CD3", "CD4", "CD8a", "CD14", "CD15", "CD16", "CD56", "CD19", "CD25", "CD45RA", "CD45RO",
              "PD-1", "TIGIT", "CD127"]


def _write_counts_csv(frame: pd.DataFrame, path):
    """features × cells, first column the feature names under an empty header, like the originals."""
    frame.to_csv(path, compression={"method": "gzip", "compresslevel": 1})


@pytest.fixture(scope="module")
def pbmc(dataset):
    return ad.read_h5ad(dataset(PBMC10K))


@pytest.fixture(scope="module")
def mirror(pbmc, dataset, tmp_path_factory):
    """A folder with the four raw files (pyreadr, a dev dependency, writes the .rda ones)."""
    folder = tmp_path_factory.mktemp("mirror")
    rna = pd.DataFrame(pbmc.X.T.toarray().astype(np.int32), index=pbmc.var_names, columns=pbmc.obs_names)
    _write_counts_csv(rna, folder / RNA_CSV)
    proteins = pbmc.obsm["protein_counts"][[f"{p}_TotalSeqB" for p in TENX_ORDER]].astype(np.int32)
    _write_counts_csv(proteins.T, folder / PROTEIN_CSV)
    import pyreadr

    # ADTnorm's tables: all 8,201 real 10X_pbmc_10k rows (1,347 of them match no pbmc10k cell, some
    # share their 9 counts), 3,000 rows of the 12 other studies, and two planted traps.
    adt = ad.read_h5ad(dataset(ADTNORM))
    study = adt.obs["study_name"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    keep = np.flatnonzero(study == "10X_pbmc_10k")
    others = rng.choice(np.flatnonzero(study != "10X_pbmc_10k"), 3000, replace=False)
    rows = np.sort(np.concatenate([keep, others]))
    x = adt.X[rows]
    counts = pd.DataFrame(np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64),
                          columns=list(adt.var_names))
    features = adt.obs.iloc[rows].reset_index(drop=True)
    markers = list(demo_data.JOIN_MARKERS)
    pbmc_keys = pbmc.obsm["protein_counts"][list(demo_data.JOIN_MARKERS.values())].to_numpy(np.float64)
    labelled = int(np.flatnonzero(pbmc.obs["cell_type_l1"].notna())[0])
    unlabelled = int(np.flatnonzero(pbmc.obs["cell_type_l1"].isna())[0])
    other_row = int(np.flatnonzero(features["study_name"].astype(str) != "10X_pbmc_10k")[0])
    ten_x_row = int(np.flatnonzero(features["study_name"].astype(str) == "10X_pbmc_10k")[0])
    # Trap 1: another study's cell with a pbmc10k cell's exact counts and another label (ignored).
    # Trap 2: two 10X_pbmc_10k rows with the unlabelled cell's counts (ambiguous → still NaN).
    planted = [(other_row, labelled, "B", "naive B"), (ten_x_row, unlabelled, "NK", "CD16+ NK"),
               (ten_x_row, unlabelled, "B", "memory B")]
    for source_row, cell, l1, l2 in planted:
        counts.loc[len(counts)] = pbmc_keys[cell]
        row = features.iloc[[source_row]].copy()
        row["cell_type_l1"], row["cell_type_l2"] = l1, l2
        features = pd.concat([features, row], ignore_index=True)
    for column in features:
        if not pd.api.types.is_numeric_dtype(features[column]):
            features[column] = features[column].astype(str).astype("category")
    assert list(counts.columns) == markers
    pyreadr.write_rdata(str(folder / ADT_RDA), counts, df_name="cell_x_adt", compress="gzip")
    pyreadr.write_rdata(str(folder / FEATURE_RDA), features, df_name="cell_x_feature", compress="gzip")
    return folder


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_constant_is_the_shared_files_fingerprint(pbmc):
    parts = fingerprint_parts(pbmc)
    assert parts == EXPECTED_PARTS
    assert fingerprint(parts) == EXPECTED_FINGERPRINT


def test_the_shared_file_is_preferred(dataset, tmp_path):
    shared = dataset(PBMC10K)
    said = []
    assert demo_dataset(shared.parent, tmp_path / "cache", mirror="http://127.0.0.1:1", say=said.append) == shared
    assert not (tmp_path / "cache").exists() and said == []


def test_rebuild_from_the_public_files(mirror, pbmc, tmp_path, capsys):
    folder = mirror
    cache = tmp_path / "cache"
    path = demo_dataset(tmp_path / "no-shared-data", cache, mirror=folder.as_uri())
    out = capsys.readouterr().out
    assert path == cache / PBMC10K
    assert "the shared data folder" in out and "is absent: downloading the public pbmc10k CITE-seq data" in out
    assert f"into {cache}" in out and "YosefLab/totalVI_reproducibility" in out and "ADTnorm" in out
    assert f"{folder.as_uri()}/{RNA_CSV}" in out  # says where each file came from

    rebuilt = ad.read_h5ad(path)
    assert fingerprint_parts(rebuilt) == EXPECTED_PARTS == fingerprint_parts(pbmc)
    assert rebuilt.obs["cell_type_l1"].isna().sum() == 1  # the one cell ADTnorm has no row for
    assert list(rebuilt.obs["cell_type_l1"].cat.categories) == list(pbmc.obs["cell_type_l1"].cat.categories)
    assert rebuilt.obs["batch"].tolist() == pbmc.obs["batch"].tolist()
    assert rebuilt.uns["source"] == pbmc.uns["source"]

    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["fingerprint"] == EXPECTED_FINGERPRINT
    assert set(manifest["files"]) == {RNA_CSV, PROTEIN_CSV, ADT_RDA, FEATURE_RDA}
    assert manifest["files"][RNA_CSV]["sha256"] == demo_data.file_sha256(folder / RNA_CSV)
    assert sorted(p.name for p in cache.iterdir()) == sorted([PBMC10K, "manifest.json", *manifest["files"]])

    # A second run uses the verified cache and downloads nothing (the mirror is now unreachable).
    nowhere = f"http://127.0.0.1:{_closed_port()}"
    assert demo_dataset(tmp_path / "no-shared-data", cache, mirror=nowhere) == path
    assert "rebuilt earlier from the public sources" in capsys.readouterr().out

    # Without the h5ad, the raw files in the cache are re-verified against the manifest and reused.
    path.unlink()
    assert demo_dataset(tmp_path / "no-shared-data", cache, mirror=nowhere) == path
    assert "sha256 matches the manifest" in capsys.readouterr().out
    # A raw file that no longer matches the manifest is fetched again (here: cannot be).
    path.unlink()
    with open(cache / PROTEIN_CSV, "ab") as f:
        f.write(b"\0")
    with pytest.raises(AtlasError, match="could not download"):
        demo_dataset(tmp_path / "no-shared-data", cache, mirror=nowhere)
    assert not (cache / PROTEIN_CSV).exists() and not path.exists()


def test_a_changed_count_is_refused_and_nothing_is_kept(mirror, tmp_path):
    folder = mirror
    bad = tmp_path / "bad-mirror"
    shutil.copytree(folder, bad)
    proteins = pd.read_csv(bad / PROTEIN_CSV, index_col=0)
    proteins.iloc[proteins.index.get_loc("CD45RO_TotalSeqB"), 100] += 1  # one count, not a join marker
    _write_counts_csv(proteins, bad / PROTEIN_CSV)
    cache = tmp_path / "cache"
    with pytest.raises(AtlasError) as e:
        demo_dataset(tmp_path / "no-shared-data", cache, mirror=bad.as_uri())
    message = str(e.value)
    assert "not the expected dataset" in message and "the protein counts" in message
    assert "the RNA counts" not in message and "labels" not in message
    assert EXPECTED_FINGERPRINT in message and "ATLAS_SHARED_DATA" in message
    assert list(cache.iterdir()) == []  # no h5ad, no manifest, no raw file, no partial file


@pytest.mark.parametrize("where", ["file", "http"])
def test_an_unreachable_source_says_what_to_do(where, tmp_path):
    mirror = (tmp_path / "nowhere").as_uri() if where == "file" else f"http://127.0.0.1:{_closed_port()}"
    cache = tmp_path / "cache"
    with pytest.raises(AtlasError) as e:
        demo_dataset(tmp_path / "no-shared-data", cache, mirror=mirror)
    message = str(e.value)
    assert message.startswith("could not download the demo's data: ")
    assert f"{mirror}/{RNA_CSV} failed" in message
    assert "ATLAS_SHARED_DATA" in message and PBMC10K in message
    for name in (RNA_CSV, PROTEIN_CSV, ADT_RDA, FEATURE_RDA):  # every URL and where to put it by hand
        assert f"{mirror}/{name} → {cache / name}" in message
    assert list(cache.iterdir()) == []


def test_default_urls_are_pinned_to_commits(monkeypatch):
    monkeypatch.delenv(demo_data.MIRROR_ENV, raising=False)
    urls = demo_data.source_urls()
    assert urls[RNA_CSV] == ("https://raw.githubusercontent.com/YosefLab/totalVI_reproducibility/"
                             "27d65a9c49182f39df0c4325249bc7dc8e663dd0/data/raw_data/pbmc10k_harmo_rna.csv.gz")
    assert urls[FEATURE_RDA] == ("https://raw.githubusercontent.com/yezhengSTAT/ADTnorm/"
                                 "142ac08274083a91bf27a8c437042ad2447a4f5f/data/cell_x_feature.rda")
    monkeypatch.setenv(demo_data.MIRROR_ENV, "https://example.org/m/")
    assert demo_data.source_urls()[ADT_RDA] == "https://example.org/m/cell_x_adt.rda"


def test_the_label_join():
    markers = list(demo_data.JOIN_MARKERS)
    proteins = pd.DataFrame(
        [[i] * 9 + [0] for i in (1, 2, 3, 4, 5, 5)],
        index=[f"c{i}" for i in range(6)], columns=[*demo_data.JOIN_MARKERS.values(), "TIGIT_TotalSeqB"],
        dtype=np.float32,
    )
    #              1: matched   2: other study only   3: two rows (ambiguous)   4: none   5: two cells
    rows = [(1, "10X_pbmc_10k", "B", "naive B"), (2, "hao_2020", "NK", "CD16+ NK"),
            (3, "10X_pbmc_10k", "NK", "CD16+ NK"), (3, "10X_pbmc_10k", "NK", "CD16+ NK"),
            (5, "10X_pbmc_10k", "B", "memory B"), (1, "hao_2020", "CD4 T", "naive CD4"),
            (9, "10X_pbmc_10k", "undefined", "undefined")]
    cell_x_adt = pd.DataFrame([[v] * 9 for v, *_ in rows], columns=markers, dtype=np.int32)
    cell_x_feature = pd.DataFrame([r[1:] for r in rows], columns=["study_name", "cell_type_l1", "cell_type_l2"])
    labels = adtnorm_labels(proteins, cell_x_adt, cell_x_feature.astype("category"))
    assert labels.index.tolist() == proteins.index.tolist()
    assert labels["cell_type_l1"].tolist()[0] == "B" and labels["cell_type_l2"].tolist()[0] == "naive B"
    assert labels.iloc[1:].isna().all().all()
    with pytest.raises(AtlasError, match="whole numbers"):
        adtnorm_labels(proteins + 0.5, cell_x_adt, cell_x_feature)
