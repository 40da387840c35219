"""Segmentation and synthesis with a trained velocity network: both call one jitted integrator.

`run_flow` compiles once per (model, shape, steps, solver); the direction is a traced argument, so image ->
mask and mask -> image share the executable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from semflow_jax import flow
from semflow_jax.models import velocity_fn


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "solver", "return_trajectory"))
def run_flow(model, params, z, direction, num_steps: int, solver: str = "euler", return_trajectory=False):
    """Integrates the model's ODE from z; direction +1.0 (t: 0 -> 1) or -1.0 (t: 1 -> 0), a traced scalar."""
    return flow.integrate(velocity_fn(model, params), z, direction, num_steps, solver, return_trajectory)


def segment(model, params, images, anchors, num_steps: int, solver: str = "euler"):
    """uint8 images [N, H, W, 3] -> int32 labels [N, H, W]: integrate forward, read the nearest anchor."""
    z = run_flow(model, params, flow.image_to_flow(images), jnp.float32(1.0), num_steps, solver)
    return flow.mask_to_labels(z, anchors)


def synthesize(model, params, labels, anchors, rngs, beta: float, num_steps: int, solver: str = "euler"):
    """int labels [N, H, W] -> uint8 images [N, H, W, 3]: perturb the painted mask, integrate backward.

    rngs [N] holds one key per example, so a sample does not depend on what else is in its batch.
    """
    mask = jax.vmap(flow.perturb, in_axes=(0, 0, None))(rngs, flow.labels_to_mask(labels, anchors), beta)
    z = run_flow(model, params, mask, jnp.float32(-1.0), num_steps, solver)
    return flow.flow_to_image(z)
