"""Velocity networks, built from config; `velocity_fn` binds one to parameters as v(z, t) with t in [0, 1]."""

from __future__ import annotations

import jax.numpy as jnp

from semflow_jax import flow
from semflow_jax.models.unet import UNet


def build_model(config) -> UNet:
    """The UNet that config.model describes (hashable: it is a static argument of the jitted samplers)."""
    m = config.model
    return UNet(
        out_channels=3,
        channels=int(m.channels),
        channel_mults=tuple(int(x) for x in m.channel_mults),
        num_res_blocks=int(m.num_res_blocks),
        attention_resolutions=tuple(int(x) for x in m.attention_resolutions),
        num_heads=int(m.num_heads),
        num_groups=int(m.num_groups),
        dropout=float(m.dropout),
        dtype=jnp.dtype(m.dtype),
    )


def velocity_fn(model, params, train: bool = False, rngs=None) -> flow.VelocityFn:
    """v(z, t) = model(z, t * TIME_SCALE): the flow's time in [0, 1], the network's in [0, 1000]."""

    def v(z, t):
        return model.apply({"params": params}, z, t * flow.TIME_SCALE, train=train, rngs=rngs)

    return v
