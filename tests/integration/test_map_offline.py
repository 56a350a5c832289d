"""Offline mapping with Ray Data (read tasks → actor pool → Parquet) on real cells and real Ray:
the result must be map_query's, cell by cell, whatever the blocks and actors."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from atlas.errors import AtlasError
from atlas.mapping import MappingError, map_query
from atlas.mapping.offline import CELLS_DIR, SUMMARY, map_offline, read_mapping

pytestmark = [pytest.mark.real_data, pytest.mark.ray]


@pytest.fixture(scope="module")
def expected(tiny_atlas):
    atlas, query, _ = tiny_atlas
    return map_query(query, atlas)


def _assert_same_mapping(got: ad.AnnData, want: ad.AnnData, cell_ids=None) -> None:
    assert list(got.obs_names) == list(cell_ids if cell_ids is not None else want.obs_names)
    assert list(got.obs.columns) == list(want.obs.columns)
    for column in want.obs.columns:
        if column.endswith("_confidence"):
            np.testing.assert_allclose(got.obs[column].to_numpy(), want.obs[column].to_numpy(), atol=1e-5)
        else:
            assert got.obs[column].tolist() == want.obs[column].tolist(), column
    np.testing.assert_allclose(got.obsm["X_atlas"], want.obsm["X_atlas"], atol=1e-5)
    assert got.obsm["X_atlas"].dtype == np.float32
    assert sorted(got.obsm) == sorted(want.obsm)
    for key in want.obsm:
        if isinstance(want.obsm[key], pd.DataFrame):
            assert list(got.obsm[key].columns) == list(want.obsm[key].columns)
            np.testing.assert_allclose(got.obsm[key].to_numpy(), want.obsm[key].to_numpy(), atol=1e-5)


def test_h5ad_in_blocks_over_two_actors_equals_map_query(tiny_atlas, expected, ray_local, tmp_path):
    atlas, query, proteins = tiny_atlas
    path = tmp_path / "query.h5ad"
    query.write_h5ad(path)
    out = tmp_path / "mapped"

    summary = map_offline(path, atlas.path, out, block_cells=64, actors=2, progress=False, log=lambda _: None)

    assert summary.cells == query.n_obs == 200 and summary.blocks == 4 and summary.actors == 2
    got = read_mapping(out)
    _assert_same_mapping(got, expected)
    assert list(got.obsm["protein_pred"].columns) == proteins
    assert got.uns["atlas"]["version"] == atlas.version

    # Ray Data wrote one file per block, each a contiguous run of rows; every cell once.
    files = sorted((out / CELLS_DIR).glob("*.parquet"))
    assert len(files) == 4
    rows = np.sort(np.concatenate([pq.read_table(f, columns=["row"]).column("row").to_numpy() for f in files]))
    np.testing.assert_array_equal(rows, np.arange(200))
    table = pq.read_table(files[0])
    assert table.schema.field("X_atlas").type.list_size == expected.obsm["X_atlas"].shape[1]

    written = json.loads((out / SUMMARY).read_text())
    assert written["cells"] == 200 and written["cells_per_s"] > 0
    for level in ("cell_type_l1", "cell_type_l2"):
        counts = expected.obs[f"{level}_pred"].value_counts().to_dict()
        assert written["levels"][level]["labels"] == counts
        assert written["levels"][level]["unknown_fraction"] == pytest.approx(expected.obs[f"{level}_unknown"].mean())

    # An existing output is refused, and replaced only when asked.
    with pytest.raises(MappingError, match="already exists"):
        map_offline(path, atlas.path, out, block_cells=64, progress=False, log=lambda _: None)
    assert len(list((out / CELLS_DIR).glob("*.parquet"))) == 4


def test_zarr_and_store_queries_match_by_feature_id(tiny_atlas, expected, ray_local, tmp_path):
    """Genes in another order than the atlas's: matched by id (zarr: var_names; a query store: its
    own vocabulary), results identical; overwrite replaces an earlier output."""
    from atlas.store.ingest import ingest

    atlas, query, _ = tiny_atlas
    shuffled = query[:, np.random.default_rng(1).permutation(query.n_vars)].copy()
    # Two interleaved batches (a categorical column): each batch's statistics span every block.
    # The default ("auto") adapts every layer of a batch whose estimated mix overlaps the
    # reference's by min_mix_overlap, the input layer of the other: with the threshold between
    # the two batches' overlaps, one of each — offline as in one process.
    shuffled.obs["sample"] = pd.Categorical(np.where(np.arange(query.n_obs) % 3 == 0, "a", "b"))
    zarr_path = tmp_path / "query.zarr"
    shuffled.write_zarr(zarr_path)
    out = tmp_path / "mapped"
    probe = map_query(shuffled, atlas, batch_key="sample", min_domain_cells=50, levels=["cell_type_l1"])
    overlap = {b: v["composition_overlap"] for b, v in probe.uns["atlas"]["query_domains"]["batches"].items()}
    assert overlap["a"] != overlap["b"]
    options = dict(batch_key="sample", min_domain_cells=50, min_mix_overlap=float(np.mean(list(overlap.values()))))
    map_offline(zarr_path, atlas.path, out, block_cells=64, actors=1, progress=False, log=lambda _: None, **options)
    got = read_mapping(out)
    want = map_query(shuffled, atlas, **options)
    _assert_same_mapping(got, want)
    domains = want.uns["atlas"]["query_domains"]
    assert json.loads((out / SUMMARY).read_text())["atlas"]["query_domains"] == domains
    assert domains["statistics"] == "auto"
    higher = max(overlap, key=overlap.get)
    assert {b: v["layers"] for b, v in domains["batches"].items()} == {
        b: "all" if b == higher else "input" for b in overlap}, domains

    store = tmp_path / "query_store"
    ingest(store, shuffled, dataset_id="q", species="human", progress=False)
    # The whole query named one batch: its statistics span the store's 3 blocks.
    map_offline(store, atlas.path, out, block_cells=96, actors=1, overwrite=True, progress=False,
                log=lambda _: None, batch="q", min_domain_cells=50)
    got = read_mapping(out)
    want = map_query(shuffled, atlas, batch="q", min_domain_cells=50)
    _assert_same_mapping(got, want, cell_ids=[f"q:{c}" for c in want.obs_names])
    assert not np.allclose(want.obsm["X_atlas"], expected.obsm["X_atlas"], atol=1e-4)  # the statistics count
    assert not list(tmp_path.glob(".mapped.staging-*"))


def test_a_worker_error_reaches_the_caller_as_a_mapping_error(tiny_atlas, ray_local, tmp_path):
    """Cells past the driver's first-block check that are not raw counts: the actor's
    MappingError comes back as one, and no output (or staging folder) is left behind."""
    atlas, query, _ = tiny_atlas
    late = query.copy()
    late.X = sp.csr_matrix(late.X, dtype=np.float32) * 0.37
    both = ad.concat([query, late])
    both.obs_names = [f"c{i}" for i in range(both.n_obs)]
    both.write_h5ad(tmp_path / "query.h5ad")
    with pytest.raises(MappingError, match="worker.*raw counts") as err:
        map_offline(tmp_path / "query.h5ad", atlas.path, tmp_path / "out", block_cells=128, actors=1,
                    progress=False, log=lambda _: None)
    assert "\n" not in str(err.value)  # the user's message, without Ray's traceback and retry advice
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.staging-*"))


def test_clear_errors_before_any_worker_starts(tiny_atlas, tmp_path):
    atlas, query, _ = tiny_atlas
    text = tmp_path / "cells.csv"
    text.write_text("cell,gene\nc1,3\n")
    with pytest.raises(MappingError, match="not an .h5ad"):
        map_offline(text, atlas.path, tmp_path / "a", progress=False, log=lambda _: None)
    with pytest.raises(MappingError, match="does not exist"):
        map_offline(tmp_path / "missing.h5ad", atlas.path, tmp_path / "b", progress=False, log=lambda _: None)
    path = tmp_path / "query.h5ad"
    query.write_h5ad(path)
    with pytest.raises(AtlasError, match="label level"):
        map_offline(path, atlas.path, tmp_path / "c", levels=["tissue"], progress=False, log=lambda _: None)
    with pytest.raises(AtlasError):
        map_offline(path, tmp_path / "no_atlas", tmp_path / "d", progress=False, log=lambda _: None)
    normalised = query.copy()
    normalised.X = normalised.X.astype(np.float32) * 0.37
    normalised.write_h5ad(tmp_path / "normalised.h5ad")
    with pytest.raises(MappingError, match="raw counts"):
        map_offline(tmp_path / "normalised.h5ad", atlas.path, tmp_path / "e", progress=False, log=lambda _: None)
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_job_entrypoint(tiny_atlas, expected, ray_local, tmp_path, capsys):
    """``python jobs/map_query.py`` (what ``ray job submit`` runs): options reach map_offline,
    a user error is one line on stderr and exit code 2."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("map_query_job", Path(__file__).parents[2] / "jobs" / "map_query.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    atlas, query, _ = tiny_atlas
    args = ["--atlas", str(atlas.path), "--output", str(tmp_path / "out"), "--no-progress"]
    assert job.main(["--query", str(tmp_path / "missing.h5ad"), *args]) == 2
    assert capsys.readouterr().err.startswith("error: query")

    query.write_h5ad(tmp_path / "query.h5ad")
    assert job.main(["--query", str(tmp_path / "query.h5ad"), "--levels", "cell_type_l1", "--block-cells", "100",
                     *args]) == 0
    assert "mapped 200 cells" in capsys.readouterr().out
    got = read_mapping(tmp_path / "out")
    level1 = ["cell_type_l1_pred", "cell_type_l1_confidence", "cell_type_l1_unknown"]
    assert list(got.obs.columns) == level1
    assert got.obs["cell_type_l1_pred"].tolist() == expected.obs["cell_type_l1_pred"].tolist()
    np.testing.assert_allclose(got.obsm["X_atlas"], expected.obsm["X_atlas"], atol=1e-5)
