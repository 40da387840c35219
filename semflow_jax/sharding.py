"""Device mesh from config and the NamedSharding rules: batches over every axis, large arrays FSDP-split.

The mesh has a data-parallel axis and an `fsdp` axis (config.mesh, e.g. (("data", -1), ("fsdp", 1))).
A batch's leading dimension is split over all axes, so every device sees its own examples. A state array
(parameter, Adam moment, EMA) with at least `min_size` elements is split along "fsdp" on its largest
dimension that the axis divides; smaller arrays and scalars are replicated. With fsdp = 1 this is plain data
parallelism; with fsdp = all devices it is ZeRO-3: each device holds 1/n of the state and XLA gathers a
layer's weights where it needs them.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from semflow_jax.errors import SemFlowError

FSDP_AXIS = "fsdp"


def mesh_from_config(mesh_spec, devices=None) -> Mesh:
    """Builds a Mesh from (axis name, size) pairs; one size may be -1 to take the remaining devices.

    Axes are Auto (the compiler propagates shardings from the in/out shardings we give jit), chosen on
    purpose: jax.make_mesh would default to Explicit axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(str(name) for name, _ in mesh_spec)
    sizes = [int(size) for _, size in mesh_spec]
    if len(set(names)) != len(names):
        raise SemFlowError(f"mesh {tuple(mesh_spec)}: axis names must be distinct")
    if sizes.count(-1) > 1:
        raise SemFlowError(f"mesh {tuple(mesh_spec)}: at most one axis may have size -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise SemFlowError(f"mesh {tuple(mesh_spec)}: axis sizes must be positive or -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise SemFlowError(f"mesh {tuple(mesh_spec)} does not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise SemFlowError(
            f"mesh {tuple(mesh_spec)} needs {int(np.prod(sizes))} devices, have {len(devices)}"
        )
    # Devices in jax.devices() order: process-major, so each process's devices are a contiguous block of
    # the flattened mesh and its rows of a batch are contiguous too (what make_array_from_process_local_data
    # expects).
    return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=(AxisType.Auto,) * len(names))


def train_devices(max_cpu_devices: int, devices=None) -> list:
    """The devices a train mesh spans: all, or the first max_cpu_devices where the CPU is split (one process).

    XLA's CPU devices are a split of the same cores (semflow_jax/cpu/xla_options.py), and one of them alone still
    runs every op on all cores; so using fewer only trades the split's overlap against its per-device
    overheads, which win when each device's share of the batch is small. Accelerators: always all.
    """
    devices = list(jax.devices() if devices is None else devices)
    cpu_split = all(d.platform == "cpu" for d in devices) and jax.process_count() == 1
    if cpu_split and 0 < int(max_cpu_devices) < len(devices):
        return devices[: int(max_cpu_devices)]
    return devices


def train_mesh(config) -> Mesh:
    """The mesh a config trains on: config.mesh over `train_devices(config.train.cpu_devices)`."""
    return mesh_from_config(config.mesh, train_devices(config.train.cpu_devices))


def platform(mesh: Mesh) -> str:
    """The platform a mesh's programs are compiled for ("cpu", "tpu", "gpu"), from its devices."""
    return mesh.devices.flat[0].platform


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis; the rest replicated."""
    return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device."""
    return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp_size: int, min_size: int) -> P:
    """PartitionSpec of one state array: its largest fsdp-divisible dimension on "fsdp" if it is large.

    Ties go to the later dimension (a conv kernel's output channels rather than its input channels), which
    keeps the gathered weight's layout contiguous.
    """
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda i: (-shape[i], -i)):
        if shape[dim] % fsdp_size == 0:
            return P(*([None] * dim + [FSDP_AXIS]))
    return P()


def state_sharding(abstract_state, mesh: Mesh, min_size: int):
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) by the FSDP rule of `fsdp_spec`."""
    fsdp_size = dict(mesh.shape).get(FSDP_AXIS, 1)
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, min_size)), abstract_state
    )


def with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs of abstract_state carrying shardings: a template a checkpoint is restored into."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def check_batch(batch_size: int, mesh: Mesh, key: str) -> None:
    """Refuses a global batch that the devices and processes cannot share evenly."""
    if batch_size % mesh.size:
        hint = ""
        if all(d.platform == "cpu" for d in mesh.devices.flat):
            hint = (
                " (the CPU is split into that many devices: set SEMFLOW_CPU_DEVICES to choose another count)"
            )
        raise SemFlowError(
            f"{key}={batch_size} must be divisible by the {mesh.size} devices of the mesh{hint}"
        )


def to_global(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """A global batch array from this process's rows (each process passes its own, equally many)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a global array on every process (a gather across hosts where it is split)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_mesh():
    """This process's devices on the data axis: what the numpy API computes on."""
    return mesh_from_config((("data", -1), ("fsdp", 1)), jax.local_devices())
