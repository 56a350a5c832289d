"""The offline mapper's progress: cells mapped so far, counted by a small Ray actor that the
mapping actors tell, shown as a rich bar on a terminal or a log line every ~10 % (job logs)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import ray


@ray.remote(num_cpus=0)
class _CellCounter:
    """Cells mapped so far, for the driver's progress bar (approximate if a block is retried)."""

    def __init__(self) -> None:
        self.cells = 0

    def add(self, n: int) -> None:
        self.cells += int(n)

    def get(self) -> int:
        return self.cells



class MappingProgress:
    """A rich progress bar on a terminal, a log line every ~10 % otherwise (job logs)."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.log = total, log
        self.counter = _CellCounter.remote()  # type: ignore[attr-defined]  # Ray actor class
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()

    def __enter__(self) -> MappingProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the bar and the counter actor (idempotent)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.counter is not None:
            ray.kill(self.counter)
            self.counter = None

    def _run(self) -> None:
        if sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            with Progress(TextColumn("[bold]map"), BarColumn(), MofNCompleteColumn(), TextColumn("cells"),
                          TimeElapsedColumn(), TimeRemainingColumn()) as bar:
                task = bar.add_task("map", total=self.total)
                while not self._stop.wait(1.0):
                    bar.update(task, completed=min(self._cells(), self.total))
                bar.update(task, completed=min(self._cells(), self.total))
            return
        step, next_report = max(self.total // 10, 1), max(self.total // 10, 1)
        while not self._stop.wait(2.0):
            done = self._cells()
            if done >= next_report:
                elapsed = time.perf_counter() - self._start
                self.log(f"[map] {done:,}/{self.total:,} cells ({done / self.total:.0%}), "
                         f"{done / max(elapsed, 1e-9):,.0f} cells/s")
                next_report = (done // step + 1) * step

    def _cells(self) -> int:
        try:
            return int(ray.get(self.counter.get.remote(), timeout=10))
        except Exception:  # noqa: BLE001 - progress must never fail the run
            return 0
