"""Stage timings and their Server-Timing header form (what the service answers, the SDK reads)."""

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from atlas.timing import StageClock, parse_server_timing

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789_.-", min_size=1, max_size=12)


def test_a_stage_entered_twice_adds_up_and_an_error_still_counts():
    clock = StageClock()
    with clock("embed"):
        time.sleep(0.01)
    with pytest.raises(KeyError), clock("embed"):
        raise KeyError("x")
    assert list(clock.seconds) == ["embed"] and clock.seconds["embed"] >= 0.01


@given(st.dictionaries(names, st.floats(min_value=0, max_value=1e4, allow_nan=False), max_size=8))
def test_header_round_trips_to_the_millisecond(stages):
    clock = StageClock()
    for name, seconds in stages.items():
        clock.add(name, seconds)
    back = parse_server_timing(clock.header())
    assert back.keys() == stages.keys()
    for name, seconds in stages.items():
        assert back[name] == pytest.approx(seconds, abs=1e-4)


@pytest.mark.parametrize("value, expected", [
    (None, {}), ("", {}), ("cache", {}), ("db;desc=x", {}), ("db;dur=abc", {}),
    ('db;dur="12.5";desc="x", app;dur=1000', {"db": 0.0125, "app": 1.0}),
    ("a;dur=1, a;dur=2", {"a": 0.003}),
])
def test_parser_takes_only_well_formed_durations(value, expected):
    assert parse_server_timing(value) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["", "two words", "a,b", "a;b"])
def test_stage_names_that_would_break_the_header_are_refused(bad):
    with pytest.raises(ValueError, match="stage names"):
        StageClock().add(bad, 1.0)
