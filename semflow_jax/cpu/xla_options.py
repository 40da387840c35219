"""The XLA:CPU options `tuning.tune()` adds to $XLA_FLAGS before jax starts: YNNPACK's fusions, the device split.

YNNPACK's fusions of elementwise ops and reductions (GroupNorm, SiLU, the residual adds), and where the CPU
has AMX also its bfloat16 x bfloat16 -> float32 dots, on which the UNets' bfloat16 convolutions then run
(cpu/kernels.py). The CPU is split into `cpu_devices()` XLA devices (2 where the process may use 2 or more
cores; SEMFLOW_CPU_DEVICES=n chooses): every jitted step and sampler splits its batch over its mesh, so the
ops XLA:CPU runs on one thread overlap with the other half's work. Batches must then divide evenly over the
devices. Options the user set, or a device count the user chose, are kept. An option XLA does not know
aborts the process, so they are applied only on the jaxlib versions they were measured on (TESTED_JAXLIB);
they change how XLA:CPU compiles, never the result beyond float rounding. What they buy: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import os

YNN_FUSION_OPTION = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FUSIONS = "eltwise,reduce"
# Where the CPU has AMX, also bfloat16 x bfloat16 -> float32 dots, which YNNPACK runs on AMX; the UNets'
# bfloat16 convolutions then run partly as such dots (cpu/amx.py).
YNN_FUSIONS_AMX = "eltwise,reduce,individual_dot"
TESTED_JAXLIB = ("0.10.",)
DEVICE_COUNT_OPTION = "--xla_force_host_platform_device_count"
# Devices the CPU is split into by default: 2 beat 1 and 4 on 2 cores; larger CPUs are not measured yet, so
# the default stays at 2 there (SEMFLOW_CPU_DEVICES=n to try more).
DEFAULT_CPU_DEVICES = 2


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


def wanted(environ) -> list[str]:
    """The options to add to environ's XLA_FLAGS: the defaults the user has not set, and the device split
    where the user chose no device count. Empty where switched off (SEMFLOW_XLA_DEFAULTS=0), where a TPU or
    GPU backend will run the work (CPU options buy nothing there), or on an untested jaxlib. Raises
    ValueError for a bad SEMFLOW_CPU_DEVICES."""
    if switched_off(environ, "SEMFLOW_XLA_DEFAULTS") or not cpu_does_the_work(environ):
        return []
    if not on_tested_jaxlib():
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [opt for opt in cpu_defaults() if opt.split("=")[0] not in current]
    devices = cpu_devices(environ)
    if devices > 1 and DEVICE_COUNT_OPTION not in current and "JAX_NUM_CPU_DEVICES" not in environ:
        added.append(f"{DEVICE_COUNT_OPTION}={devices}")
    return added


def apply(environ) -> list[str]:
    """Adds `wanted(environ)` to environ["XLA_FLAGS"] (a mapping the caller passes); returns what it added."""
    added = wanted(environ)
    if added:
        environ["XLA_FLAGS"] = " ".join([environ.get("XLA_FLAGS", ""), *added]).strip()
    return added
