"""Stopping `atlas serve` and `atlas build` the way a container runtime, systemd or a user does.

SIGTERM used to end `atlas serve` with a native stack trace and leave Ray's DashboardAgent and
RuntimeEnvAgent running; SIGINT sent to its pid alone had not stopped it after 35 s. Now both
shut Serve and the local Ray down, print one line and leave no process behind. Every process
the command starts inherits a marker variable, so the check finds exactly its processes (and
not the test session's own Ray).
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from atlas.local_cluster import free_port
from tests.service_process import wait_healthy

pytestmark = [pytest.mark.real_data, pytest.mark.ray]

ATLAS = str(Path(sys.executable).parent / "atlas")
PBMC10K = "pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"


def _env(marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["ATLAS_TEST_MARKER"] = marker
    return env


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("ATLAS_TEST_MARKER") == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _assert_nothing_left(marker: str, grace: float = 20.0) -> None:
    deadline = time.monotonic() + grace  # processes that are already exiting may take a moment
    while True:
        left = [p for p in _marked(marker) if p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    names = []
    for p in left:
        try:
            names.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
        try:
            p.kill()  # do not leak them into the rest of the suite
        except psutil.Error:
            pass
    assert not names, "processes left behind:\n" + "\n".join(names)


def _stop(proc: subprocess.Popen, sig: int, timeout: float = 90.0) -> tuple[int, str]:
    proc.send_signal(sig)  # to the command's pid alone, not its process group
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"not stopped {timeout:.0f} s after {signal.Signals(sig).name}") from None
    return proc.returncode, out or ""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_atlas_serve_stops_cleanly_on(sig, tiny_atlas, tmp_path):
    atlas, _, _ = tiny_atlas
    marker = uuid.uuid4().hex
    token = tmp_path / "token"
    token.write_text("a-long-enough-test-token-0123456789\n")
    port = free_port()
    screen = tmp_path / "screen.txt"
    with open(screen, "w") as out_file:
        proc = subprocess.Popen([ATLAS, "serve", str(atlas.path), "--port", str(port), "--token-file", str(token),
                                 "--log-file", str(tmp_path / "ray.log")],
                                env=_env(marker), stdout=out_file, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc, screen)
            code, _ = _stop(proc, sig)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    out = screen.read_text()
    assert code == 0, out[-3000:]
    stopping = [line for line in out.splitlines() if "stopping" in line]
    assert stopping == [f"   {signal.Signals(sig).name}: stopping the mapping service…"], out[-3000:]
    assert "Traceback" not in out and "INFO" not in out, out[-3000:]  # Ray's logs went to the log file
    assert (tmp_path / "ray.log").stat().st_size > 0
    _assert_nothing_left(marker)


def test_atlas_build_stops_cleanly_on_sigterm_and_says_how_to_resume(dataset, tmp_path):
    import anndata as ad

    from atlas.store.ingest import ingest

    cells = ad.read_h5ad(dataset(PBMC10K))[:600].copy()
    ingest(tmp_path / "store", cells, dataset_id="pbmc10k", label_keys={"cell_type_l1": "cell_type_l1"})
    config = tmp_path / "build.yaml"
    config.write_text(yaml.safe_dump({
        "name": "stopped", "store": str(tmp_path / "store"), "output": str(tmp_path / "artifact"),
        "model": {"model": "concerto", "modalities": ["RNA"], "embed_dim": 16},
        "data": {"batch_size": 32}, "train": {"epochs": 200, "checkpoint_every": 5},
        "scaling": {"num_workers": 1, "use_gpu": False}, "run": {"storage_path": str(tmp_path / "runs")},
        "index": {"levels": ["cell_type_l1"]},
    }))
    marker = uuid.uuid4().hex
    screen = tmp_path / "screen.txt"
    with open(screen, "w") as out_file:
        proc = subprocess.Popen([ATLAS, "build", str(config), "--log-file", str(tmp_path / "ray.log")],
                                env=_env(marker), stdout=out_file, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log = tmp_path / "ray.log"
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                if log.exists() and "[train] epoch" in log.read_text(errors="replace"):
                    break  # training runs (Ray Train workers are up)
                time.sleep(1)
            assert proc.poll() is None, screen.read_text()[-3000:]
            code, _ = _stop(proc, signal.SIGTERM)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    out = screen.read_text()
    assert code == 128 + signal.SIGTERM, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: SIGTERM: the build stopped") and f"atlas build {config} --resume" in last, out
    assert "Traceback" not in out
    assert not (tmp_path / "artifact").exists()
    _assert_nothing_left(marker)
