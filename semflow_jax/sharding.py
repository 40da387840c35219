"""Device mesh from config, and the shardings of batches and replicated state over it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from semflow_jax.errors import SemFlowError


def mesh_from_config(mesh_spec, devices=None) -> Mesh:
    """Builds a Mesh from (axis name, size) pairs; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(str(name) for name, _ in mesh_spec)
    sizes = [int(size) for _, size in mesh_spec]
    if sizes.count(-1) > 1:
        raise SemFlowError(f"mesh {tuple(mesh_spec)}: at most one axis may have size -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise SemFlowError(f"mesh {tuple(mesh_spec)} does not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise SemFlowError(
            f"mesh {tuple(mesh_spec)} needs {int(np.prod(sizes))} devices, have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis; the rest replicated."""
    return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device."""
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh, key: str) -> None:
    """Refuses a global batch that the devices cannot share evenly."""
    if batch_size % mesh.size:
        raise SemFlowError(f"{key}={batch_size} must be divisible by the {mesh.size} devices of the mesh")
