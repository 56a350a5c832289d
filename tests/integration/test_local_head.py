"""The local Ray head on a fresh machine: no ``~/.ray``, no token anywhere.

Ray 2.60's ``ray start --head`` refuses to start without an authentication token; before the
head brought its own, `make demo` as the first command on a new machine failed at step 2.
Each case runs in a fresh process whose ``HOME`` is an empty folder, so nothing left by an
earlier ``ray.init()`` (which writes ``~/.ray/auth_token``) can hide the defect.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from atlas.errors import AtlasError
from atlas.local_cluster import LocalHeadError, head_token_env

pytestmark = pytest.mark.ray

_TOKEN_VARS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS")


def _fresh_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _TOKEN_VARS}
    env.update(HOME=str(home), **extra)
    return env


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=240, cwd=Path(__file__).resolve().parents[2])


def test_head_starts_with_an_empty_home_and_no_token(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    done = _run("""
        import subprocess, sys
        from atlas.local_cluster import local_head
        with local_head(num_cpus=2) as head:
            token_path = head.env["RAY_AUTH_TOKEN_PATH"]
            driver = subprocess.run(
                [sys.executable, "-c",
                 "import ray; ray.init(address=%r, log_to_driver=False); "
                 "print('answer', ray.get(ray.remote(lambda: 6 * 7).remote()))" % head.gcs_address],
                env=head.env, capture_output=True, text=True, timeout=180)
            print(driver.stdout, driver.stderr[-2000:])
            print("token", token_path)
        import os
        print("token left behind", os.path.exists(token_path))
    """, _fresh_env(home))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "answer 42" in done.stdout, done.stdout[-3000:]
    assert "token left behind False" in done.stdout  # the head's token goes with its temp dir
    assert not (home / ".ray").exists(), "the local head must not write the user's ~/.ray"


def test_a_users_own_token_is_kept(tmp_path):
    assert head_token_env(tmp_path, {"RAY_AUTH_TOKEN": "mine"}) == {"RAY_AUTH_TOKEN": "mine"}
    assert head_token_env(tmp_path, {"RAY_AUTH_TOKEN_PATH": "/x/t"}) == {"RAY_AUTH_TOKEN_PATH": "/x/t"}
    assert not list(tmp_path.iterdir())
    generated = head_token_env(tmp_path, {"RAY_AUTH_TOKEN": "  "})  # blank is unset
    token = Path(generated["RAY_AUTH_TOKEN_PATH"])
    assert token.parent == tmp_path and len(token.read_text()) == 64
    assert token.stat().st_mode & 0o777 == 0o600


def test_a_refused_start_says_why_and_what_to_do(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    missing = tmp_path / "no-such-token"
    done = _run("""
        from atlas.local_cluster import local_head, LocalHeadError
        try:
            with local_head(num_cpus=1, timeout=60):
                print("started")
        except LocalHeadError as e:
            print("ERROR", e)
    """, _fresh_env(home, RAY_AUTH_TOKEN_PATH=str(missing)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started" not in done.stdout
    message = done.stdout.partition("ERROR ")[2]
    assert "did not start" in message and "authentication token" in message, message
    assert "RAY_AUTH_TOKEN" in message  # what to do
    assert issubclass(LocalHeadError, AtlasError)  # the CLI prints it as one line, no traceback
