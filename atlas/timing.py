"""Seconds per named stage of one piece of work, and their ``Server-Timing`` header form.

The mapping service times each request's stages (decode, prepare, embed, labels, profiles,
assemble, encode) with a :class:`StageClock` and answers them in a ``Server-Timing`` header
(RFC: W3C Server Timing; browsers' developer tools show it); the SDK parses it back with
:func:`parse_server_timing`, so a slow request can be traced to its stage from the client.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

_METRIC = re.compile(r"^[A-Za-z0-9_.\-]+$")


class StageClock:
    """Wall seconds per stage; a stage entered twice adds up. ``clock("embed")`` is a context."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        if not _METRIC.match(stage):
            raise ValueError(f"stage names are tokens (letters, digits, _ . -): {stage!r}")
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def header(self) -> str:
        """``Server-Timing`` value: ``decode;dur=12.3, embed;dur=450.0`` (milliseconds)."""
        return ", ".join(f"{name};dur={1000 * s:.1f}" for name, s in self.seconds.items())


def parse_server_timing(value: str | None) -> dict[str, float]:
    """Stage → seconds from a ``Server-Timing`` header; metrics without ``dur`` are skipped."""
    out: dict[str, float] = {}
    for metric in (value or "").split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        for param in params:
            key, _, number = param.partition("=")
            if key.strip().lower() == "dur" and name:
                try:
                    out[name] = out.get(name, 0.0) + float(number.strip().strip('"')) / 1000
                except ValueError:
                    pass
    return out
