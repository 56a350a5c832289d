"""The mapping parameters have one declaration (MapParams) and one text parser, so `atlas map`,
`jobs/map_query.py` and the service's query string accept the same forms (they had drifted: the
job took `--predict none` for a modality called "none" and refused `LEVEL=NUMBER,…`)."""

import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atlas import wire
from atlas.cli import app
from atlas.mapping.align import MappingError
from atlas.mapping.params import MapParams, names_from_text, params_from_text, thresholds_from_text

JOB = Path(__file__).resolve().parents[2] / "jobs" / "map_query.py"


def _job():
    spec = importlib.util.spec_from_file_location("map_query_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BASE = ["--atlas", "A", "--query", "Q", "--output", "O"]


def _job_params(*argv: str) -> MapParams:
    job = _job()
    return job.params_of(job.parser().parse_args([*BASE, *argv]))


@pytest.mark.parametrize("text,expected", [
    ("calibrated", "calibrated"), ("none", None), ("NONE", None), ("0.4", 0.4),
    ("cell_type_l1=0.5,cell_type_l2=0.25", {"cell_type_l1": 0.5, "cell_type_l2": 0.25}),
    ('{"cell_type_l1": 0.5}', {"cell_type_l1": 0.5}),
])
def test_thresholds_forms_are_the_same_everywhere(text, expected):
    assert thresholds_from_text(text) == expected
    assert _job_params("--thresholds", text).thresholds == expected
    assert wire.merge_params({}, wire.params_from_query([("thresholds", text)])).thresholds == expected


def test_job_defaults_are_map_params_defaults():
    assert _job_params() == MapParams()


@pytest.mark.parametrize("text", ["l1=", "=0.5", "l1=high", "l1=0.5,", "many"])
def test_malformed_thresholds_are_refused_by_all(text):
    with pytest.raises(MappingError, match="LEVEL=NUMBER"):
        thresholds_from_text(text)
    with pytest.raises(MappingError, match="LEVEL=NUMBER"):
        _job_params("--thresholds", text)
    with pytest.raises(wire.WireError, match="LEVEL=NUMBER"):
        wire.params_from_query([("thresholds", text)])


@pytest.mark.parametrize("text,expected", [
    (None, None), ("none", []), ("", []), ("protein", ["protein"]), (" protein , ATAC ", ["protein", "ATAC"]),
])
def test_predict_lists(text, expected):
    assert names_from_text(text) == expected
    assert _job_params(*([] if text is None else ["--predict", text])).predict == expected


def test_every_parameter_reaches_the_job_in_text_form():
    params = _job_params("--levels", "l1,l2", "--predict-method", "both", "--k-coarse", "30", "--k-fine", "3",
                         "--min-fraction", "0.25", "--domain-statistics", "reference", "--min-domain-cells", "50",
                         "--batch-key", "donor")
    assert params == MapParams(levels=["l1", "l2"], predict_method="both", k_coarse=30, k_fine=3, min_fraction=0.25,
                               domain_statistics="reference", min_domain_cells=50, batch_key="donor")
    with pytest.raises(MappingError, match="k_coarse must be an integer, got 'many'"):
        _job_params("--k-coarse", "many")
    with pytest.raises(MappingError, match="domain_statistics must be one of"):
        _job_params("--domain-statistics", "yes")


def test_the_cli_offers_every_parameter():
    import re

    help_text = CliRunner().invoke(app, ["map", "--help"], terminal_width=200).output
    offered = set(re.findall(r"--[a-z][a-z-]*", help_text))
    for name in MapParams.model_fields:
        option = "--neighbors" if name == "return_neighbors" else "--" + name.replace("_", "-")
        assert option in offered, option


@pytest.mark.parametrize("values,match", [
    ({"batch_key": ""}, "batch_key must be the name of an obs column"),
    ({"min_domain_cells": 1}, "min_domain_cells must be ≥ 2"),
    ({"domain_statistics": "per-cell"}, "domain_statistics must be one of"),
    ({"batch_key": "donor", "batch": "d1"}, "not both"),
    ({"batch": 3}, "batch must be a batch name"),
])
def test_domain_parameters_are_checked(values, match):
    with pytest.raises(MappingError, match=match):
        MapParams.parse(values)


def test_text_and_json_forms_agree():
    text = params_from_text([("levels", "a"), ("levels", "b"), ("return_neighbors", "yes"), ("batch_key", "donor")])
    assert MapParams.parse(text) == MapParams(levels=["a", "b"], return_neighbors=True, batch_key="donor")
    with pytest.raises(MappingError, match="given 2 times"):
        params_from_text([("k_fine", "3"), ("k_fine", "4")])


def test_a_positional_list_is_refused_with_the_way_to_give_options():
    # map_query(adata, atlas, ["cell_type_l1"]) meant levels before MapParams: say how to pass it
    with pytest.raises(MappingError, match="give options by name"):
        MapParams.parse(["cell_type_l1"])
