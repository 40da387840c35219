"""TPU slices by the names Cloud TPU sells them under (v5e-8, v5p-64, ...): their chips, hosts and published specs.

`parse("v5p-64")` gives the slice: v4 and v5p are counted in TensorCores (two per chip, one jax device per
chip in megacore mode), so v5p-64 is 32 chips on 8 hosts; v5e and v6e are counted in chips, up to 8 on one
host and 4 per host above that. `compile_only_devices(slice)` asks libtpu for the slice's chips as devices
jax can compile for without any TPU attached (jax.experimental.topologies); nothing is opened or allocated.

The specs are the vendor's published per-chip numbers (cloud.google.com/tpu/docs: v4, v5e, v5p, v6e): dense
bfloat16 peak, HBM capacity and bandwidth. TPUs run float32 matrix products at the bfloat16 rate under jax's
default precision (one bfloat16 pass), so the bfloat16 peak is the ceiling for both.
"""

from __future__ import annotations

import dataclasses
import re

from semflow_jax.errors import SemFlowError


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's published numbers (per chip)."""

    generation: str
    device_kind: str  # as jax names it
    bf16_flops: float  # dense bfloat16 FLOP/s
    hbm_bytes: float  # the published capacity (the compiler reserves a little of it)
    hbm_bytes_per_sec: float
    cores_per_chip: int  # how the slice name counts: 2 (TensorCores) for v4 / v5p, 1 for v5e / v6e


CHIPS = {
    "v4": Chip("v4", "TPU v4", 275e12, 32 * 2**30, 1200e9, 2),
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * 2**30, 819e9, 1),
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * 2**30, 2765e9, 2),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * 2**30, 1638e9, 1),
}
# The same generations under the names the TPU API and libtpu use.
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}

# Chip layouts of the slice shapes Cloud TPU offers, by chip count: 3-D tori of 4-chip hosts (v4, v5p);
# 2-D grids (v5e, v6e), where one host holds up to 8 chips and larger slices are built of 4-chip hosts.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
MAX_CHIPS = 256


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: its user-facing name, chip, chip count, layout and hosts."""

    name: str
    chip: Chip
    chips: int
    layout: str  # e.g. "2x4x4"
    chips_per_host: tuple[int, int, int]

    @property
    def hosts(self) -> int:
        per_host = self.chips_per_host[0] * self.chips_per_host[1] * self.chips_per_host[2]
        return max(1, self.chips // per_host)

    @property
    def topology_name(self) -> str:
        """The name libtpu's topology description takes ("v5p:2x4x4"; libtpu calls v5p "v5")."""
        return f"{'v5' if self.chip.generation == 'v5p' else self.chip.generation}:{self.layout}"


def _sizes(generation: str) -> list[int]:
    chip = CHIPS[generation]
    shapes = _SHAPES_3D if chip.cores_per_chip == 2 else _SHAPES_2D
    return [n * chip.cores_per_chip for n in shapes]


def parse(name: str) -> Slice:
    """The slice a name like "v5e-8", "v5litepod-16", "v5p-64" or "v4-32" stands for; SemFlowError otherwise."""
    m = re.fullmatch(r"(v[0-9a-z]+)-([0-9]+)", name.strip().lower())
    if not m:
        raise SemFlowError(
            f"--topology={name!r}: expected a TPU slice name such as v5e-8, v5p-64, v4-32 or v6e-16"
        )
    generation, size = ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    if generation not in CHIPS:
        raise SemFlowError(
            f"--topology={name!r}: unknown TPU generation {m.group(1)!r}; known: {', '.join(CHIPS)}"
        )
    chip = CHIPS[generation]
    if size not in _sizes(generation):
        raise SemFlowError(
            f"--topology={name!r}: {generation} slices come as {generation}-N with N in "
            f"{_sizes(generation)} (N counts {'TensorCores, two per chip' if chip.cores_per_chip == 2 else 'chips'})"
        )
    chips = size // chip.cores_per_chip
    if chip.cores_per_chip == 2:
        return Slice(name, chip, chips, _SHAPES_3D[chips], (2, 2, 1))
    per_host = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}.get(chips, (2, 2, 1))
    return Slice(name, chip, chips, _SHAPES_2D[chips], per_host)


def known_names() -> list[str]:
    """Every slice name `parse` accepts, smallest first per generation."""
    return [f"{g}-{n}" for g in CHIPS for n in _sizes(g)]


def libtpu_importable() -> bool:
    """Whether libtpu (the TPU compiler) can be imported here; cheap: nothing is loaded."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


INSTALL_HINT = 'pip install "jax[tpu]==0.10.2" (libtpu only needs to be importable; no TPU is used)'


def compile_only_devices(s: Slice) -> list:
    """The slice's chips as jax devices to compile for (no TPU needed; libtpu must be importable)."""
    if not libtpu_importable():
        raise SemFlowError(f"planning for a TPU slice needs the TPU compiler: {INSTALL_HINT}")
    from jax.experimental import topologies

    kwargs = {"chips_per_host_bounds": s.chips_per_host}
    if s.chip.cores_per_chip == 2:
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as jax runs v4 and v5p
    devices = list(topologies.get_topology_desc(s.topology_name, "tpu", **kwargs).devices)
    if len(devices) != s.chips:
        raise SemFlowError(f"libtpu describes {s.name} as {len(devices)} devices, expected {s.chips} chips")
    return devices
