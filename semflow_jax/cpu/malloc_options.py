"""glibc malloc settings `tuning.tune()` makes where the CPU computes: keep freed memory mapped for reuse.

XLA:CPU allocates each call's temporary buffer anew and frees it when the call ends; with glibc's defaults a
buffer that large is mapped fresh from the OS on every call, so every call pays page faults and zeroed pages
again. mallopt(M_MMAP_MAX, 0) serves large blocks from malloc's heaps, M_TRIM_THRESHOLD (1 GiB) keeps freed
memory at the top of a heap and M_TOP_PAD (64 MiB) keeps an emptied thread heap, so the next call reuses the
same pages. A block larger than a thread heap (64 MiB) is still mapped on its own, so `compiler_options()`
also asks XLA to split a program's temporaries into heaps of at most 63 MiB (the train step is compiled
with it). The cost: freed memory up to the threshold stays with the process. Applied only on Linux with
glibc, where the CPU computes, and not where the user chose (SEMFLOW_MALLOC_DEFAULTS=0, glibc's MALLOC_*_
variables or glibc.malloc tunables, another malloc in LD_PRELOAD); then `compiler_options()` is empty too.
What it buys: docs/PERFORMANCE.md.
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
    from semflow_jax.cpu.xla_options import switched_off

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
    """Sets SETTINGS with mallopt where they apply (see the module docstring); returns what it set. A
    process-wide change: `tuning.tune()` is the call that makes it."""
    from semflow_jax.cpu.xla_options import cpu_does_the_work

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
