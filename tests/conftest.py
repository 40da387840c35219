"""Test setup: 8 simulated CPU devices (set before jax is imported), so sharded code runs as on a pod slice.

The tests compile many small programs and run each for a few steps, so XLA's CPU backend is told not to
spend time optimizing machine code (LLVM -O0): compilation is about 3x faster, results are the same
computation. Subprocesses inherit these flags. Caches (converted Inception weights, FID statistics,
segmenters) go to a fresh folder per session, never to the user's ~/.cache.
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
os.environ["SEMFLOW_CACHE"] = tempfile.mkdtemp(prefix="semflow_cache_")
