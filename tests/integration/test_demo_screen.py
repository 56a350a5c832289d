"""What a user sees: Ray's and Serve's own logs go to a file, the screen keeps the steps.

`make demo` used to bury its steps and summary under ~50 lines of Serve controller, replica and
raylet logs. :func:`atlas.ray_logs.ray_output_to_file` sends every kind of Ray output (Python
loggers, forwarded worker logs, native writes to descriptor 2) to the log file;
``test_ray_output_goes_to_the_log_file`` checks each kind against a real local Ray, and
``test_the_demo_screen`` checks the screen of a real `make demo` (`.ci/run` saves it and sets
``ATLAS_DEMO_SCREEN``; the demo takes minutes, so `make test` alone does not run it).
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from atlas.ray_logs import progress_line

# What Ray's output looks like on a terminal; none of it may reach the demo's screen.
RAY_LINES = [
    re.compile(r"\((?:raylet|[A-Za-z_:.\-]+) pid=\d+"),                 # forwarded worker/actor output
    re.compile(r"\(raylet\)"),
    re.compile(r"\b(?:INFO|WARNING|ERROR|DEBUG) \d{4}-\d\d-\d\d \d\d:\d\d:\d\d"),  # Serve's loggers
    re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(?:INFO|WARNING|ERROR)"),   # Ray's loggers
    re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [EWIF] \d+ \d+\]"),        # native core logs
    re.compile(r"core_worker\.cc|graceful_shutdown|Traceback"),
]


def _ray_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(p.search(line) for p in RAY_LINES)]


def test_progress_lines_are_found_inside_ray_prefixes():
    assert progress_line("\x1b[36m(RayTrainWorker pid=4443)\x1b[0m [train] epoch 1/2 done: loss 3.7") == \
        "[train] epoch 1/2 done: loss 3.7"
    assert progress_line("(TrainController pid=1, ip=10.0.0.1) [build] store x") == "[build] store x"
    assert progress_line("[build] trained in 62.0 s") == "[build] trained in 62.0 s"
    assert progress_line("(SplitCoordinator pid=5067) Starting execution of Dataset") is None
    assert progress_line("INFO 2026-12-05 23:16:29,500 serve 3531 -- Started Serve") is None


@pytest.mark.ray
def test_ray_output_goes_to_the_log_file(tmp_path):
    log = tmp_path / "ray.log"
    code = textwrap.dedent(f"""
        import logging, os, time
        import ray
        from atlas.ray_logs import ray_output_to_file, worker_progress_to

        shown = []
        with ray_output_to_file({str(log)!r}) as console, worker_progress_to(shown.append):
            ray.init(address="local", num_cpus=1, include_dashboard=False)

            @ray.remote
            def work():
                print("RAY-WORKER-STDOUT", flush=True)
                print("[train] epoch 1/1 done: loss 1.0", flush=True)
                import sys
                print("RAY-WORKER-STDERR", file=sys.stderr, flush=True)
                return 1

            ray.get(work.remote())
            logging.getLogger("ray").warning("RAY-LOGGER-LINE")
            print("PLAIN-PRINT-LINE", flush=True)
            os.write(2, b"NATIVE-STDERR-LINE\\n")
            time.sleep(3)  # forwarded worker logs arrive asynchronously
            console.print("OUR-SCREEN-LINE")
            for line in shown:
                console.print("SHOWN " + line, markup=False)
            ray.shutdown()
        print("AFTER-THE-BLOCK", flush=True)
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    screen = done.stdout + done.stderr
    assert done.returncode == 0, screen[-3000:]
    assert "OUR-SCREEN-LINE" in screen and "AFTER-THE-BLOCK" in screen
    assert "SHOWN [train] epoch 1/1 done: loss 1.0" in screen  # the project's progress reaches the screen
    for line in ("RAY-WORKER-STDOUT", "RAY-WORKER-STDERR", "RAY-LOGGER-LINE", "PLAIN-PRINT-LINE", "NATIVE-STDERR-LINE"):
        assert line not in screen, f"{line} reached the screen:\n{screen[-3000:]}"
    logged = log.read_text()
    for line in ("RAY-WORKER-STDOUT", "RAY-WORKER-STDERR", "RAY-LOGGER-LINE", "PLAIN-PRINT-LINE", "NATIVE-STDERR-LINE"):
        assert line in logged, f"{line} is not in the log file"
    assert not _ray_lines(screen), _ray_lines(screen)


def test_the_demo_screen():
    path = os.environ.get("ATLAS_DEMO_SCREEN")
    if not path:
        pytest.skip("needs the saved screen of a `make demo` run (ATLAS_DEMO_SCREEN); .ci/run provides it")
    screen = Path(path).read_text(errors="replace")
    for step in range(1, 6):
        assert f"== {step}/5 " in screen, f"step {step} missing from the demo's screen"
    assert "held-out cells (RNA only) mapped onto the atlas" in screen and "cell_type_l1" in screen
    assert "demo wall time" in screen
    leaked = _ray_lines(screen)
    assert not leaked, "Ray/Serve log lines on the demo's screen:\n" + "\n".join(leaked[:20])
    logs = Path(os.environ.get("ATLAS_DEMO_OUT", "demo_out")) / "logs"
    assert (logs / "ray.log").stat().st_size > 0 and _ray_lines((logs / "ray.log").read_text(errors="replace"))
