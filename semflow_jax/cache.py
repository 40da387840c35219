"""The project's cache folder, and JAX's persistent compilation cache inside it.

Everything that is expensive to make once and cheap to keep lives under one root, `$SEMFLOW_CACHE` or
`~/.cache/semflow_jax`: converted Inception weights, FID statistics, label-alignment segmenters, and the
compiled XLA executables of the samplers and train steps (`xla/`), so that a second `segment`,
`synthesize`, `eval` or resumed `train` skips compilation.
"""

from __future__ import annotations

import os

# Compilations faster than this are not written: the tiny jitted glue around the integrator would cost more
# to look up and store than to rebuild. The integrator and the train step take seconds.
MIN_COMPILE_SECONDS = 0.5


def cache_root() -> str:
    """$SEMFLOW_CACHE, or ~/.cache/semflow_jax."""
    return os.environ.get("SEMFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "semflow_jax")


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache; returns its folder, or None where it is switched off.

    The folder is, in order: `directory`, $JAX_COMPILATION_CACHE_DIR (JAX's own setting), or
    cache_root()/xla. SEMFLOW_COMPILATION_CACHE=0 switches it off. Entries are keyed by the program, the
    backend, the jax version and the XLA flags, so a stale or foreign entry is never used.
    """
    import jax

    from semflow_jax.cpu.xla_options import switched_off

    if switched_off(os.environ, "SEMFLOW_COMPILATION_CACHE"):
        return None
    from jax.experimental.compilation_cache import compilation_cache

    directory = directory or jax.config.jax_compilation_cache_dir or os.path.join(cache_root(), "xla")
    os.makedirs(directory, exist_ok=True)
    if directory != jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", directory)
        # JAX decides once, at its first compilation, whether a cache is in use: make it decide again.
        compilation_cache.reset_cache()
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own setting wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return directory
