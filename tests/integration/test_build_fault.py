"""A train worker killed mid-build: the run resumes from its last checkpoint and ends as an
uninterrupted one would."""

import json
import threading
import time
from pathlib import Path

import psutil
import pytest

from atlas.data.dataset import build_plan, vocabulary_sizes
from atlas.train.trainer import train
from tests.build_helpers import concerto_config

pytestmark = [pytest.mark.real_data, pytest.mark.ray]


def _registered_checkpoints(run: Path) -> list:
    """Checkpoints Ray Train has registered (a checkpoint folder alone may still be uploading)."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("checkpoint_results", [])
    except (OSError, ValueError):
        return []


def _train_worker_pids(started_after: float) -> list[int]:
    """Train workers of this test's Ray only: tests run in parallel, and a worker of another
    test's cluster (the raylet that started it is another) must not be the one killed."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    return [p.pid for p in psutil.process_iter(["cmdline", "create_time", "ppid"])
            if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::RayTrainWorker")
            and p.info["create_time"] >= started_after and p.info["ppid"] == raylet]


def test_killed_worker_resumes_from_last_checkpoint(pbmc, ray_local, tmp_path):
    store, _ = pbmc
    build = concerto_config(store, tmp_path / "artifact", tmp_path, name="test-fault",
                             train={"epochs": 2, "checkpoint_every": 8})
    plan = build_plan(store, build.data)
    sizes = vocabulary_sizes(store, ["RNA"])
    baseline = train(build, plan, sizes)

    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=train(build, plan, sizes)))
    started = time.time()
    runner.start()
    deadline = time.monotonic() + 300
    killed = None
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        runs = [r for r in (tmp_path / "runs").glob("test-fault-*") if r.name != Path(baseline.run_path).name]
        workers = _train_worker_pids(started)
        if runs and _registered_checkpoints(runs[0]) and workers:
            killed = workers[-1]
            psutil.Process(killed).kill()
        time.sleep(0.5)
    runner.join(timeout=600)
    assert killed is not None, "training ended before a checkpoint could be interrupted"
    result = outcome["result"]
    assert result.history.get("resumes"), "the run did not resume from a checkpoint"
    assert len(result.history["epochs"]) == 2
    final, reference = result.history["epochs"][-1]["loss"], baseline.history["epochs"][-1]["loss"]
    assert abs(final - reference) < 0.1 * reference, (final, reference)
