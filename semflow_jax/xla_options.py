"""XLA options the package sets by default, before JAX starts its backend: the CPU settings measured fastest.

`import semflow_jax` (any of its modules) appends CPU_DEFAULTS to $XLA_FLAGS (YNNPACK's fusions of elementwise
ops and reductions, and where the CPU has AMX its bfloat16 dots with float32 results, as which the UNet's
wider bfloat16 convolutions then run: models/layers.py), except for an option the user already set there, and
only where the CPU does the work (no TPU or GPU backend installed, or JAX_PLATFORMS=cpu).
SEMFLOW_XLA_DEFAULTS=0 turns this off. An option XLA does not know aborts the process, so they are applied
only on the jaxlib versions they were measured on (TESTED_JAXLIB); they change how XLA:CPU compiles, never the
result beyond float rounding, and do nothing on GPU or TPU.

It also splits the CPU into `cpu_devices()` XLA devices (default 2 where the process may use 2 or more
cores; SEMFLOW_CPU_DEVICES=n chooses, 1 keeps one device). Every jitted step and sampler of the package
already splits its batch over all devices of its mesh, so on a CPU two programs then run side by side, each
on half the batch: the ops XLA:CPU runs on one thread (GroupNorm statistics, attention's small matmuls,
the thin first and last convolutions; about 15% of the mid model's forward pass) overlap with the other
half's work instead of leaving a core idle. Measured on a 2-core CPU (benchmarks/suite.py): the mid model's
25-step sampler went from 0.93x to 1.00-1.03x the PyTorch twin's speed, the shapes model's from 1.16x to
1.23-1.31x (four full runs); 4 devices on 2 cores was slower than 2. Batches must then divide
evenly over the devices (train.batch_size, eval.batch_size; the numpy API pads). Not set where the user
chose a device count (--xla_force_host_platform_device_count in XLA_FLAGS, or JAX_NUM_CPU_DEVICES).
Measurements: `python benchmarks/suite.py` (its "XLA options" table) and benchmarks/README.md.
"""

from __future__ import annotations

import os
import warnings

# YNNPACK fusions of elementwise ops and reductions (GroupNorm, SiLU, the residual adds): the forward pass of
# the shapes UNet about 1.6x faster on the 2-core CPU, its train step about 1.2x (benchmarks/README.md).
YNN_FUSION_OPTION = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FUSIONS = "eltwise,reduce"
# Where the CPU has AMX, also bfloat16 x bfloat16 -> float32 dots: YNNPACK runs them on AMX at 620-670 GFLOP/s
# per core against 72-77 for XLA's own kernel (2-core Xeon; float32 dots 140-160 either way; the mid model's
# float32 train step, forward pass and sampler the same with it and without, alternating processes), and the
# UNets' bfloat16 convolutions then run partly as such dots (models/layers.py, `amx_conv`).
YNN_FUSIONS_AMX = "eltwise,reduce,individual_dot"
TESTED_JAXLIB = ("0.10.",)
DEVICE_COUNT_OPTION = "--xla_force_host_platform_device_count"
# Devices the CPU is split into by default: measured on 2 cores (2 beat 1 and 4); on larger CPUs we have no
# measurement yet, so the default stays at 2 there (SEMFLOW_CPU_DEVICES=n to try more).
DEFAULT_CPU_DEVICES = 2
# Bad SEMFLOW_* settings apply() met (it warns and leaves them out); the command-line tools refuse to run.
PROBLEMS: list[str] = []


def cpu_has_amx(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU lists the AMX bfloat16 extension (Linux's /proc/cpuinfo flag amx_bf16)."""
    try:
        with open(cpuinfo_path) as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def cpu_defaults(amx: bool | None = None) -> tuple[str, ...]:
    """The XLA options set by default on a CPU: YNNPACK's fusions, with its bfloat16 dots where there is AMX."""
    amx = cpu_has_amx() if amx is None else amx
    return (f"{YNN_FUSION_OPTION}={YNN_FUSIONS_AMX if amx else YNN_FUSIONS}",)


def ynn_fusions(environ=None) -> set[str]:
    """The YNNPACK fusion types $XLA_FLAGS asks XLA:CPU for (its last ynn_fusion_type option wins)."""
    environ = os.environ if environ is None else environ
    found = ""
    for opt in environ.get("XLA_FLAGS", "").split():
        if opt.startswith(YNN_FUSION_OPTION + "="):
            found = opt.split("=", 1)[1]
    return {t for t in found.split(",") if t}


CPU_DEFAULTS = cpu_defaults()


def switched_off(environ, name: str) -> bool:
    """Whether environ[name] says off (0, false, off, no); unset means on."""
    return environ.get(name, "1").strip().lower() in ("0", "false", "off", "no")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_devices(environ=None) -> int:
    """How many XLA CPU devices to split the CPU into: $SEMFLOW_CPU_DEVICES, else min(2, usable cores)."""
    environ = os.environ if environ is None else environ
    value = environ.get("SEMFLOW_CPU_DEVICES", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"SEMFLOW_CPU_DEVICES={value!r}: expected a whole number >= 1")
        return int(value)
    return max(1, min(DEFAULT_CPU_DEVICES, usable_cores()))


def accelerator_installed() -> bool:
    """Whether a TPU (libtpu) or a GPU plugin (the jax_plugins namespace) is importable; cheap: no import."""
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("libtpu", "jax_plugins"))


def cpu_does_the_work(environ) -> bool:
    """Whether JAX will compute on the CPU: JAX_PLATFORMS=cpu, or no TPU or GPU backend installed."""
    platforms = [x.strip() for x in environ.get("JAX_PLATFORMS", "").lower().split(",") if x.strip()]
    return platforms == ["cpu"] or not accelerator_installed()


def on_tested_jaxlib() -> bool:
    """Whether the installed jaxlib is one the options here were measured on (XLA aborts on unknown options)."""
    try:
        from importlib.metadata import version

        return version("jaxlib").startswith(TESTED_JAXLIB)
    except Exception:  # no jaxlib metadata: leave XLA alone
        return False


def apply(environ=None) -> list[str]:
    """Adds the defaults to environ["XLA_FLAGS"] (default os.environ); returns the options it added."""
    environ = os.environ if environ is None else environ
    if switched_off(environ, "SEMFLOW_XLA_DEFAULTS"):
        return []
    if not cpu_does_the_work(environ):
        return []  # a TPU or GPU backend will run the work: CPU options buy nothing there, so none are set
    if not on_tested_jaxlib():
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [opt for opt in CPU_DEFAULTS if opt.split("=")[0] not in current]
    try:
        devices = cpu_devices(environ)
    except ValueError as e:
        PROBLEMS.append(str(e))
        warnings.warn(f"{e}; using one CPU device", stacklevel=2)
        devices = 1
    if devices > 1 and DEVICE_COUNT_OPTION not in current and "JAX_NUM_CPU_DEVICES" not in environ:
        added.append(f"{DEVICE_COUNT_OPTION}={devices}")
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
