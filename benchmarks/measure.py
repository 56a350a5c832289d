"""Run one benchmark setting in a subprocess and sample its memory and the machine's load.

Each setting runs in a fresh process so that its peak memory is its own; the sampler sums PSS
over the process and every descendant (Ray's raylet, workers and actors included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any


def tree_pss(proc: Any) -> tuple[int, int]:
    """(sum, max) PSS in bytes over a process and its descendants."""
    import psutil

    total = largest = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            pss = p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += pss
        largest = max(largest, pss)
    return total, largest


def run_measured(script: str, args: list[str], every: float = 0.5,
                 python: str | None = None) -> tuple[Any, dict[str, float]]:
    """Run ``python script *args`` (``python``: another interpreter, e.g. a peer's own
    environment); returns (its last stdout line parsed as JSON, measurements:
    ``peak_pss_mb``, ``largest_process_mb``, ``mean_load`` — the 1-min load average during the
    run, since other users' work slows every setting). Reading smaps costs CPU (more for Ray's
    many processes), so sampling stays sparse."""
    import psutil

    proc = subprocess.Popen([python or sys.executable, script, *args], stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = largest = 0
    loads: list[float] = []
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, largest
        while not done.is_set():
            total, big = tree_pss(ps)
            peak, largest = max(peak, total), max(largest, big)
            loads.append(os.getloadavg()[0])
            done.wait(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"run {script} {args} failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), {
        "peak_pss_mb": peak / 2**20, "largest_process_mb": largest / 2**20,
        "mean_load": sum(loads) / len(loads) if loads else float("nan"),
    }
