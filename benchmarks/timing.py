"""Timing helpers every benchmark script shares: timed windows, alternating them between JAX and the twin,
and their summaries. No jax import: the suite's orchestrator never starts a backend."""

from __future__ import annotations

import statistics
import sys
import time


def summarize(values) -> dict:
    """{"median", "min", "max"} of a list of numbers."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio_summary(jax_rates, torch_rates) -> dict:
    """JAX / twin: the ratio of the medians, and min/max of the per-window ratios (> 1: JAX faster)."""
    per_window = [a / b for a, b in zip(jax_rates, torch_rates, strict=True)]
    return {
        "median": statistics.median(jax_rates) / statistics.median(torch_rates),
        "min": min(per_window),
        "max": max(per_window),
    }


def timed(fn) -> float:
    """Seconds one call of fn takes (fn blocks until its results exist)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_seconds() -> tuple[float, float]:
    """This process's user and system (kernel) CPU seconds so far."""
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime, u.ru_stime


def window(fn) -> dict:
    """One timed call of fn in this process: wall seconds, and the user and system (kernel) CPU seconds.

    System time is mostly page faults of memory mapped fresh, which the wall clock alone hides.
    """
    user, system = cpu_seconds()
    sec = timed(fn)
    user_after, system_after = cpu_seconds()
    return {"sec": sec, "user": user_after - user, "system": system_after - system}


def alternate(pairs: dict, repeats: int, warmup: int = 1) -> dict:
    """Runs each {key: (jax_fn, twin_fn or None, items_per_call)} in alternating windows, warmup first.

    jax_fn runs here and is timed here; twin_fn runs one window of the twin and returns its `window` dict,
    timed where it ran (the twin's own process). Returns {key: (jax_windows, twin_windows)}.
    """
    out = {k: ([], []) for k in pairs}
    for r in range(warmup + repeats):
        for key, (jax_fn, twin_fn, _) in pairs.items():
            j = window(jax_fn)
            t = twin_fn() if twin_fn is not None else None
            if r >= warmup:
                out[key][0].append(j)
                if t is not None:
                    out[key][1].append(t)
    return out


def rates(windows: list[dict], items: int) -> list[float]:
    """Items/s of each window."""
    return [items / w["sec"] for w in windows]


def cpu_per_window(windows: list[dict]) -> dict:
    """Median user and system CPU seconds of the windows."""
    return {k: statistics.median(w[k] for w in windows) for k in ("user", "system")}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def package_version(name: str) -> str | None:
    """An installed distribution's version, or None where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
