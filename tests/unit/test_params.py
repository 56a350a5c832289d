"""`atlas map` and `jobs/map_query.py` read the mapping options the same way (they had drifted:
the job took `--predict none` for a modality called "none" and refused `LEVEL=NUMBER,…`)."""

import importlib.util
from pathlib import Path

import pytest

from atlas.mapping.align import MappingError
from atlas.mapping.params import names_from_text, thresholds_from_text

JOB = Path(__file__).resolve().parents[2] / "jobs" / "map_query.py"


def _job_parser():
    spec = importlib.util.spec_from_file_location("map_query_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parser()


BASE = ["--atlas", "A", "--query", "Q", "--output", "O"]


@pytest.mark.parametrize("text,expected", [
    ("calibrated", "calibrated"), ("none", None), ("NONE", None), ("0.4", 0.4),
    ("cell_type_l1=0.5,cell_type_l2=0.25", {"cell_type_l1": 0.5, "cell_type_l2": 0.25}),
])
def test_thresholds_forms_are_the_same_for_the_job(text, expected):
    assert thresholds_from_text(text) == expected
    assert _job_parser().parse_args([*BASE, "--thresholds", text]).thresholds == expected


def test_job_default_thresholds_are_calibrated():
    assert _job_parser().parse_args(BASE).thresholds == "calibrated"


@pytest.mark.parametrize("text", ["l1=", "=0.5", "l1=high", "l1=0.5,", "many"])
def test_malformed_thresholds_are_refused_by_both(text):
    with pytest.raises(MappingError, match="LEVEL=NUMBER"):
        thresholds_from_text(text)
    with pytest.raises(SystemExit):
        _job_parser().parse_args([*BASE, "--thresholds", text])


@pytest.mark.parametrize("text,expected", [
    (None, None), ("none", []), ("", []), ("protein", ["protein"]), (" protein , ATAC ", ["protein", "ATAC"]),
])
def test_predict_and_levels_lists(text, expected):
    assert names_from_text(text) == expected
    args = _job_parser().parse_args(BASE + ([] if text is None else ["--predict", text]))
    assert names_from_text(args.predict) == expected  # what main() passes to map_offline
