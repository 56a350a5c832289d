"""Ingest of every real dataset into real TileDB-SOMA stores on disk: counts and labels read back
equal the source, the vocabulary grows by appending, committed versions are never modified, a
killed ingest loses nothing, and ``atlas info --json`` describes the store."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import tiledbsoma as soma

from atlas.store.info import store_info
from atlas.store.ingest import ingest
from atlas.store.versions import STAGING_PREFIX, current_version, read_record

pytestmark = pytest.mark.real_data

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

PBMC10K = "pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"
PBMC5K = "pbmc5k_10x_totalvi_rna4000hvg_noprotein.h5ad"
CITE_RNA = "neurips21_bmmc_cite_starter_rna_with_adt.h5ad"
CITE_ADT = "neurips21_bmmc_cite_starter_adt.h5ad"
MULTI_RNA = "neurips21_bmmc_multiome_starter_rna.h5ad"
MULTI_ATAC = "neurips21_bmmc_multiome_starter_atac.h5ad"
ECCITE = "eccite_pbmc_citefuse_500cells_rna_adt_hto.h5ad"
LIAO = "liao2020_covid_balf_3patients_rna_labelled.h5ad"
ASAP = "asap_cite_pbmc_adt216_4batches.h5ad"
ADTNORM = "adtnorm_13studies_adt9_422k.h5ad"
MOP_RNA = "mop_snareseq_c1_rna.h5ad"
MOP_ATAC = "mop_snareseq_c1_atac.h5ad"

# The human atlas, ingested in this order into one store (each ingest is one version).
# (dataset id, file, ingest options, {measurement: how to get the source matrix}, {level: column})
HUMAN = [
    ("pbmc10k", PBMC10K, dict(obsm_modalities={"protein": "protein_counts"}, batch_key="batch"),
     {"RNA": "X", "protein": "obsm:protein_counts"}, {"cell_type_l1": "cell_type_l1", "cell_type_l2": "cell_type_l2"}),
    ("pbmc5k", PBMC5K, dict(batch_key="batch"), {"RNA": "X"}, {}),
    ("cite", CITE_RNA, dict(paired={"protein": CITE_ADT}, batch_key="batch"),
     {"RNA": "X", "protein": f"file:{CITE_ADT}"}, {"cell_type_l1": "cell_type_l1_derived", "cell_type": "cell_type"}),
    ("eccite", ECCITE, dict(obsm_modalities={"protein": "protein_counts"}),
     {"RNA": "X", "protein": "obsm:protein_counts"}, {}),
    ("liao", LIAO, dict(batch_key="patient"), {"RNA": "X"},
     {"cell_type_l1": "cell_type_coarse", "cell_type_l2": "cell_type_fine"}),
    ("multiome", MULTI_RNA, dict(paired={"atac": MULTI_ATAC}, batch_key="batch"),
     {"RNA": "X", "ATAC": f"file:{MULTI_ATAC}"}, {"cell_type": "cell_type"}),
    ("asap", ASAP, dict(modality="protein", batch_key="batch"), {"protein": "X"},
     {"cell_type_l1": "coarse_cluster", "cell_type_l2": "cluster"}),
]
# The 422k-cell ADTnorm set is round-tripped by the killed-ingest test (one ingest of it is enough).


def digest(folder: Path, skip_staging: bool = False) -> dict[str, str]:
    """sha256 of every file under a folder, by relative path."""
    out = {}
    for root, dirs, files in os.walk(folder):
        if skip_staging:
            dirs[:] = [d for d in dirs if not d.startswith(STAGING_PREFIX)]
        for name in files:
            path = Path(root) / name
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def read_dataset(store: Path, measurement: str, dataset_id: str):
    """obs rows of one dataset, the measurement's var, and that dataset's counts (cells × vocabulary)."""
    with soma.Experiment.open(current_version(store).uri) as exp:
        obs = exp.obs.read(value_filter=f"dataset_id == '{dataset_id}'").concat().to_pandas()
        var = exp.ms[measurement].var.read().concat().to_pandas().sort_values("soma_joinid")
        table = exp.ms[measurement].X["counts"].read(coords=(obs.soma_joinid.to_numpy(),)).tables().concat()
    assert table["soma_data"].type == "float"  # float32
    rows = pd.Index(obs.soma_joinid).get_indexer(table["soma_dim_0"].to_numpy())
    X = sp.csr_matrix((table["soma_data"].to_numpy(), (rows, table["soma_dim_1"].to_numpy())),
                      shape=(len(obs), len(var)))
    return obs, var, X


def source_matrix(path: Path, how: str, data: Path):
    """(cell ids, feature ids, csr counts) of one modality of a real source file."""
    a = ad.read_h5ad(path)
    if how == "X":
        return a.obs_names, a.var_names, sp.csr_matrix(a.X)
    if how.startswith("obsm:"):
        df = a.obsm[how[5:]]
        return a.obs_names, pd.Index(df.columns.astype(str)), sp.csr_matrix(df.to_numpy())
    other = ad.read_h5ad(data / how[5:])
    return other.obs_names, other.var_names, sp.csr_matrix(other.X)


def assert_round_trip(store: Path, dataset_id: str, measurement: str, cells, features, X_source) -> None:
    obs, var, X_store = read_dataset(store, measurement, dataset_id)
    assert obs.obs_id.tolist() == [f"{dataset_id}:{c}" for c in obs.cell_id]
    rows = pd.Index(cells).get_indexer(obs.cell_id)
    assert (rows >= 0).all()
    cols = var.set_index("var_id").loc[list(features), "soma_joinid"].to_numpy()
    diff = X_store[:, cols] - X_source[rows]
    assert abs(diff).sum() == 0, f"{dataset_id}/{measurement}: counts differ"
    assert X_store.nnz == X_store[:, cols].nnz, "values outside the dataset's features"


@pytest.fixture(scope="module")
def human_store(tmp_path_factory, shared_data):
    """The human atlas built dataset by dataset; records each ingest's summary and v1's digest."""
    store = tmp_path_factory.mktemp("human") / "atlas"
    summaries, v1 = {}, {}
    for dataset_id, file, options, _, labels in HUMAN:
        options = dict(options)
        if "paired" in options:
            options["paired"] = {k: shared_data / v for k, v in options["paired"].items()}
        summaries[dataset_id] = ingest(store, shared_data / file, dataset_id=dataset_id, label_keys=labels,
                                       **options)
        if dataset_id == "pbmc10k":
            v1 = {"digest": digest(Path(current_version(store).uri)),
                  "var": read_dataset(store, "RNA", "pbmc10k")[1]}
    return store, summaries, v1


@pytest.mark.parametrize("dataset_id", [h[0] for h in HUMAN])
def test_round_trip_every_dataset(human_store, shared_data, dataset_id):
    store, summaries, _ = human_store
    _, file, _, modalities, labels = next(h for h in HUMAN if h[0] == dataset_id)
    src = ad.read_h5ad(shared_data / file, backed="r")
    kept = None
    for measurement, how in modalities.items():
        cells, features, X = source_matrix(shared_data / file, how, shared_data)
        assert_round_trip(store, dataset_id, measurement, cells, features, X)
        nonempty = pd.Index(cells)[np.diff(X.indptr) > 0] if X.format == "csr" else None
        kept = nonempty if kept is None else kept.union(nonempty)
    obs = read_dataset(store, next(iter(modalities)), dataset_id)[0].set_index("cell_id")
    # exactly the cells with a count somewhere are stored; the summary says how many were dropped
    assert set(obs.index) == set(kept)
    assert summaries[dataset_id].cells_dropped_empty == src.n_obs - len(obs)
    assert summaries[dataset_id].cells_ingested == len(obs)
    # labels kept as strings, missing → "", levels this dataset lacks → ""
    all_levels = {lv for h in HUMAN for lv in h[4]}
    for level in all_levels:
        if level in labels:
            col = src.obs[labels[level]].loc[obs.index]
            expected = np.where(col.isna(), "", col.astype(object).astype(str))
            assert (obs[level].to_numpy() == expected).all(), level
        else:
            assert (obs[level] == "").all(), level
    batch_key = next(h for h in HUMAN if h[0] == dataset_id)[2].get("batch_key")
    expected_batch = src.obs[batch_key].loc[obs.index].astype(str).to_numpy() if batch_key else dataset_id
    assert (obs["batch"].to_numpy() == expected_batch).all()
    assert (obs["dataset_id"] == dataset_id).all()
    src.file.close()


def test_missing_labels_are_empty_not_a_class(human_store, shared_data):
    store, _, _ = human_store
    obs = read_dataset(store, "RNA", "liao")[0]
    src = ad.read_h5ad(shared_data / LIAO, backed="r")
    unannotated = int(src.obs["cell_type_coarse"].isna().sum())
    assert unannotated > 0 and int((obs.cell_type_l1 == "").sum()) == unannotated
    assert "nan" not in set(obs.cell_type_l1)


def test_vocabulary_grows_by_appending(human_store):
    store, summaries, v1 = human_store
    assert summaries["pbmc10k"].new_features == {"RNA": 4000, "protein": 14}
    assert summaries["pbmc5k"].new_features == {"RNA": 0}  # the same 4000 genes
    assert summaries["cite"].new_features["RNA"] > 0
    with soma.Experiment.open(current_version(store).uri) as exp:
        var = exp.ms["RNA"].var.read().concat().to_pandas().sort_values("soma_joinid")
        n_protein = exp.ms["protein"].var.count
    assert var.var_id.is_unique and var.soma_joinid.tolist() == list(range(len(var)))
    # the first dataset's features keep their soma_joinid; later ones were appended after them
    first = v1["var"].set_index("var_id").soma_joinid
    assert (var.set_index("var_id").soma_joinid.loc[first.index] == first).all()
    assert len(var) == sum(s.new_features.get("RNA", 0) for s in summaries.values())
    assert n_protein == sum(s.new_features.get("protein", 0) for s in summaries.values())


def test_committed_versions_are_never_modified(human_store):
    store, _, v1 = human_store
    record = read_record(store)
    assert record["current"] == len(HUMAN)
    assert [v["version"] for v in record["history"]] == list(range(1, len(HUMAN) + 1))
    assert digest(Path(current_version(store, 1).uri)) == v1["digest"]
    with soma.Experiment.open(current_version(store, 1).uri) as exp:
        assert exp.obs.count == 6855 and set(exp.ms.keys()) == {"RNA", "protein"}


def test_modalities_share_obs_joinids_and_missing_modality(human_store):
    store, _, _ = human_store
    with soma.Experiment.open(current_version(store).uri) as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "dataset_id"]).concat().to_pandas()
        def cells_with(ms):
            t = exp.ms[ms].X["counts"].read().tables().concat()
            return set(np.unique(t["soma_dim_0"].to_numpy()))
        rna, protein, atac = cells_with("RNA"), cells_with("protein"), cells_with("ATAC")
        meta = {ms: dict(exp.ms[ms].metadata) for ms in ("RNA", "protein", "ATAC")}
    by = obs.groupby("dataset_id").soma_joinid.apply(set)
    assert by["pbmc10k"] <= rna and by["pbmc10k"] <= protein  # CITE-seq: both modalities, same joinids
    assert not (by["pbmc5k"] & protein) and not (by["liao"] & protein)  # RNA-only: no protein rows
    assert not (by["asap"] & rna) and by["multiome"] <= atac
    assert {m["species"] for m in meta.values()} == {"human"}
    assert [meta[m]["id_namespace"] for m in ("RNA", "protein", "ATAC")] == ["symbol", "antibody", "peak"]


def test_info_json_cli(human_store):
    store, summaries, _ = human_store
    out = subprocess.run([PYTHON, "-m", "atlas.cli", "info", str(store), "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info == json.loads(json.dumps(store_info(store)))
    assert info["version"] == len(HUMAN) and len(info["versions"]) == len(HUMAN)
    assert {d["dataset_id"]: d["cells"] for d in info["datasets"]} == {
        k: s.cells_ingested for k, s in summaries.items()}
    assert info["cells"] == sum(s.cells_ingested for s in summaries.values())
    assert info["measurements"]["RNA"]["species"] == "human"
    assert info["measurements"]["protein"]["id_namespace"] == "antibody"
    assert set(info["label_levels"]) == {"cell_type_l1", "cell_type_l2", "cell_type"}
    assert all(v["committed_at"] for v in info["versions"])
    assert info["datasets"][0]["modalities"] == {"RNA": 6855, "protein": 6855}


def test_mop_rna_atac_paired_mouse(tmp_path, dataset):
    store = tmp_path / "mop"
    notes = []
    summary = ingest(store, dataset(MOP_RNA), paired={"atac": dataset(MOP_ATAC)}, batch_key="Batch",
                     label_keys={"cell_type_l1": "cell_type_coarse", "cell_type_l2": "cell_type_fine"},
                     log=notes.append)
    assert summary.species == "mouse" and any("mouse" in n for n in notes)
    assert summary.version == 1 and set(summary.features) == {"RNA", "ATAC"}
    for ms, file in (("RNA", MOP_RNA), ("ATAC", MOP_ATAC)):
        cells, features, X = source_matrix(dataset(file), "X", dataset(file).parent)
        assert_round_trip(store, "mop_snareseq_c1_rna", ms, cells, features, X)
    assert store_info(store)["measurements"]["ATAC"]["species"] == "mouse"


def test_paired_file_in_another_order(tmp_path, dataset):
    """A paired file's cells may come in any order: they are matched by cell id."""
    atac = ad.read_h5ad(dataset(MULTI_ATAC))
    shuffled = atac[np.random.default_rng(0).permutation(atac.n_obs)].copy()
    shuffled.write_h5ad(tmp_path / "atac_shuffled.h5ad")
    store = tmp_path / "s"
    ingest(store, dataset(MULTI_RNA), paired={"atac": tmp_path / "atac_shuffled.h5ad"}, dataset_id="m")
    assert_round_trip(store, "m", "ATAC", atac.obs_names, atac.var_names, sp.csr_matrix(atac.X))
    rna_obs = read_dataset(store, "RNA", "m")[0]
    atac_obs = read_dataset(store, "ATAC", "m")[0]
    assert rna_obs.soma_joinid.tolist() == atac_obs.soma_joinid.tolist()


