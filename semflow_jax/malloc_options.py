"""glibc malloc settings the package sets by default where the CPU does the work: keep freed memory mapped.

XLA:CPU allocates each call's temporary buffer anew (tens to hundreds of MiB for a UNet pass, 836 MiB per
device for the mid model's train step) and frees it when the call ends. With glibc's defaults a buffer that
large is mapped fresh from the OS on every call and unmapped after it, so every call pays page faults and the
kernel zeroing the pages again. `import semflow_jax` therefore calls mallopt(M_MMAP_MAX, 0) (serve large
blocks from malloc's heaps, not from per-block mappings), mallopt(M_TRIM_THRESHOLD, 1 GiB) (keep up to that
much freed memory at the top of a heap instead of returning it) and mallopt(M_TOP_PAD, 64 MiB) (a thread heap
that has become empty is kept, not deleted), so the next call reuses the same pages. Measured on a 2-core CPU
(benchmarks/suite.py, worker sampler-<size>, alternating processes): one mid forward pass 503-519 ms against
530-547, shapes 145 against 149-151, memory paged in per forward pass 0 MiB against 112-128.

Those settings cannot keep a block larger than the 64 MiB a thread's heap holds: glibc maps such a block on
its own and unmaps it when it is freed, whatever mallopt says, and XLA's worker threads are not the main one.
XLA:CPU hands a program all its temporaries as one block, so `compiler_options()` also asks XLA to split them
into heaps of at most 63 MiB (`xla_multiheap_size_constraint_per_heap`), which the train step
(semflow_jax/train.py) is compiled with: the mid train step then pages in 0 MiB per step against 1.7 GB, its
kernel time per step drops from 0.7 s to 0.01 s and the step is 9-15% faster (docs/PERFORMANCE.md). A single
buffer larger than 63 MiB still gets its own block, is mapped as before, and XLA says so in one warning line
per such buffer when it compiles. Not M_ARENA_MAX=1: one heap for all threads makes the train step and the
sampler slower (docs/PERFORMANCE.md).

What it costs: freed memory up to the threshold stays with the process instead of going back to the OS (a
heap's peak stays resident). Applied only on Linux with glibc, where the CPU runs the computation (the same
test as the XLA defaults), and not where the user chose: SEMFLOW_MALLOC_DEFAULTS=0, glibc's MALLOC_MMAP_MAX_,
MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_ or MALLOC_TOP_PAD_ variables, glibc.malloc.* tunables in
GLIBC_TUNABLES, or another malloc in LD_PRELOAD; then `compiler_options()` is empty too.
"""

from __future__ import annotations

import os
import platform
import sys

# mallopt parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
# Blocks kept after a free: above a thread heap's 64 MiB, so a freed XLA temporary buffer is always kept there.
TRIM_THRESHOLD = 1 << 30
# A thread heap (at most 64 MiB) is deleted once empty unless its arena's free room is under this pad: with a
# whole heap's worth, no heap is ever deleted, so the heaps of a split temporary block (below) are kept.
TOP_PAD = 64 << 20
SETTINGS = (
    ("M_MMAP_MAX", M_MMAP_MAX, 0),
    ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ("M_TOP_PAD", M_TOP_PAD, TOP_PAD),
)
# XLA's temporaries in blocks that fit a thread heap: 64 MiB less room for the heap's header and alignment.
HEAP_PIECE = 63 << 20
# What apply() set in this process, for the benchmarks' record: names and values.
APPLIED: dict[str, int] = {}


def user_chose(environ) -> str | None:
    """Why the user's own malloc setup wins (a short reason), or None when the defaults may be set."""
    from semflow_jax.xla_options import switched_off

    if switched_off(environ, "SEMFLOW_MALLOC_DEFAULTS"):
        return "SEMFLOW_MALLOC_DEFAULTS=0"
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_"):
        if name in environ:
            return name
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if "malloc" in environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc: glibc's knobs do nothing
        return "LD_PRELOAD"
    return None


def glibc() -> bool:
    """Whether this process runs on Linux with glibc (whose mallopt these parameter numbers are for)."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def apply(environ=None) -> dict[str, int]:
    """Sets SETTINGS with mallopt where they apply (see the module docstring); returns what it set."""
    from semflow_jax.xla_options import cpu_does_the_work

    environ = os.environ if environ is None else environ
    if user_chose(environ) or not cpu_does_the_work(environ) or not glibc():
        return {}
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for name, param, value in SETTINGS:
        if mallopt(param, value) == 1:  # 1 is success; a refused value leaves glibc's default in place
            APPLIED[name] = value
    return dict(APPLIED)


def compiler_options(platform: str = "cpu") -> dict:
    """XLA compiler options for a CPU program whose temporaries exceed a thread heap (the train step), given
    the settings above: split them into blocks glibc keeps. Empty where the settings were not applied, and
    for a program compiled for any other platform (a TPU's or GPU's memory is not malloc's)."""
    if platform != "cpu" or APPLIED.get("M_TOP_PAD") != TOP_PAD or APPLIED.get("M_MMAP_MAX") != 0:
        return {}
    return {"xla_multiheap_size_constraint_per_heap": HEAP_PIECE}
