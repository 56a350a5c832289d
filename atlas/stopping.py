"""Stop signals for long-running commands (``atlas serve``, ``atlas build``).

A container runtime or systemd stops a process with SIGTERM, whose default action kills Python
on the spot: no ``finally`` runs, so Serve and the local Ray it started were left behind. Here
SIGTERM and SIGINT both raise :class:`StopRequested` in the main thread, the command's own
clean-up runs, and a second signal during that clean-up is noted instead of cutting it short.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

_armed: dict[int, Callable[[int, FrameType | None], None]] = {}
_received: list[int] = []
"""The handlers of the innermost active :func:`stop_on_signals`, by signal."""


def rearm() -> None:
    """Put the active stop handlers back: ``ray.init()`` installs its own SIGTERM handler
    (``sys.exit``), which would skip the clean-up. Call it after ``ray.init``; a no-op when no
    :func:`stop_on_signals` block is active."""
    if threading.current_thread() is threading.main_thread():
        for sig, handler in _armed.items():
            signal.signal(sig, handler)


def stop_reason(interrupt: KeyboardInterrupt) -> StopRequested:
    """``interrupt`` as a :class:`StopRequested`: libraries (Ray Train's ``fit``) may catch ours
    and raise a plain KeyboardInterrupt, which then stands for the last signal received."""
    if isinstance(interrupt, StopRequested):
        return interrupt
    return StopRequested(_received[-1] if _received else signal.SIGINT)


class StopRequested(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived; ``signal_name`` says which. A KeyboardInterrupt, so code that
    already cleans up after Ctrl-C does the same for SIGTERM."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Within the block, the first of ``signals`` raises :class:`StopRequested`; later ones are
    ignored (with a note on stderr) so that shutting down is not interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    stopping = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            print(f"{signal.Signals(signum).name} again: already stopping, please wait", file=sys.stderr, flush=True)
            return
        stopping = True
        _received.append(signum)
        raise StopRequested(signum)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    outer = dict(_armed)
    _armed.clear()
    _armed.update({sig: handler for sig in signals})
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _armed.clear()
        _armed.update(outer)
