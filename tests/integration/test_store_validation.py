"""Every validation error: one line naming the problem and the fix, raised before anything is
written, leaving the store byte-for-byte as it was. Also the CLI's error contract (exit 2, one
stderr line, no traceback)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest

import atlas.store.ingest as ingest_module
from atlas.store.ingest import ingest
from atlas.store.versions import StoreError, read_record
from tests.integration.test_store_ingest import MOP_RNA, MULTI_ATAC, MULTI_RNA, PBMC10K, PYTHON, ROOT, digest

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def base(tmp_path_factory, shared_data):
    """A store holding one real dataset (human RNA, 500 cells), and its digest."""
    store = tmp_path_factory.mktemp("base") / "atlas"
    ingest(store, shared_data / MULTI_RNA, dataset_id="multiome", batch_key="batch",
           label_keys={"cell_type": "cell_type"})
    return store, digest(store)


@pytest.fixture(scope="module")
def rna(shared_data) -> ad.AnnData:
    """The real 500-cell RNA dataset, in memory, to derive bad sources from."""
    return ad.read_h5ad(shared_data / MULTI_RNA)


def refused(base, source, match: str, **options) -> str:
    """Ingest into the base store must fail with a one-line message; the store is unchanged."""
    store, before = base
    with pytest.raises(StoreError, match=match) as err:
        ingest(store, source, **options)
    message = str(err.value)
    assert "\n" not in message and len(message) < 600
    assert digest(store) == before, "a refused ingest changed the store"
    return message


def write(adata: ad.AnnData, path: Path) -> Path:
    adata.write_h5ad(path)
    return path


def test_missing_file(base, tmp_path):
    refused(base, tmp_path / "nope.h5ad", "does not exist")


def test_not_a_readable_file(base, tmp_path):
    (tmp_path / "garbage.h5ad").write_text("this is not HDF5")
    refused(base, tmp_path / "garbage.h5ad", "not an HDF5 file")


def test_unknown_formats(base, tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["something"] = np.arange(3)
    refused(base, tmp_path / "other.h5", "neither an AnnData")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "readme.txt").write_text("x")
    refused(base, tmp_path / "folder", "neither an AnnData-zarr")


def test_non_integer_values(base, rna, tmp_path):
    a = rna.copy()
    a.X = a.X * 0.5
    msg = refused(base, write(a, tmp_path / "half.h5ad"), "non-integer", dataset_id="half")
    assert "--allow-normalized" in msg
    # ... accepted when asked (into another store)
    summary = ingest(tmp_path / "other", tmp_path / "half.h5ad", allow_normalized=True)
    assert summary.cells_ingested == a.n_obs


def test_negative_values(base, rna, tmp_path):
    a = rna.copy()
    a.X = a.X.tocsr()
    a.X.data[5] = -3
    refused(base, write(a, tmp_path / "neg.h5ad"), "negative", dataset_id="neg")


def test_nan_and_inf_refused_even_when_normalized_is_allowed(base, rna, tmp_path):
    a = rna.copy()
    a.X = a.X.tocsr()
    a.X.data[7] = np.nan
    a.X.data[8] = np.inf
    refused(base, write(a, tmp_path / "nan.h5ad"), "2 NaN/inf", dataset_id="nan", allow_normalized=True)


def test_zero_count_cells(base, rna, tmp_path):
    a = rna.copy()
    X = a.X.tolil()
    X[[3, 10, 11], :] = 0
    a.X = X.tocsr()
    path = write(a, tmp_path / "empty.h5ad")
    refused(base, path, "3 cells have zero counts", dataset_id="empty", drop_empty_cells=False)
    summary = ingest(tmp_path / "other", path)  # default: dropped and counted
    assert summary.cells_dropped_empty == 3 and summary.cells_ingested == a.n_obs - 3


def test_duplicate_cell_ids(base, rna, tmp_path):
    a = rna.copy()
    a.obs_names = [a.obs_names[0]] + list(a.obs_names[1:-1]) + [a.obs_names[0]]
    refused(base, write(a, tmp_path / "dupcells.h5ad"), "duplicate cell ids", dataset_id="d")


def test_duplicate_feature_ids(base, rna, tmp_path):
    a = rna.copy()
    a.var_names = [a.var_names[1]] + list(a.var_names[1:])
    refused(base, write(a, tmp_path / "dupfeat.h5ad"), "duplicate feature ids", dataset_id="d")


def test_paired_cells_must_match(base, shared_data, tmp_path):
    atac = ad.read_h5ad(shared_data / MULTI_ATAC)[5:].copy()
    msg = refused(base, shared_data / MULTI_RNA, "do not match", dataset_id="pair",
                  paired={"atac": write(atac, tmp_path / "atac.h5ad")})
    assert "5 of the source's 500 cells are missing" in msg


def test_label_and_batch_columns_must_exist(base, shared_data):
    msg = refused(base, shared_data / MULTI_RNA, "no obs column 'celltype'", dataset_id="x",
                  label_keys={"cell_type_l1": "celltype"})
    assert "cell_type" in msg  # lists the columns there are
    refused(base, shared_data / MULTI_RNA, "--batch-key donor", dataset_id="x", batch_key="donor")
    refused(base, shared_data / MULTI_RNA, "reserved", dataset_id="x", label_keys={"batch": "cell_type"})


def test_dataset_id_already_in_store(base, shared_data):
    refused(base, shared_data / MULTI_RNA, "already in the store", dataset_id="multiome")


def test_species_mixing_refused(base, shared_data):
    msg = refused(base, shared_data / MOP_RNA, "mixing species")
    assert "mouse" in msg and "human" in msg


def test_obsm_array_without_feature_names(base, shared_data, tmp_path):
    a = ad.read_h5ad(shared_data / PBMC10K)[:300].copy()
    a.obsm["protein_counts"] = a.obsm["protein_counts"].to_numpy()
    msg = refused(base, write(a, tmp_path / "unnamed.h5ad"), "no names", obsm_modalities={"protein": "protein_counts"})
    assert "DataFrame" in msg
    refused(base, tmp_path / "unnamed.h5ad", "has no obsm", obsm_modalities={"protein": "adt"})


def test_bad_options(base, shared_data, tmp_path):
    refused(base, shared_data / MULTI_RNA, "unknown modality", modality="dna")
    refused(base, shared_data / MULTI_RNA, "given 2 times", dataset_id="x", paired={"rna": shared_data / MULTI_RNA})
    refused(base, shared_data / MULTI_RNA, "--species", dataset_id="x", species="dog")
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "data.csv").write_text("1,2")
    with pytest.raises(StoreError, match="not an atlas store"):
        ingest(tmp_path / "notastore", shared_data / MULTI_RNA)


def test_failure_while_writing_leaves_store_unchanged(base, shared_data, monkeypatch, tmp_path):
    store, before = base

    def boom(*_a, **_k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(ingest_module, "_write_dataset_record", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        ingest(store, shared_data / PBMC10K, dataset_id="late")
    assert digest(store) == before and read_record(store)["current"] == 1
    assert not list((store / "versions").glob(".staging-*"))
    with pytest.raises(RuntimeError):  # a first ingest that fails leaves no store behind
        ingest(tmp_path / "new", shared_data / PBMC10K)
    assert not (tmp_path / "new").exists()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "atlas.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["{store}", "{data}/" + MULTI_RNA, "--label-key", "cell_type_l1=nope"], "no obs column 'nope'"),
        (["{store}", "{data}/" + MULTI_RNA], "already in the store"),
        (["{store}", "{data}/" + MOP_RNA], "mixing species"),
        (["{store}", "{data}/missing.h5ad"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line(base, shared_data, args, expected):
    store, before = base
    args = [a.format(store=store, data=shared_data) for a in args]
    if args[1].endswith(MULTI_RNA) and "--label-key" not in args:
        args += ["--dataset-id", "multiome"]
    out = cli("ingest", *args)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    assert digest(store) == before


def test_cli_info_on_a_non_store(tmp_path):
    out = cli("info", str(tmp_path))
    assert out.returncode == 2 and out.stderr.startswith("error:") and "is not an atlas store" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_cli_ingest_paired_json(shared_data, tmp_path):
    out = cli("ingest", str(tmp_path / "s"), str(shared_data / MULTI_RNA), "--paired",
              f"atac={shared_data / MULTI_ATAC}", "--label-key", "cell_type=cell_type", "--batch-key", "batch", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["version"] == 1 and summary["features"] == {"RNA": 600, "ATAC": 600}
    assert summary["species"] == "human" and summary["cells_ingested"] == 500
