"""The README cannot rot: its five-minute tour is run here as written, and every other command
in its shell blocks must name the test (or the CI step) that runs it.

The tour runs in a temporary folder laid out like the repository root (``.venv``, ``serve/`` and
``jobs/`` linked in), with ``ATLAS_SHARED_DATA`` pointing at 2,000-cell subsets of the two real
files it copies, so that the commands are byte-for-byte the README's and still take ~2 minutes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import anndata as ad
import httpx
import numpy as np
import pytest

from tests.build_helpers import subset
from tests.service_process import wait_healthy

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
TOUR = "Five-minute tour"
PBMC10K = "pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"
PBMC5K = "pbmc5k_10x_totalvi_rna4000hvg_noprotein.h5ad"

# Commands of the README's shell blocks outside the tour, and what runs each of them.
RUN_ELSEWHERE = {
    r"^make demo\b": "the demo itself (`make demo`, run for every closing note)",
    r"^make test\b": ".ci/run",
    r"ray job submit .* python jobs/build_atlas\.py":
        "tests/integration/test_build_job_submit.py::test_cvqvae_build_submitted_with_ray_job_submit",
    r"ray job submit .* python jobs/map_query\.py": "tests/integration/test_map_offline.py::test_job_entrypoint",
    r"^serve run serve/config\.yaml": "tests/integration/test_readme.py::test_serve_run_config_yaml",
}


def readme_blocks() -> list[tuple[str, str, str]]:
    """``(section heading, language, body)`` of every fenced block in the README."""
    out, heading = [], ""
    lines = README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            heading = line[3:].strip()
        match = re.match(r"^```(\w*)\s*$", line)
        if match:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            out.append((heading, match.group(1), "\n".join(lines[i + 1:j])))
            i = j
        i += 1
    return out


def shell_commands(body: str) -> list[str]:
    """Commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    commands = []
    for line in joined.splitlines():
        line = line.split("  #")[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            commands.append(line)
    return commands


def tour_blocks():
    return [(lang, body) for heading, lang, body in readme_blocks() if heading == TOUR]


def test_every_readme_shell_command_is_run_by_a_test():
    elsewhere = []
    for heading, lang, body in readme_blocks():
        if lang != "bash" or heading == TOUR:
            continue
        for command in shell_commands(body):
            runner = next((who for pattern, who in RUN_ELSEWHERE.items() if re.search(pattern, command)), None)
            assert runner is not None, (f"README command {command!r} (section {heading!r}) is run by no test: "
                                        "add it to the tour or to RUN_ELSEWHERE with the test that runs it")
            elsewhere.append(runner)
    for runner in elsewhere:
        if "::" in runner:
            path, name = runner.split("::")
            assert f"def {name}(" in (REPO / path).read_text(), f"{runner} does not exist"
    assert [lang for lang, _ in tour_blocks()] == ["bash", "yaml", "python", "bash", "python"]


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def tour_dir(dataset, tmp_path_factory):
    """A folder laid out like the repository root, and subsets of the two real files."""
    root = tmp_path_factory.mktemp("readme_tour")
    for name in (".venv", "serve", "jobs"):
        (root / name).symlink_to(REPO / name)
    shared = root / "shared_data"
    shared.mkdir()
    for name in (PBMC10K, PBMC5K):
        subset(ad.read_h5ad(dataset(name)), 2000).write_h5ad(shared / name)
    env = {**os.environ, "ATLAS_SHARED_DATA": str(shared), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return root, env


def _bash(command: str, cwd: Path, env: dict, log: Path) -> subprocess.CompletedProcess:
    script = f"set -eo pipefail\nsource .venv/bin/activate\n{command}\n"
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    with log.open("a") as f:
        f.write(f"$ {command}\n{done.stdout}\n{done.stderr}\n")
    assert done.returncode == 0, f"README command failed: {command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.real_data
def test_the_tour_runs_as_written(tour_dir):
    root, env = tour_dir
    log = root / "tour.log"
    (_, bash1), (_, build_yaml), (_, load_py), (_, bash2), (_, notebook) = tour_blocks()
    (root / "build.yaml").write_text(build_yaml + "\n")
    assert _free(8000), "port 8000 (the tour's) is taken on this machine"

    for command in shell_commands(bash1):
        if command == "source .venv/bin/activate":
            continue
        done = _bash(command, root, env, log)
        if command.startswith("atlas info"):
            info = json.loads(done.stdout)
            assert "pbmc10k" in json.dumps(info)
    assert (root / "artifacts" / "pbmc" / "manifest.json").is_file()

    done = subprocess.run([str(root / ".venv" / "bin" / "python"), "-c", load_py], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cell_type_l1" in done.stdout

    serve_cmd = None
    for command in shell_commands(bash2):
        if command.startswith("atlas serve"):
            serve_cmd = command
            break
        _bash(command, root, env, log)
    assert serve_cmd is not None
    serve_log = root / "serve.log"
    with serve_log.open("w") as out:
        service = subprocess.Popen(["bash", "-c", f"source .venv/bin/activate && exec {serve_cmd}"], cwd=root,
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy("http://127.0.0.1:8000", service, serve_log)
        for command in shell_commands(bash2):
            if command.startswith("atlas map"):
                _bash(command, root, env, log)
        served, offline = ad.read_h5ad(root / "mapped.h5ad"), ad.read_h5ad(root / "mapped_offline.h5ad")
        assert served.n_obs == 2000
        assert list(served.obs["cell_type_l1_pred"]) == list(offline.obs["cell_type_l1_pred"])
        np.testing.assert_allclose(served.obsm["X_atlas"], offline.obsm["X_atlas"], rtol=1e-5, atol=1e-6)
        # Another 10x run of PBMCs: most cells land in a known type.
        assert (served.obs["cell_type_l1_pred"] != "unknown").mean() > 0.7

        done = subprocess.run([str(root / ".venv" / "bin" / "python"), "-c", notebook], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "['cell_type_l1', 'cell_type_l2']" in done.stdout
    finally:
        _stop(service)
    assert service.returncode is not None


@pytest.mark.real_data
def test_serve_run_config_yaml(tour_dir, tiny_atlas):
    """`serve run serve/config.yaml` from the repository root serves demo_out/artifact."""
    root, env = tour_dir
    art, query, _ = tiny_atlas
    (root / "demo_out").mkdir(exist_ok=True)
    if not (root / "demo_out" / "artifact").exists():
        (root / "demo_out" / "artifact").symlink_to(art.path)
    token = "readme-test-token"
    (root / "demo_out" / "serve_token").write_text(token + "\n")
    assert _free(8000), "port 8000 (serve/config.yaml's) is taken on this machine"
    command = next(c for _, lang, body in readme_blocks() if lang == "bash"
                   for c in shell_commands(body) if c.startswith("serve run"))
    log = root / "serve_run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "-c", f"source .venv/bin/activate && exec {command}"], cwd=root, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy("http://127.0.0.1:8000", proc, log)
        headers = {"Authorization": f"Bearer {token}"}
        info = httpx.get("http://127.0.0.1:8000/v1/atlas", headers=headers, timeout=30).json()
        assert info["levels"] == ["cell_type_l1", "cell_type_l2"]
        assert httpx.get("http://127.0.0.1:8000/v1/atlas", timeout=30).status_code == 401
    finally:
        _stop(proc)  # `serve run` started its own local Ray; Ctrl-C shuts both down
