"""The mapping report (``write_report``) and ``atlas evaluate``, on the tiny real atlas.

The 200 held-out pbmc10k query cells are mapped with ``map_query`` (proteins predicted), then
scored against their true labels and measured proteins: the report's files must exist and be
real PNGs, and the numbers in ``report.md`` / ``metrics.json`` must be ``label_transfer``'s.
"""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import atlas
from atlas.cli import app
from atlas.evaluate.baselines import log_normalise_frame
from atlas.evaluate.metrics import feature_pearson, label_transfer
from atlas.evaluate.report import write_report
from tests.tiny_atlas import LEVELS, PBMC

pytestmark = pytest.mark.real_data

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCHS = [{"epoch": 0, "loss": 2.5, "cells_per_s": 1000.0}, {"epoch": 1, "loss": 1.75, "cells_per_s": 1100.0}]


@pytest.fixture(scope="module")
def mapped_query(tiny_atlas, dataset):
    """``(atlas, mapped, query with measured proteins)``."""
    art, rna_query, proteins = tiny_atlas
    full = ad.read_h5ad(dataset(PBMC), backed="r")
    measured = full.obsm["protein_counts"].loc[list(rna_query.obs_names), proteins]
    full.file.close()
    query = rna_query.copy()
    query.obsm["protein_counts"] = pd.DataFrame(measured.to_numpy(), index=query.obs_names, columns=proteins)
    mapped = atlas.map_query(rna_query, art, predict=["protein"])
    return art, mapped, query


def _is_png(path):
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def _expected_files(out, metrics):
    names = [f"umap_{lv}.png" for lv in LEVELS] + [f"confusion_{lv}.png" for lv in LEVELS] + ["umap_batch.png"]
    r = pd.Series(metrics["protein"]["per_feature"], dtype=float).dropna()
    names += [f"protein_best_{r.idxmax()}.png", f"protein_worst_{r.idxmin()}.png"]
    return [out / n for n in names]


def test_write_report_on_real_cells(mapped_query, tmp_path):
    art, mapped, query = mapped_query
    manifest = {**art.manifest, "metrics": {"epochs": EPOCHS}}
    out = tmp_path / "report"
    path = write_report(mapped, query, out, levels=LEVELS, batch_key="batch", manifest=manifest)
    assert path == out / "report.md"
    metrics = json.loads((out / "metrics.json").read_text())
    for f in [*_expected_files(out, metrics), out / "loss_curve.png"]:
        assert _is_png(f), f
    text = path.read_text()
    for lv in LEVELS:
        expected = label_transfer(query.obs[lv], mapped.obs[f"{lv}_pred"])
        assert metrics["levels"][lv]["accuracy"] == pytest.approx(expected.accuracy)
        assert metrics["levels"][lv]["macro_f1"] == pytest.approx(expected.macro_f1)
        row = next(line for line in text.splitlines() if line.startswith(f"| {lv} |"))
        assert f"| {expected.accuracy:.4f} |" in row and f"| {expected.macro_f1:.4f} |" in row, row
        assert f"(confusion_{lv}.png)" in text and f"(umap_{lv}.png)" in text
    pearson = feature_pearson(mapped.obsm["protein_pred"], log_normalise_frame(query.obsm["protein_counts"]))
    assert metrics["protein"]["mean"] == pytest.approx(pearson.mean)
    assert f"Mean {pearson.mean:.4f}" in text
    assert "(loss_curve.png)" in text and "| 1 | 1.7500 |" in text
    assert 0.0 < metrics["protein"]["mean"] <= 1.0


def test_cli_evaluate_writes_same_report(mapped_query, tmp_path):
    art, mapped, query = mapped_query
    mapped_path, query_path = tmp_path / "mapped.h5ad", tmp_path / "query.h5ad"
    mapped.write_h5ad(mapped_path)
    query.write_h5ad(query_path)
    out = tmp_path / "cli_report"
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(mapped_path), str(query_path), "-o", str(out),
                                 "--levels", ",".join(LEVELS), "--atlas", str(art.path), "--batch-key", "batch"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for f in _expected_files(out, metrics):
        assert _is_png(f), f
    assert (out / "report.md").is_file()
    for lv in LEVELS:
        expected = label_transfer(query.obs[lv], mapped.obs[f"{lv}_pred"])
        assert metrics["levels"][lv]["accuracy"] == pytest.approx(expected.accuracy)
        assert f"{lv} accuracy {expected.accuracy:.3f}" in result.output

    # Wrong cells: one clear line, exit code 2, no traceback.
    other = query[: query.n_obs // 2].copy()
    other_path = tmp_path / "other.h5ad"
    other.write_h5ad(other_path)
    bad = runner.invoke(app, ["evaluate", str(mapped_path), str(other_path), "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2
    assert "cell ids differ" in bad.output and "Traceback" not in bad.output
    missing = runner.invoke(app, ["evaluate", str(tmp_path / "nope.h5ad"), str(query_path), "-o", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "not found" in missing.output
    assert np.all(np.isfinite(mapped.obsm["X_atlas"]))


def test_report_adds_scib_scores_when_the_query_has_batches(mapped_query, tmp_path):
    from atlas.evaluate.baselines import _log_normalised
    from atlas.evaluate.integration import integration_scores, pre_integration_pca

    _, mapped, query = mapped_query
    query = query.copy()
    query.obs["lane"] = np.where(np.arange(query.n_obs) % 2 == 0, "lane1", "lane2")
    write_report(mapped, query, tmp_path / "r", levels=LEVELS, batch_key="lane", umap=False)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    keep = ~query.obs[LEVELS[0]].astype(str).isin(("", "nan", "undefined")).to_numpy()
    expected = integration_scores(mapped.obsm["X_atlas"][keep], query.obs[LEVELS[0]].astype(str)[keep],
                                  query.obs["lane"][keep], pre_integration_pca(_log_normalised(query.X[keep]).toarray()))
    assert metrics["integration"]["scores"] == pytest.approx(expected)
    assert "## Integration (scIB)" in (tmp_path / "r" / "report.md").read_text()
    # One batch: said, not scored.
    write_report(mapped, query, tmp_path / "one", levels=LEVELS, batch_key="batch", umap=False)
    assert "fewer than two" in json.loads((tmp_path / "one" / "metrics.json").read_text())["integration"]["skipped"]