def _liao_subset(data: Path, n: int = 300) -> ad.AnnData:
    a = ad.read_h5ad(data / LIAO)
    return a[:n].copy()


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_anndata_zarr_source(tmp_path, shared_data, zarr_format):
    a = ad.read_h5ad(shared_data / PBMC5K)[:400].copy()
    with ad.settings.override(zarr_write_format=zarr_format):
        a.write_zarr(tmp_path / "pbmc5k.zarr")
    summary = ingest(tmp_path / "s", tmp_path / "pbmc5k.zarr", chunk_size=150)
    assert summary.dataset_id == "pbmc5k"
    assert_round_trip(tmp_path / "s", "pbmc5k", "RNA", a.obs_names, a.var_names, sp.csr_matrix(a.X))


def test_10x_h5_source(tmp_path, shared_data):
    """A Cell Ranger v3 .h5 written from real counts: Ensembl ids by default, symbols on request."""
    a = _liao_subset(shared_data)
    X = sp.csc_matrix(a.X.T)  # features × cells, as 10x stores it
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = X.data.astype(np.int32), X.indices, X.indptr
        g["shape"] = np.array(X.shape)
        g["barcodes"] = np.array(a.obs_names, dtype="S")
        feats = g.create_group("features")
        feats["id"] = np.array(a.var["gene_ids"], dtype="S")
        feats["name"] = np.array(a.var_names, dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * a.n_vars, dtype="S")
        feats["genome"] = np.array(["GRCh38"] * a.n_vars, dtype="S")
    summary = ingest(tmp_path / "s", path, dataset_id="liao10x")
    assert summary.species == "human"
    assert store_info(tmp_path / "s")["measurements"]["RNA"]["id_namespace"] == "ensembl"
    assert_round_trip(tmp_path / "s", "liao10x", "RNA", a.obs_names, a.var["gene_ids"], sp.csr_matrix(a.X))


