"""Test setup: 8 simulated CPU devices (set before jax is imported), so sharded code runs as on a pod slice.

The tests compile many small programs and run each for a few steps, so XLA's CPU backend is told not to
spend time optimizing machine code (LLVM -O0): compilation is about 3x faster, results are the same
computation. Subprocesses inherit these flags. Caches (converted Inception weights, FID statistics,
segmenters) go to a fresh folder per session, never to the user's ~/.cache.

Many tests, and the subprocesses of the multi-process tests, compile the same small programs (the tiny
config's train step and sampler): one persistent compilation cache, shared by the pytest-xdist workers and
every subprocess (set once by the controller, inherited), compiles each of them once per run.
"""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs`
# At -O0 XLA:CPU's older elemental emitter compiles a fusion faster than its MLIR fusion emitters: the tiny
# train step 8.2-9.2 -> 6.2-6.4 s; test_pod + test_unet + test_layers in one process, alternating runs,
# 222 / 187 -> 153 / 135 s; this suite's in-process compile time 424 -> 238 s. At the optimization level users
# run it is the other way round (the shapes train step compiles in 16-18 s instead of 12), so the package
# leaves it alone. An option XLA does not know aborts the process, so only on the jaxlib versions the
# package's own XLA options are tested on.
from semflow_jax.cpu import tuning, xla_options  # noqa: E402

if xla_options.on_tested_jaxlib():
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
# The tuning the command-line tools make (its XLA options inherited by every worker and subprocess; the
# malloc settings made again in each xdist worker, which imports this file too). The 8 devices above stay.
tuning.tune()
os.environ["SEMFLOW_CACHE"] = tempfile.mkdtemp(prefix="semflow_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="semflow_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# pytest-xdist hands out whole files (--dist=loadfile) in collection order, and the suite lasts as long as its
# busiest worker: the long files go first, so that the short ones fill in around them instead of one long
# file starting last and running alone.
_LONG_FILES_FIRST = (
    "test_notebook.py",
    "test_sd.py",
    "test_multihost.py",
    "test_end_to_end.py",
    "test_latents.py",
    "test_pod.py",
    "test_inference_cli.py",
)


# Last: its facts come from tests/tpu_worker.py, which compiles in the background from the session's start;
# an xdist worker that reached it early would wait for them instead of running other files.
_LAST = "test_tpu.py"


def pytest_collection_modifyitems(items):
    """Orders the collected tests long files first, test_tpu.py last (stable within a file)."""

    def rank(item):
        name = os.path.basename(str(item.fspath))
        if name == _LAST:
            return len(_LONG_FILES_FIRST) + 1
        return _LONG_FILES_FIRST.index(name) if name in _LONG_FILES_FIRST else len(_LONG_FILES_FIRST)

    items.sort(key=rank)


def pytest_configure(config):
    """Starts the TPU compiles (tests/tpu_process.py) when the session starts, in the controller only, when
    test_tpu.py is among the tests asked for."""
    if hasattr(config, "workerinput"):
        return
    args = [str(a) for a in config.args] or ["."]
    if any("test_tpu" in a or os.path.isdir(a.split("::")[0]) for a in args):
        import tpu_process

        tpu_process.start()


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):
        import tpu_process

        tpu_process.stop()
