"""`tune()`: the one explicit call that tunes this process for computing on a CPU, made before jax starts.

Importing semflow_jax changes nothing in the process. The command-line tools make this call first
(errors.run_cli), as do the benchmarks and the quick-start notebook; any program may. It adds the XLA:CPU
options and the device split of cpu/xla_options.py to $XLA_FLAGS and sets the malloc options of
cpu/malloc_options.py. XLA reads $XLA_FLAGS once, when jax starts its backend: called later, the XLA part
cannot apply, and tune() says so in one line on stderr instead of changing $XLA_FLAGS for nothing. Where a
TPU or GPU backend is installed (and JAX_PLATFORMS does not ask for the CPU) it does nothing. Switches:
SEMFLOW_CPU_TUNING=0 (all of it), SEMFLOW_XLA_DEFAULTS=0, SEMFLOW_MALLOC_DEFAULTS=0, SEMFLOW_CPU_DEVICES=n.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from semflow_jax.cpu import malloc_options, xla_options


@dataclasses.dataclass(frozen=True)
class Tuning:
    """What `tune()` did: XLA options added, malloc settings made, and why anything was left out."""

    xla_options: tuple[str, ...] = ()  # added to $XLA_FLAGS
    malloc: tuple[tuple[str, int], ...] = ()  # mallopt settings made
    not_applied: tuple[str, ...] = ()  # XLA options wanted but too late: jax had started its backend
    skipped: str | None = None  # why nothing was tuned at all

    def summary(self) -> str:
        """One line for a tool's start-up: what is tuned, or why not."""
        if self.skipped:
            return f"no CPU tuning ({self.skipped})"
        parts = []
        devices = [
            o.split("=", 1)[1] for o in self.xla_options if o.startswith(xla_options.DEVICE_COUNT_OPTION)
        ]
        flags = [o for o in self.xla_options if not o.startswith(xla_options.DEVICE_COUNT_OPTION)]
        if devices:
            parts.append(f"CPU split into {devices[0]} devices")
        if flags:
            parts.append("XLA " + " ".join(o.lstrip("-") for o in flags))
        if self.malloc:
            parts.append("malloc " + ", ".join(f"{k}={v}" for k, v in self.malloc))
        if self.not_applied:
            parts.append(f"not applied, jax had started: {' '.join(self.not_applied)}")
        return "CPU tuned: " + ("; ".join(parts) if parts else "nothing to add (set already)")


def jax_started() -> bool:
    """Whether jax has already created its backends (after which $XLA_FLAGS is no longer read)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a jax without that query: assume the worst, never stay silent
        return True


def tune(environ=None) -> Tuning:
    """Tunes this process for the CPU (see the module docstring) and returns what it did.

    environ: the environment to read and extend (default os.environ). Raises ValueError for a bad
    SEMFLOW_CPU_DEVICES. Where jax has already started, prints one line on stderr naming what it could not
    apply.
    """
    environ = os.environ if environ is None else environ
    if xla_options.switched_off(environ, "SEMFLOW_CPU_TUNING"):
        return Tuning(skipped="SEMFLOW_CPU_TUNING=0")
    if not xla_options.cpu_does_the_work(environ):
        return Tuning(skipped="a TPU or GPU backend is installed; JAX_PLATFORMS=cpu asks for the CPU")
    wanted = xla_options.wanted(environ)
    added, late = (), ()
    if wanted and environ is os.environ and jax_started():
        late = tuple(wanted)
        print(
            f"semflow_jax.cpu.tune: jax had already started, so these XLA options were not applied: {' '.join(late)} "
            "(call semflow_jax.cpu.tuning.tune() before jax's first computation)",
            file=sys.stderr,
        )
    elif wanted:
        added = tuple(xla_options.apply(environ))
    malloc = tuple(malloc_options.apply(environ).items())
    return Tuning(xla_options=added, malloc=malloc, not_applied=late)
