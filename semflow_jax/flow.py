"""SemFlow, the method in one file: anchors, perturbation, interpolation, loss and the ODE integrator.

Read this next to the paper (Wang et al., NeurIPS 2024). Time convention, used everywhere in this project:
t = 0 is the image z0, t = 1 is the anchor-painted mask z1, both in [-1, 1]. Segmentation integrates forward
(direction d = +1) from the image; synthesis integrates backward (d = -1) from the perturbed mask. The network
sees t * TIME_SCALE. Nothing here imports a model, a dataset or any I/O: the velocity comes in as a function
v(z, t) with t in [0, 1], so pixel models, latent models and analytic test fields share this code.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255
TIME_SCALE = 1000.0  # the UNet is fed t * 1000, as in the paper (SD's timestep range)
SOLVERS = ("euler", "heun")

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # v(z [N, ...], t [N]) -> [N, ...]


# ----------------------------------------------------------------------------------------------------------
# Anchors (Eq. 7): class c in base k, one digit per RGB channel, spaced s apart.
# ----------------------------------------------------------------------------------------------------------
def anchor_colors(num_classes: int, base: int = 6, spacing: float = 50.0) -> np.ndarray:
    """[num_classes, 3] float32 anchor colours in 0-255 units: s * (c // k^2, (c // k) % k, c % k)."""
    if num_classes > base**3:
        raise ValueError(f"{num_classes} classes need more than base**3 = {base**3} anchors (base={base})")
    c = np.arange(num_classes)
    m0 = c // base**2
    m1 = (c - m0 * base**2) // base
    m2 = c - m0 * base**2 - m1 * base
    return (spacing * np.stack([m0, m1, m2], axis=-1)).astype(np.float32)


def anchors_for(num_classes: int, base: int = 6, spacing: float = 50.0) -> np.ndarray:
    """[num_classes, 3] float32 anchors in the flow's [-1, 1] units (x / 127.5 - 1)."""
    return anchor_colors(num_classes, base, spacing) / 127.5 - 1.0


def labels_to_mask(labels: jax.Array, anchors: jax.Array) -> jax.Array:
    """Paints class ids [..., H, W] (IGNORE_LABEL allowed) as a mask [..., H, W, 3] in [-1, 1].

    Ignore pixels become white (+1, +1, +1). White is no anchor of the dataset's classes: with the defaults
    the largest channel value is s * (k - 1) = 250, and config validation refuses layouts where white would
    be a used anchor.
    """
    labels = jnp.asarray(labels).astype(jnp.int32)
    ignore = labels == IGNORE_LABEL
    painted = jnp.asarray(anchors)[jnp.where(ignore, 0, labels)]
    return jnp.where(ignore[..., None], 1.0, painted)


def mask_to_labels(mask: jax.Array, anchors: jax.Array) -> jax.Array:
    """Reads a mask [..., H, W, 3] back as int32 class ids [..., H, W]: the nearest anchor in L2."""
    d2 = jnp.sum((mask[..., None, :] - jnp.asarray(anchors)) ** 2, axis=-1)
    return jnp.argmin(d2, axis=-1).astype(jnp.int32)


def image_to_flow(images: jax.Array) -> jax.Array:
    """uint8 [..., 3] pixels -> float32 in [-1, 1] (the image endpoint z0)."""
    return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0


def flow_to_image(z: jax.Array) -> jax.Array:
    """float [-1, 1] -> uint8 pixels, clipped and rounded."""
    return jnp.clip(jnp.round((z + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


# ----------------------------------------------------------------------------------------------------------
# Finite perturbation (Eq. 14): M' = M + eps, eps ~ U(-beta, beta), beta < s / 2 so no class changes.
# ----------------------------------------------------------------------------------------------------------
def check_beta(beta: float, spacing: float) -> None:
    """Refuses a perturbation that could carry a pixel to another class's anchor (needs 0 <= beta < s/2)."""
    if not 0.0 <= beta < spacing / 2:
        raise ValueError(f"beta must be in [0, spacing/2) = [0, {spacing / 2}) in 0-255 units, got {beta}")


def perturb(rng: jax.Array, mask: jax.Array, beta: float) -> jax.Array:
    """Adds U(-beta, beta) noise (beta in 0-255 units) per pixel and channel to a [-1, 1] mask."""
    eps = jax.random.uniform(rng, mask.shape, mask.dtype, -1.0, 1.0) * (beta / 127.5)
    return mask + eps


# ----------------------------------------------------------------------------------------------------------
# Rectified flow: straight paths from image to mask, constant target velocity.
# ----------------------------------------------------------------------------------------------------------
def _bcast(t: jax.Array, z: jax.Array) -> jax.Array:
    return jnp.reshape(t, t.shape + (1,) * (z.ndim - t.ndim))


def interpolate(z0: jax.Array, z1: jax.Array, t: jax.Array) -> jax.Array:
    """z_t = (1 - t) z0 + t z1 for per-example times t [N]."""
    t = _bcast(t, z0)
    return (1.0 - t) * z0 + t * z1


def target_velocity(z0: jax.Array, z1: jax.Array) -> jax.Array:
    """The velocity of the straight path, z1 - z0 (the same at every t)."""
    return z1 - z0


def sample_time(rng: jax.Array, n: int, power: float = 1.0, fraction: float = 1.0) -> jax.Array:
    """Training times: each t is u ** power with probability `fraction`, else u; u ~ U(0, 1).

    power = 1 is the paper's t ~ U(0, 1). power > 1 spends more of a short budget near t = 0, the only place
    where the network cannot read the class off the mask already blended into z_t and must find it in the
    image (one-step segmentation is exactly v(z0, 0)); fraction < 1 keeps the rest of [0, 1] covered for
    many-step integration.
    """
    rng_u, rng_pick = jax.random.split(rng)
    u = jax.random.uniform(rng_u, (n,))
    return jnp.where(jax.random.uniform(rng_pick, (n,)) < fraction, u**power, u)


def flow_loss(velocity_fn: VelocityFn, z0: jax.Array, z1: jax.Array, t: jax.Array) -> jax.Array:
    """Mean squared error of v(z_t, t) against z1 - z0, averaged over every element."""
    v = velocity_fn(interpolate(z0, z1, t), t)
    return jnp.mean(jnp.square(v.astype(jnp.float32) - target_velocity(z0, z1)))


# ----------------------------------------------------------------------------------------------------------
# The integrator: one lax.scan for both directions; d is a traced sign, so one executable serves both.
# ----------------------------------------------------------------------------------------------------------
def integrate(
    velocity_fn: VelocityFn,
    z: jax.Array,
    direction: jax.Array | float,
    num_steps: int,
    solver: str = "euler",
    return_trajectory: bool = False,
):
    """Integrates dz/dt = v(z, t) over t in [0, 1] in num_steps uniform steps.

    direction d = +1 starts at t = 0 (image -> mask, segmentation); d = -1 starts at t = 1 (mask -> image,
    synthesis). Euler: t_i = t_start + d i / N, z <- z + d v(z, t_i) / N. Heun adds the trapezoidal
    correction with a second evaluation at t_{i+1}. Returns the end point, or (end point, trajectory
    [num_steps + 1, ...]) with return_trajectory.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    d = jnp.asarray(direction, jnp.float32)
    t_start = (1.0 - d) / 2.0
    h = 1.0 / num_steps
    n = z.shape[0]

    def step(z, i):
        t = t_start + d * i * h
        v = velocity_fn(z, jnp.full((n,), t))
        if solver == "heun":
            z_euler = z + d * h * v
            v_next = velocity_fn(z_euler, jnp.full((n,), t + d * h))
            v = 0.5 * (v + v_next)
        z = z + d * h * v.astype(z.dtype)
        return z, (z if return_trajectory else None)

    z_end, path = jax.lax.scan(step, z, jnp.arange(num_steps, dtype=jnp.float32))
    if return_trajectory:
        return z_end, jnp.concatenate([z[None], path], axis=0)
    return z_end
