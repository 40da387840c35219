"""Segmentation and synthesis on a device mesh: both directions call one jitted integrator.

A `Sampler` jits `flow.integrate` over a mesh with explicit shardings: parameters laid out as given (FSDP
splits from training, or replicated), batches split over every device. It compiles once per (batch shape,
steps, solver); the direction is a traced argument, so image -> mask and mask -> image share the executable.
Inputs and outputs are global jax Arrays; `semflow_jax.api.SemFlow` wraps this in numpy in, numpy out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from semflow_jax import flow, sharding
from semflow_jax.models import Codec, build_model, build_vae, velocity_fn


class Sampler:
    """The velocity network `model` with its anchors, integrated over `mesh`."""

    def __init__(self, model, anchors, mesh, param_sharding, codec=None):
        self.model, self.mesh = model, mesh
        self._anchors = np.asarray(anchors, np.float32)
        self.param_sharding = param_sharding
        self.batch_sharding = sharding.batch_sharding(mesh)
        self._compiled = {}
        # The small steps around the integrator, jitted with the batch layout as their output layout: the
        # integrator then sees one input sharding from both directions (one executable), never a reshard.
        # In latent mode they also encode (posterior mode) and decode with the frozen VAE.
        bs = self.batch_sharding
        codec = Codec() if codec is None else codec
        self.image_in = jax.jit(lambda x, vp: codec.encode(vp, flow.image_to_flow(x)), out_shardings=bs)
        self.labels_out = jax.jit(
            lambda z, a, vp: flow.mask_to_labels(codec.decode(vp, z), a), out_shardings=bs
        )
        self.image_out = jax.jit(lambda z, vp: flow.flow_to_image(codec.decode(vp, z)), out_shardings=bs)
        self.mask_in = jax.jit(
            lambda labels, rngs, anchors, beta, vp: codec.encode(
                vp,
                jax.vmap(flow.perturb, in_axes=(0, 0, None))(
                    rngs, flow.labels_to_mask(labels, anchors), beta
                ),
            ),
            out_shardings=bs,
        )

    @functools.cached_property
    def anchors(self) -> jax.Array:
        """The anchor colours [K, 3], replicated over the mesh (put there on first use: a Sampler built for
        devices that are only a compile target, semflow_jax.plan's, never touches them)."""
        return jax.device_put(jnp.asarray(self._anchors), sharding.replicated(self.mesh))

    def compiled(self, num_steps: int, solver: str = "euler", return_trajectory: bool = False):
        """The jitted integrator f(params, z, direction) for these static settings (built once, then reused)."""
        key = (int(num_steps), solver, bool(return_trajectory))
        if key not in self._compiled:
            model = self.model

            def run(params, z, direction):
                return flow.integrate(
                    velocity_fn(model, params), z, direction, int(num_steps), solver, return_trajectory
                )

            out = self.batch_sharding
            if return_trajectory:  # [steps + 1, N, ...]: the batch is the second dimension there
                out = (out, NamedSharding(self.mesh, P(None, self.mesh.axis_names)))
            self._compiled[key] = jax.jit(
                run,
                in_shardings=(self.param_sharding, self.batch_sharding, sharding.replicated(self.mesh)),
                out_shardings=out,
            )
        return self._compiled[key]

    def run_flow(self, params, z, direction: float, num_steps: int, solver="euler", return_trajectory=False):
        """Integrates from global z; direction +1.0 (t: 0 -> 1) or -1.0 (t: 1 -> 0)."""
        f = self.compiled(num_steps, solver, return_trajectory)
        return f(params, z, jnp.float32(direction))

    def segment(
        self, params, images, num_steps: int, solver: str = "euler", vae_params=None, return_trajectory=False
    ):
        """uint8 images [N, H, W, 3] -> int32 labels [N, H, W]: integrate forward, read the nearest anchor.

        vae_params: the frozen VAE's parameters in latent mode (None in pixel mode). With return_trajectory,
        returns (labels, path): path [num_steps + 1, N, ...] holds every state z_t in flow space.
        """
        out = self.run_flow(
            params, self.image_in(images, vae_params), 1.0, num_steps, solver, return_trajectory
        )
        z, path = out if return_trajectory else (out, None)
        labels = self.labels_out(z, self.anchors, vae_params)
        return (labels, path) if return_trajectory else labels

    def synthesize(
        self,
        params,
        labels,
        rngs,
        beta: float,
        num_steps: int,
        solver="euler",
        vae_params=None,
        return_trajectory=False,
    ):
        """int labels [N, H, W] -> uint8 images [N, H, W, 3]: perturb the painted mask, integrate backward.

        rngs [N] holds one key per example, so a sample does not depend on what else is in its batch. With
        return_trajectory, returns (images, path) as `segment` does.
        """
        mask = self.mask_in(labels, rngs, self.anchors, jnp.float32(beta), vae_params)
        out = self.run_flow(params, mask, -1.0, num_steps, solver, return_trajectory)
        z, path = out if return_trajectory else (out, None)
        images = self.image_out(z, vae_params)
        return (images, path) if return_trajectory else images

    def pictures(self, path, vae_params=None) -> list:
        """Each state of a trajectory [T, N, ...] as uint8 pictures [N, H, W, 3] (decoded in latent mode),
        one frame at a time so that only one decoded frame is alive at once."""
        return [self.image_out(path[i], vae_params) for i in range(path.shape[0])]


def make_sampler(config, mesh, param_sharding) -> Sampler:
    """The Sampler of config's model, anchors and latent codec over mesh, parameters laid out as given."""
    anchors = flow.anchors_for(config.data.num_classes, config.anchors.base, config.anchors.spacing)
    return Sampler(build_model(config), anchors, mesh, param_sharding, Codec(build_vae(config)))
