"""A local Ray head started for one command (the demo, tests), and stopped by it alone.

``ray stop`` would stop every Ray on the machine, a user's own cluster included; this head runs
in a process group and a temp dir of its own, so stopping it touches nothing else, and its
address file never makes a later ``ray.init()`` try to join a dead cluster.

Ray 2.60's ``ray start --head`` turns token authentication on and refuses to start without a
token, which only ``ray get-auth-token --generate`` or a first ``ray.init()`` would have written
to ``~/.ray/auth_token``. On a fresh machine there is none, so the head brings its own: a random
token in its temp dir, handed to the head, its jobs, drivers and the Serve app through
``RAY_AUTH_TOKEN_PATH``. The user's ``~/.ray`` is never read or written by it; a user who already
set ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` keeps that token.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from atlas.errors import AtlasError

TOKEN_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


class LocalHeadError(AtlasError):
    """The local Ray head did not start; the message says why (from its log) and what to do."""


@dataclass(frozen=True)
class LocalHead:
    """A running local Ray head."""

    dashboard_url: str
    """Address for ``ray job submit --address`` / ``JobSubmissionClient``."""
    gcs_address: str
    """Address for ``ray.init(address=...)``."""
    env: dict
    """Environment for Ray CLI calls against this head (token auth on, this venv first on PATH)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli_env() -> dict[str, str]:
    env = dict(os.environ)
    # Job drivers and workers must run this environment's python (and so find `atlas`).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"  # `ray start --head` turns token authentication on in Ray 2.60
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.pop("RAY_ADDRESS", None)
    return env


def head_token_env(temp_dir: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The token variables for a head whose temp dir is ``temp_dir``.

    The user's own ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` win; otherwise a new random token
    is written (mode 0600) into the temp dir, which is removed with the head.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    if any(env.get(name, "").strip() for name in TOKEN_VARIABLES):
        return {name: env[name] for name in TOKEN_VARIABLES if env.get(name, "").strip()}
    path = Path(temp_dir) / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return {"RAY_AUTH_TOKEN_PATH": str(path)}


def _start_failure(returncode: int, log: Path, keep_log: bool) -> LocalHeadError:
    """An error naming the cause ``ray start`` logged, and what to do about it."""
    tail = ""
    if log.exists():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        tail = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
    if "AuthenticationError" in tail or "authentication token" in tail:
        tail = tail.split(". Ensure")[0]  # Ray's own advice names ~/.ray, which this head does not use
        hint = ("Ray refused to start without an authentication token: set RAY_AUTH_TOKEN (or "
                "RAY_AUTH_TOKEN_PATH to a file holding one), or unset both so that a token is generated for this head")
    elif "address already in use" in tail.lower() or "port" in tail.lower():
        hint = "a port it needs is taken; stop the other program or run again (ports are picked at random)"
    else:
        hint = "see the head's log for the cause"
    where = f" (log: {log})" if keep_log else ""
    detail = f": {tail.strip()[:400]}" if tail else ""
    return LocalHeadError(f"the local Ray head did not start (`ray start --head` exited with code {returncode}){detail}. "
                          f"{hint}{where}")


def ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


@contextmanager
def local_head(num_cpus: int, timeout: float = 120.0, log: Path | None = None) -> Iterator[LocalHead]:
    """Start ``ray start --head --block`` in its own process group; stop it on exit."""
    temp_dir = tempfile.mkdtemp(prefix="atlas-ray-", dir="/tmp")  # short: Unix socket paths are limited
    port, dashboard = free_port(), free_port()
    env = ray_cli_env()
    env.update(head_token_env(Path(temp_dir), env))
    keep_log = log is not None
    if log is None:  # the cause of a failed start must still be readable
        log = Path(temp_dir) / "ray-start.log"
    out = open(log, "w")
    process = subprocess.Popen(
        [ray_cli(), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
         # Fixed default ports (agent 52365, client 10001) collide with any other local Ray.
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         "--disable-usage-stats"],
        env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                out.flush()
                raise _start_failure(process.returncode, log, keep_log)
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:  # it answers (401 without the token): it is up
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the local Ray head did not answer at {url} within {timeout:.0f} s") from None
                time.sleep(1)
        yield LocalHead(dashboard_url=url, gcs_address=f"127.0.0.1:{port}", env=env)
    finally:
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        try:  # children the SIGTERM left behind (gcs, raylet) share the group
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit_job(head: LocalHead, working_dir: Path, entrypoint: list[str], retry_for: float = 60.0,
               on_line: Callable[[str], None] | None = None) -> str:
    """``ray job submit`` → follow its logs → raise unless it SUCCEEDED; returns the job id.

    The job's log lines go to this process's stdout, or to ``on_line`` one by one when given.
    A just-started head answers HTTP before its job agent is up ("No available agent to submit
    job"): submission is retried for ``retry_for`` seconds.
    """
    import re

    ray_bin, address = ray_cli(), ["--address", head.dashboard_url]
    deadline = time.monotonic() + retry_for
    while True:
        done = subprocess.run(
            [ray_bin, "job", "submit", *address, "--no-wait", "--working-dir", str(working_dir),
             "--entrypoint-num-cpus", "0", "--", *entrypoint],
            env=head.env, capture_output=True, text=True,
        )
        output = done.stdout + done.stderr
        match = re.search(r"Job '([^']+)' submitted successfully", output)
        if done.returncode == 0 and match:
            job_id = match.group(1)
            break
        if "No available agent" not in output or time.monotonic() > deadline:
            raise RuntimeError(f"ray job submit failed:\n{output[-2000:]}")
        time.sleep(2)
    print(f"submitted job {job_id}: {' '.join(entrypoint)}", flush=True)
    follow = [ray_bin, "job", "logs", *address, "--follow", job_id]
    if on_line is None:
        subprocess.run(follow, env=head.env, check=False)
    else:
        with subprocess.Popen(follow, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace") as logs:
            if logs.stdout is None:  # impossible with stdout=PIPE
                raise RuntimeError("ray job logs: no stdout pipe")
            for line in logs.stdout:
                on_line(line.rstrip("\n"))
    done = subprocess.run([ray_bin, "job", "status", *address, job_id], env=head.env, capture_output=True, text=True)
    status = done.stdout + done.stderr
    if f"Job '{job_id}' succeeded" not in status:
        raise RuntimeError(f"job {job_id} did not succeed: {status.strip()[-500:]}")
    return job_id
