"""Keep Ray's own output off the user's screen: it goes to a log file, the screen keeps ours.

Ray, Ray Serve and their native code write to the process's stdout and stderr from many places:
Python loggers created at any time, a thread that prints forwarded worker logs, C++ core logs
written straight to file descriptor 2 (``raylet … graceful_shutdown failed``). Filtering each is
a losing game, so :func:`ray_output_to_file` points descriptors 1 and 2 at the log file for the
duration, and hands back a :class:`rich.console.Console` on the real terminal for what the user
should see. ``--verbose`` in the CLI skips all of it.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WORKER_PREFIX = re.compile(r"^\((?P<who>[^)]*?)(?: pid=\d+)?(?:, ip=[^)]*)?\)\s?")
_PROGRESS = re.compile(r"^\[(?:build|train)\]")


def default_log_path(command: str) -> Path:
    """Where ``atlas COMMAND`` writes Ray's logs unless told otherwise (printed on screen)."""
    folder = Path(tempfile.gettempdir()) / "atlas-logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def progress_line(raw: str) -> str | None:
    """The project's own progress line (``[build] …``, ``[train] …``) inside a Ray log line, or None.

    Ray prefixes forwarded worker output with ``(ActorName pid=…)`` and colours it; both go.
    """
    line = _ANSI.sub("", raw).strip()
    line = _WORKER_PREFIX.sub("", line)
    return line if _PROGRESS.match(line) else None


@contextmanager
def ray_output_to_file(log: Path) -> Iterator[Console]:
    """Send everything written to stdout/stderr (Python or native) to ``log``; yield a console on
    the terminal."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    _flush_std()
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = io.TextIOWrapper(os.fdopen(os.dup(saved_err), "wb", buffering=0), write_through=True,
                                encoding=getattr(sys.stderr, "encoding", None) or "utf-8", errors="replace")
    console = Console(file=terminal, force_terminal=_is_terminal(saved_err) or None)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    try:
        yield console
    finally:
        _flush_std()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        terminal.close()


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


@contextmanager
def worker_progress_to(show: Callable[[str], None]) -> Iterator[None]:
    """Within the block, the project's progress lines from Ray workers (forwarded to this driver
    by Ray's ``log_to_driver``) also reach ``show``; Ray's own printing of them goes on.

    Ray's dispatcher of forwarded worker output is private API: when it is not there (another Ray
    version), nothing is forwarded and the log file still has every line.
    """
    name = "atlas_progress"

    def handle(data: dict) -> None:
        for raw in data.get("lines", ()):
            line = progress_line(raw)
            if line:
                show(line)

    dispatcher = None
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher

        global_worker_stdstream_dispatcher.add_handler(name, handle)
        dispatcher = global_worker_stdstream_dispatcher
    except Exception:  # noqa: BLE001 - a changed private API must not break the command
        pass
    try:
        yield
    finally:
        if dispatcher is not None:
            dispatcher.remove_handler(name)


_EPOCH = re.compile(r"^\[train\] epoch (?P<epoch>\d+)/(?P<epochs>\d+)(?: step (?P<step>\d+)/~?(?P<steps>\d+))?(?P<rest>.*)$")


class BuildProgress:
    """A progress bar over training epochs (from ``[train] epoch i/N …`` lines) with every other
    progress line (``[build] …``) printed above it."""

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("epochs"), TimeElapsedColumn(),
                                  console=console, transient=False)
        self._task = None
        self._last: str | None = None

    def __enter__(self) -> BuildProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def line(self, text: str) -> None:
        if text == self._last:  # Ray forwards a worker's line once per stream it was written to
            return
        self._last = text
        match = _EPOCH.match(text)
        if match is None:
            self._progress.console.print(f"   {text}", markup=False, highlight=False, soft_wrap=True)
            return
        epochs, epoch = int(match["epochs"]), int(match["epoch"])
        if self._task is None:
            self._task = self._progress.add_task("training", total=epochs)
        rest = match["rest"].strip()
        if rest.startswith("done"):
            self._progress.update(self._task, completed=epoch, description=f"training: epoch {epoch}/{epochs} done")
            self._progress.console.print(f"   {text}", markup=False, highlight=False, soft_wrap=True)
        else:
            step = f" step {match['step']}/~{match['steps']}" if match["step"] else ""
            rest = re.sub(r"\s*\(worker \d+\)$", "", rest)
            self._progress.update(self._task, completed=epoch - 1,
                                  description=f"training: epoch {epoch}/{epochs}{step} {rest}".rstrip())
