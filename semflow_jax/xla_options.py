"""XLA options the package sets by default, before JAX starts its backend: the CPU settings measured fastest.

`import semflow_jax` (any of its modules) appends CPU_DEFAULTS to $XLA_FLAGS, except for an option the
user already set there, and only where the CPU does the work (no TPU or GPU backend installed, or
JAX_PLATFORMS=cpu). SEMFLOW_XLA_DEFAULTS=0 turns this off. An option XLA does not know aborts the
process, so they are applied only on the jaxlib versions they were measured on (TESTED_JAXLIB); they
change how XLA:CPU compiles, never the result beyond float rounding, and do nothing on GPU or TPU.
Measurements: `python benchmarks/suite.py` (its "XLA options" table) and benchmarks/README.md.
"""

from __future__ import annotations

import os

# YNNPACK fusions of elementwise ops and reductions (GroupNorm, SiLU, the residual adds): the forward pass of
# the shapes UNet about 1.6x faster on the 2-core CPU, its train step about 1.2x (benchmarks/README.md).
CPU_DEFAULTS = ("--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce",)
TESTED_JAXLIB = ("0.10.",)


def switched_off(environ, name: str) -> bool:
    """Whether environ[name] says off (0, false, off, no); unset means on."""
    return environ.get(name, "1").strip().lower() in ("0", "false", "off", "no")


def accelerator_installed() -> bool:
    """Whether a TPU (libtpu) or a GPU plugin (the jax_plugins namespace) is importable; cheap: no import."""
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("libtpu", "jax_plugins"))


def apply(environ=None) -> list[str]:
    """Adds the defaults to environ["XLA_FLAGS"] (default os.environ); returns the options it added."""
    environ = os.environ if environ is None else environ
    if switched_off(environ, "SEMFLOW_XLA_DEFAULTS"):
        return []
    platforms = [x.strip() for x in environ.get("JAX_PLATFORMS", "").lower().split(",") if x.strip()]
    if platforms != ["cpu"] and accelerator_installed():
        return []  # a TPU or GPU backend will run the work: CPU options buy nothing there, so none are set
    try:
        from importlib.metadata import version

        jaxlib = version("jaxlib")
    except Exception:  # no jaxlib metadata: leave XLA alone
        return []
    if not jaxlib.startswith(TESTED_JAXLIB):
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [opt for opt in CPU_DEFAULTS if opt.split("=")[0] not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