def test_10x_mtx_folder_source(tmp_path, shared_data):
    a = _liao_subset(shared_data)
    folder = tmp_path / "filtered_feature_bc_matrix"
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(a.X.T).astype(np.int64))
    pd.DataFrame({"id": a.var["gene_ids"], "name": a.var_names, "type": "Gene Expression"}).to_csv(
        folder / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(a.obs_names).to_csv(folder / "barcodes.tsv.gz", sep="\t", header=False, index=False)
    summary = ingest(tmp_path / "s", folder, tenx_feature_ids="name")
    assert summary.dataset_id == "filtered_feature_bc_matrix" and summary.species == "human"
    assert_round_trip(tmp_path / "s", summary.dataset_id, "RNA", a.obs_names, a.var_names, sp.csr_matrix(a.X))


def test_killed_ingest_leaves_store_as_before(tmp_path, dataset):
    store = tmp_path / "s"
    ingest(store, dataset(ASAP), modality="protein", species="human", dataset_id="asap")
    before = digest(store)
    with soma.Experiment.open(current_version(store).uri) as exp:
        counts_dir = Path(exp.ms["protein"].X["counts"].uri.removeprefix("file://"))
        n_cells = exp.obs.count
    fragments_before = len(list((counts_dir / "__fragments").iterdir()))
    script = (f"from atlas.store.ingest import ingest; ingest({str(store)!r}, {str(dataset(ADTNORM))!r}, "
              "modality='protein', species='human', chunk_size=1500)")
    proc = subprocess.Popen([PYTHON, "-c", script], cwd=ROOT)
    killed = False
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            staging = list((store / "versions").glob(f"{STAGING_PREFIX}*"))
            frag = staging[0] / counts_dir.relative_to(current_version(store).uri) / "__fragments" if staging else None
            if frag is not None and frag.exists() and len(list(frag.iterdir())) > fragments_before + 2:
                proc.send_signal(signal.SIGKILL)  # mid-write: some new fragments exist, most do not
                killed = True
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed, "the ingest finished (or never started writing) before it could be killed"
    assert list((store / "versions").glob(f"{STAGING_PREFIX}*")), "expected the dead ingest's staging tree"
    # Every committed file is byte-for-byte as before; the store reads as before.
    assert digest(store, skip_staging=True) == before
    assert read_record(store)["current"] == 1
    with soma.Experiment.open(current_version(store).uri) as exp:
        assert exp.obs.count == n_cells and set(exp.obs.read().concat()["dataset_id"].to_pylist()) == {"asap"}
    # The next ingest cleans the staging tree up and succeeds; the 422k cells round-trip.
    notes = []
    summary = ingest(store, dataset(ADTNORM), modality="protein", batch_key="batch",
                     label_keys={"cell_type_l1": "cell_type_l1", "cell_type_l2": "cell_type_l2"}, log=notes.append)
    assert summary.version == 2 and any("unfinished ingest" in n for n in notes)
    assert any("as the store's protein measurement" in n for n in notes)  # species from the store
    assert not list((store / "versions").glob(f"{STAGING_PREFIX}*"))
    src = ad.read_h5ad(dataset(ADTNORM))
    assert_round_trip(store, summary.dataset_id, "protein", src.obs_names, src.var_names, src.X)
    obs = read_dataset(store, "protein", summary.dataset_id)[0].set_index("cell_id")
    assert summary.cells_dropped_empty == src.n_obs - len(obs) == int((np.asarray((src.X != 0).sum(axis=1)).ravel() == 0).sum())
    assert (obs.cell_type_l2.to_numpy() == src.obs.cell_type_l2.loc[obs.index].astype(str).to_numpy()).all()
    assert (obs.batch.to_numpy() == src.obs.batch.loc[obs.index].astype(str).to_numpy()).all()
    assert digest(Path(current_version(store, 1).uri)) == {
        k.removeprefix("versions/v000001/"): v for k, v in before.items() if k.startswith("versions/v000001/")}


def test_in_memory_anndata_with_dask_x(tmp_path, shared_data):
    """The Python API also takes an AnnData object; a dask X is computed one block at a time."""
    import dask.array as da

    a = ad.read_h5ad(shared_data / PBMC5K)[:300].copy()
    dense = a.X.toarray()
    lazy = ad.AnnData(X=da.from_array(dense, chunks=(64, -1)), obs=a.obs.copy(), var=a.var.copy())
    with pytest.raises(Exception, match="dataset_id"):
        ingest(tmp_path / "s", lazy)
    summary = ingest(tmp_path / "s", lazy, dataset_id="lazy", chunk_size=100)
    assert summary.cells_ingested == 300
    assert_round_trip(tmp_path / "s", "lazy", "RNA", a.obs_names, a.var_names, sp.csr_matrix(dense))


@pytest.mark.real_data
def test_unlabeled_values_are_stored_as_missing_not_as_a_class(dataset, tmp_path):
    source = ad.read_h5ad(dataset("pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"))[:1500].copy()
    assert (source.obs["cell_type_l1"].astype(str) == "undefined").any()
    store = tmp_path / "store"
    ingest(store, source, dataset_id="pbmc", species="human", unlabeled=("undefined",),
           label_keys={"cell_type_l1": "cell_type_l1", "cell_type_l2": "cell_type_l2"})
    with soma.Experiment.open(store_info(store)["uri"]) as exp:
        obs = exp.obs.read(column_names=["cell_id", "cell_type_l1", "cell_type_l2"]).concat().to_pandas()
    expected = source.obs["cell_type_l1"].astype(str).replace({"undefined": ""})
    assert obs.set_index("cell_id")["cell_type_l1"].loc[source.obs_names].tolist() == expected.tolist()
    assert not (obs[["cell_type_l1", "cell_type_l2"]] == "undefined").any().any()
