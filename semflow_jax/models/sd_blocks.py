"""The building blocks of Stable Diffusion's UNet and VAE in flax.linen, numerically as in diffusers.

Sub-modules are named after the diffusers state-dict keys with "." before an index turned into "_"
(`down_blocks.0.resnets.1.conv1` -> down_blocks_0 / resnets_1 / conv1), so `semflow_jax.convert` maps
checkpoints by rule, not by table. Everything is NHWC; parameters float32, compute in `dtype`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from semflow_jax.models.layers import Conv, Dense, GroupNorm, UpsampleConv, add_bias


def group_norm(groups: int, eps: float, dtype, name: str, silu: bool = False) -> GroupNorm:
    """torch.nn.GroupNorm (then SiLU with silu=True): two-pass variance (the fast E[x^2]-E[x]^2 drifts from
    torch at 1e-4)."""
    return GroupNorm(groups, epsilon=eps, dtype=dtype, use_fast_variance=False, silu=silu, name=name)


def conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding=None) -> Conv:
    """A 2-D convolution with torch's default symmetric padding of kernel // 2."""
    pad = kernel // 2 if padding is None else padding
    return Conv(features, (kernel, kernel), (stride, stride), padding=pad, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D (time_embedding_norm="default", output_scale_factor 1)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = group_norm(self.groups, self.eps, self.dtype, "norm1", silu=True)(x)
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if temb is not None:
            t = Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = add_bias(h, t[:, None, None, :])
        h = group_norm(self.groups, self.eps, self.dtype, "norm2", silu=True)(h)
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


def attend(q, k, v, query_chunk: int = 0):
    """Scaled dot-product attention of q [B, Q, H, D] over k, v [B, K, H, D]; softmax in float32.

    With 0 < query_chunk < Q (dividing Q) the queries go through in chunks, each rematerialized in the
    backward pass: the [B, H, chunk, K] logits of one chunk are all that is ever live, instead of
    [B, H, Q, K] (2 GiB of float32 per attention layer for SD at 512^2, where Q = K = 4096). Exact: every
    chunk's softmax sees all keys.
    """

    def one(q_part):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q_part, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)

    b, n, h, d = q.shape
    if not 0 < query_chunk < n or n % query_chunk:
        return one(q)
    chunks = q.reshape(b, n // query_chunk, query_chunk, h, d).swapaxes(0, 1)
    out = jax.lax.map(jax.checkpoint(one), chunks)
    return out.swapaxes(0, 1).reshape(b, n, h, v.shape[-1])


class Attention(nn.Module):
    """diffusers Attention: multi-head scaled dot-product attention, to_q/to_k/to_v/to_out.0.

    context=None is self-attention. The softmax runs in float32 whatever the compute dtype; query_chunk
    bounds its memory (see `attend`).
    """

    heads: int
    head_dim: int
    out_dim: int
    qkv_bias: bool = False
    dtype: Any = jnp.float32
    query_chunk: int = 0

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.head_dim

        def dense(name, bias):
            return Dense(inner, use_bias=bias, dtype=self.dtype, name=name)

        q, k, v = (
            dense("to_q", self.qkv_bias)(x),
            dense("to_k", self.qkv_bias)(context),
            dense("to_v", self.qkv_bias)(context),
        )
        b = x.shape[0]
        q, k, v = (y.reshape(b, -1, self.heads, self.head_dim) for y in (q, k, v))
        out = attend(q, k, v, self.query_chunk).reshape(b, -1, inner)
        return Dense(self.out_dim, dtype=self.dtype, name="to_out_0")(out)


class SpatialSelfAttention(nn.Module):
    """The VAE's single-head attention over all positions: group norm, attention, residual."""

    groups: int = 32
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = group_norm(self.groups, self.eps, self.dtype, "group_norm")(x).reshape(b, h * w, c)
        q, k, v = (Dense(c, dtype=self.dtype, name=n)(y) for n in ("to_q", "to_k", "to_v"))
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / math.sqrt(c)
        y = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
        y = Dense(c, dtype=self.dtype, name="to_out_0")(y)
        return x + y.reshape(b, h, w, c)


class GEGLU(nn.Module):
    """proj to 2 x inner, then value * gelu(gate) with the exact (erf) gelu."""

    inner: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        value, gate = jnp.split(Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers FeedForward: net.0 = GEGLU to 4 d, net.2 = linear back to d."""

    dim: int
    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = GEGLU(self.dim * self.mult, self.dtype, name="net_0")(x)
        return Dense(self.dim, dtype=self.dtype, name="net_2")(x)


class TransformerBlock(nn.Module):
    """diffusers BasicTransformerBlock: self-attention, cross-attention, GEGLU, each pre-LayerNorm."""

    dim: int
    heads: int
    head_dim: int
    dtype: Any = jnp.float32
    query_chunk: int = 0

    @nn.compact
    def __call__(self, x, context):
        def ln(name):
            return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)

        def attention(name):
            return Attention(
                self.heads, self.head_dim, self.dim, dtype=self.dtype, query_chunk=self.query_chunk, name=name
            )

        x = x + attention("attn1")(ln("norm1")(x))
        x = x + attention("attn2")(ln("norm2")(x), context)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(ln("norm3")(x))


class Transformer2D(nn.Module):
    """diffusers Transformer2DModel (one block): norm, proj_in (1x1 conv or linear), blocks, proj_out, residual."""

    heads: int
    head_dim: int
    groups: int = 32
    linear_projection: bool = False
    dtype: Any = jnp.float32
    query_chunk: int = 0

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        y = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.linear_projection:
            y = Dense(inner, dtype=self.dtype, name="proj_in")(y.reshape(b, h * w, c))
        else:
            y = conv(inner, 1, self.dtype, "proj_in")(y).reshape(b, h * w, inner)
        y = TransformerBlock(
            inner, self.heads, self.head_dim, self.dtype, self.query_chunk, name="transformer_blocks_0"
        )(y, context)
        if self.linear_projection:
            y = Dense(c, dtype=self.dtype, name="proj_out")(y).reshape(b, h, w, c)
        else:
            y = conv(c, 1, self.dtype, "proj_out")(y.reshape(b, h, w, inner))
        return x + y


class Downsample(nn.Module):
    """Stride-2 3x3 convolution; padding 1 (UNet) or the VAE's (0, 1, 0, 1) right/bottom pad."""

    channels: int
    vae_padding: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.vae_padding:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return conv(self.channels, 3, self.dtype, "conv", stride=2, padding=0)(x)
        return conv(self.channels, 3, self.dtype, "conv", stride=2)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution (as four 2x2 convolutions: models/layers.py)."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return UpsampleConv(self.channels, dtype=self.dtype, name="conv")(x)


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0):
    """diffusers get_timestep_embedding: [N] -> [N, dim], sin then cos (cos then sin when flipped)."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
