"""Starts tests/tpu_worker.py once per test session, in the background, and hands its facts to test_tpu.py.

conftest.py starts it when the session starts (in the controller, before pytest-xdist's workers exist, so
they inherit where the facts will be); the worker process runs the TPU compiles while the other tests run.
libtpu comes from .venv/libtpu (the README's test command installs it there; SEMFLOW_LIBTPU_PATH elsewhere)
and is put on the worker's path only.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTS = "SEMFLOW_TPU_FACTS"  # the environment variable that tells every test process where they are
INSTALL = "pip install --no-deps --target .venv/libtpu -r requirements-tpu.txt"
_process = None


def libtpu_path() -> str:
    return os.environ.get("SEMFLOW_LIBTPU_PATH", os.path.join(ROOT, ".venv", "libtpu"))


def start() -> None:
    """Launches the worker unless one is running for this session or libtpu is not installed."""
    global _process
    if FACTS in os.environ or not os.path.isdir(os.path.join(libtpu_path(), "libtpu")):
        return
    out = os.path.join(tempfile.mkdtemp(prefix="semflow_tpu_"), "facts.json")
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile-only TPU executables are not for the CPU cache
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (libtpu_path(), ROOT, env.get("PYTHONPATH"))))
    # The AMX control needs XLA's YNNPACK dots on for its CPU compile (the later flag wins).
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=eltwise,reduce,individual_dot"
    )
    worker = os.path.join(ROOT, "tests", "tpu_worker.py")
    script = f'"{sys.executable}" "{worker}" "{out}" > "{out}.log" 2>&1; echo $? > "{out}.rc"'
    _process = subprocess.Popen(["bash", "-c", script], env=env, cwd=ROOT, start_new_session=True)
    os.environ[FACTS] = out


def stop() -> None:
    """Ends a worker still running when the session ends (a run of a subset of the tests)."""
    if _process is not None and _process.poll() is None:
        os.killpg(_process.pid, signal.SIGKILL)  # bash and the worker it started


def facts(timeout: float = 1200.0) -> dict:
    """The worker's facts (waits for it); fails with the install line where libtpu is missing."""
    import json

    if not os.path.isdir(os.path.join(libtpu_path(), "libtpu")):
        pytest.fail(f"the TPU compile tests need libtpu in {libtpu_path()}: {INSTALL}")
    start()
    out = os.environ[FACTS]
    deadline = time.monotonic() + timeout
    while not os.path.exists(out + ".rc"):
        if time.monotonic() > deadline:
            pytest.fail(f"tests/tpu_worker.py did not finish in {timeout:.0f} s")
        time.sleep(1.0)
    rc = open(out + ".rc").read().strip()
    if rc != "0":
        with open(out + ".log") as f:
            pytest.fail(f"tests/tpu_worker.py exited {rc}:\n{f.read()[-4000:]}")
    with open(out) as f:
        return json.load(f)
