"""benchmarks/gpu.py runs unchanged on the CPU at a small size, so it works the first time a GPU
is lent: every stage (resample, ingest, build, offline mapping, service) runs and is reported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.real_data, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_runs_every_stage_at_a_small_size(shared_data, tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "ATLAS_SHARED_DATA": str(shared_data)}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--reference-cells", "800", "--query-cells", "300",
         "--service-cells", "200", "--embed-dim", "32", "--batch-size", "64", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "gpu.json").read_text())
    stages = result["stages"]
    assert list(stages) == ["data", "ingest", "build", "offline", "service"]
    assert stages["build"]["cells"] == 800 and stages["offline"]["cells"] == 300 and stages["service"]["cells"] == 200
    assert all(s["seconds"] > 0 for name, s in stages.items() if name != "data")
    assert set(stages["build"]["parts"]) >= {"train", "embed", "index"}
    assert (result["gpus"] == 0) == (result["peak_gpu_memory_gib"] is None) and result["peak_host_memory_gib"] > 0
    table = (out / "gpu.md").read_text()
    assert "| build | 800 |" in table and "585 (1M-cell reference, 8 GPUs)" in table
