"""The velocity network: a time-conditioned UNet in flax.linen, sized entirely by config.

`UNet().apply({"params": params}, z, t)` maps z [N, H, W, C] and the network time t [N] (already t * 1000,
see `semflow_jax.flow.TIME_SCALE`) to a velocity of z's shape. The layout is the DDPM/ADM one: a stem
convolution, levels of ResNet blocks (GroupNorm, SiLU, time-embedding shift) with stride-2 downsampling,
self-attention at the configured feature-map sizes, a middle block, and a mirrored decoder with skip
connections. A few hundred thousand parameters (channels=16) up to Stable-Diffusion scale (channels=320,
channel_mults=(1, 2, 4, 4)) come from the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from semflow_jax.cpu.kernels import chosen_by
from semflow_jax.models.layers import Conv, Dense, GroupNorm, UpsampleConv, add_bias, as_parts


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of a [N] time vector into [N, dim] (Transformer/DDPM style, cos then sin)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, the time embedding added in between, a 1x1 skip when widths differ.

    x may be a tuple of arrays: the block's input is then their channel concatenation (the decoder's
    [h, skip]), which the first GroupNorm, convolution and the skip read part by part, never building it.
    """

    channels: int
    num_groups: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, train: bool = False):
        parts = as_parts(x)
        h = GroupNorm(self.num_groups, dtype=self.dtype, silu=True, name="norm1")(parts)
        h = Conv(self.channels, (3, 3), dtype=self.dtype, name="conv1")(h)
        h = add_bias(h, Dense(self.channels, dtype=self.dtype, name="time")(nn.silu(temb))[:, None, None, :])
        h = GroupNorm(self.num_groups, dtype=self.dtype, silu=True, name="norm2")(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        # Zero-initialised last convolution: every block starts as the identity, which keeps a deep
        # UNet trainable from step 0 without tuning the learning rate to its depth.
        h = Conv(self.channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros, name="conv2")(h)
        if sum(p.shape[-1] for p in parts) != self.channels:
            x = Dense(self.channels, dtype=self.dtype, name="skip")(parts)
        elif len(parts) > 1:
            x = jnp.concatenate(parts, axis=-1)
        return x + h


def dot_product_attention(query, key, value, bias=None, mask=None, **unused):
    """softmax(q k^T / sqrt(d)) v with flax's attention_fn signature, as jax.nn.dot_product_attention computes it.

    The same result as flax's default. XLA:CPU runs its forward pass faster and its backward pass not
    (docs/PERFORMANCE.md), so the UNet uses it for inference only. No dropout: the block has none.
    """
    # The 1/sqrt(d) scale applied to the queries rather than to the [N, heads, T, T] logits: XLA:CPU would
    # otherwise materialize the scalar as a full logits-sized array on every call (cpu/kernels.py).
    scale = jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    return jax.nn.dot_product_attention(query * scale, key, value, bias=bias, mask=mask, scale=1.0)


class SelfAttention(nn.Module):
    """nn.MultiHeadDotProductAttention over x [N, T, C] (self-attention, no mask, no dropout): its parameters
    ("query", "key", "value": [C, heads, C / heads]; "out": [heads, C / heads, C]) and result, its projections
    being `layers.Dense`, which adds the biases in float32 under bfloat16 compute."""

    num_heads: int
    dtype: Any = jnp.float32
    attention_fn: Any = nn.dot_product_attention
    out_kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        heads = (self.num_heads, c // self.num_heads)
        q, k, v = (Dense(heads, dtype=self.dtype, name=n)(x) for n in ("query", "key", "value"))
        y = self.attention_fn(q, k, v, dtype=self.dtype)
        return Dense(c, axes=2, dtype=self.dtype, kernel_init=self.out_kernel_init, name="out")(y)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions of a feature map, pre-norm, residual."""

    num_heads: int
    num_groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        n, h, w, c = x.shape
        y = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x).reshape(n, h * w, c)
        y = SelfAttention(
            self.num_heads,
            dtype=self.dtype,
            # Sampling runs jax.nn's lowering (faster forward); training flax's (faster backward).
            attention_fn=nn.dot_product_attention if train else dot_product_attention,
            out_kernel_init=nn.initializers.zeros,
            name="attention",
        )(y)
        return x + y.reshape(n, h, w, c)


class UNet(nn.Module):
    """Time-conditioned UNet: (z [N, H, W, C], t [N] in network units) -> velocity [N, H, W, out]."""

    out_channels: int = 3
    channels: int = 64
    channel_mults: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (8,)
    num_heads: int = 4
    num_groups: int = 32
    dropout: float = 0.0
    dtype: Any = jnp.float32
    kernels: str = (
        "auto"  # config.model.kernels: the layers' CPU forms on the CPU, or "plain" (cpu/kernels.py)
    )

    @chosen_by
    @nn.compact
    def __call__(self, z, t, train: bool = False):
        temb_dim = 4 * self.channels
        temb = timestep_embedding(t, self.channels)
        temb = Dense(temb_dim, dtype=self.dtype, name="time_in")(temb)
        temb = Dense(temb_dim, dtype=self.dtype, name="time_out")(nn.silu(temb))

        def res(ch, name):
            return ResBlock(ch, self.num_groups, self.dropout, self.dtype, name=name)

        def attn(name):
            return AttentionBlock(self.num_heads, self.num_groups, self.dtype, name=name)

        h = Conv(self.channels, (3, 3), dtype=self.dtype, name="stem")(z.astype(self.dtype))
        skips = [h]
        for level, mult in enumerate(self.channel_mults):
            for i in range(self.num_res_blocks):
                h = res(self.channels * mult, f"down{level}_res{i}")(h, temb, train)
                if h.shape[1] in self.attention_resolutions:
                    h = attn(f"down{level}_attn{i}")(h, train)
                skips.append(h)
            if level != len(self.channel_mults) - 1:
                h = Conv(h.shape[-1], (3, 3), (2, 2), dtype=self.dtype, name=f"down{level}")(h)
                skips.append(h)

        h = res(h.shape[-1], "mid_res0")(h, temb, train)
        h = attn("mid_attn")(h, train)
        h = res(h.shape[-1], "mid_res1")(h, temb, train)

        for level, mult in reversed(list(enumerate(self.channel_mults))):
            for i in range(self.num_res_blocks + 1):
                # [h, skip] concatenated along channels, passed as its two parts (ResBlock).
                h = res(self.channels * mult, f"up{level}_res{i}")((h, skips.pop()), temb, train)
                if h.shape[1] in self.attention_resolutions:
                    h = attn(f"up{level}_attn{i}")(h, train)
            if level != 0:
                # Nearest x2 then a 3x3 convolution, computed as four 2x2 convolutions (models/layers.py).
                h = UpsampleConv(h.shape[-1], dtype=self.dtype, name=f"up{level}")(h)

        h = GroupNorm(self.num_groups, dtype=self.dtype, silu=True, name="out_norm")(h)
        out = Conv(
            self.out_channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros, name="out"
        )(h)
        return out.astype(jnp.float32)
