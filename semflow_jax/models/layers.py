"""The layers both UNets are built from: flax's Conv, Dense and GroupNorm, and the upsampling convolution.

Each has nn.Conv's, nn.Dense's or nn.GroupNorm's parameters and initial values, so checkpoints map one to one
onto flax's and diffusers' layers. Two differences from flax, both for bfloat16 compute and channel
concatenations:
- the bias is added in float32 where the compute dtype is bfloat16 (`ops.add_bias`), so its gradient
  accumulates in float32;
- a layer may take a channel concatenation as its parts (a tuple, as the UNet decoder's ResBlocks read
  [h, skip]); the plain form concatenates them.

`UpsampleConv` is nearest x2 then a 3x3 convolution, computed as four 2x2 convolutions at the low resolution
(one per output-pixel parity, the nine taps folded onto the four input pixels they land on): the same result
with 16 instead of 36 multiply-adds per pixel and channel pair, on every platform.

What is written here is the plain form, the one TPU and GPU programs hold. On the CPU some layers run faster
written another way (cpu/kernels.py); each layer hands its CPU form to `kernels.on_cpu`, the one door.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semflow_jax.cpu import kernels
from semflow_jax.ops import add_bias, as_parts, biased, concatenated, conv_padding

__all__ = [
    "Conv",
    "Dense",
    "GroupNorm",
    "UpsampleConv",
    "add_bias",
    "as_parts",
    "group_norm",
    "upsample_conv",
]

# _TAPS[parity, tap, k]: which of the 3x3 kernel's rows (or columns) k add up to each of the two taps an output
# row of that parity sees. Even output rows 2i read input rows i-1 (kernel row 0) and i (rows 1 and 2); odd
# rows 2i+1 read rows i (kernel rows 0 and 1) and i+1 (row 2).
_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)
# The low-resolution padding each parity needs: even rows reach one row up, odd rows one row down.
_PAD = ((1, 0), (0, 1))
_NHWC = ("NHWC", "HWIO", "NHWC")


def upsample_conv(x, kernel, bias=None):
    """Nearest x2 upsampling, then a SAME 3x3 convolution: x [N, H, W, C], kernel [3, 3, C, F] -> [N, 2H, 2W, F]."""
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"upsample_conv needs a 3x3 kernel, got {kernel.shape[:2]}")
    n, h, w, c = x.shape
    f = kernel.shape[3]

    def upsampled(parity):
        def run(x, kernel, bias):
            # The folded kernels are summed in the parameters' precision, then cast to the compute dtype.
            folded = jnp.einsum("aui,bvj,ijcf->abuvcf", _TAPS, _TAPS, kernel.astype(jnp.float32))
            folded = folded.astype(x.dtype)
            # Each row parity's two column parities side by side: [N, H, W, 2, F].
            rows = [jnp.stack([parity(x, folded[a, b], (_PAD[a], _PAD[b]), bias) for b in (0, 1)], axis=3)
                    for a in (0, 1)]  # fmt: skip
            return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, f)  # [N, H, 2, W, 2, F] interleaved

        return run

    def parity_conv(x, k, pads, bias):  # the output pixels of one row and column parity: [N, H, W, F]
        y = jax.lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=_NHWC)
        return y if bias is None else add_bias(y, bias)

    cpu = kernels.upsample_form(x.dtype, c, f, upsampled)
    return kernels.on_cpu(cpu, upsampled(parity_conv), x, kernel, bias)


class UpsampleConv(nn.Module):
    """nn.Conv(features, (3, 3)) applied to the nearest x2 upsampling of x; the same "kernel" and "bias"."""

    features: int
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return upsample_conv(x if self.dtype is None else x.astype(self.dtype), kernel, bias)


def group_norm(x, scale, bias, num_groups: int, epsilon: float, fast_variance=True, dtype=None, silu=False):
    """nn.GroupNorm of x [N, ..., C] (statistics over all but the batch axis, per group of C // num_groups
    channels), then SiLU where silu=True, the SiLU that follows nearly every GroupNorm in both UNets.

    Statistics and normalization run in float32; the result is cast to dtype (x's by default).
    fast_variance: E[x^2] - E[x]^2 (flax's default); otherwise the mean of squared deviations (torch's)."""
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"GroupNorm: {c} channels do not split into {num_groups} groups")
    g = x.astype(jnp.float32).reshape(*x.shape[:-1], num_groups, c // num_groups)
    axes = (*range(1, g.ndim - 2), g.ndim - 1)  # space and the channels within a group
    mean = jnp.mean(g, axes, keepdims=True)
    if fast_variance:
        var = jnp.maximum(jnp.mean(g * g, axes, keepdims=True) - mean * mean, 0.0)
    else:
        var = jnp.mean(jnp.square(g - mean), axes, keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return (nn.silu(y) if silu else y).astype(x.dtype if dtype is None else dtype)


class GroupNorm(nn.Module):
    """nn.GroupNorm with its parameters ("scale", "bias") and numerics, optionally followed by SiLU."""

    num_groups: int = 32
    epsilon: float = 1e-6
    use_fast_variance: bool = True
    dtype: Any = None
    silu: bool = False  # apply SiLU to the result

    @nn.compact
    def __call__(self, x):
        """x [N, ..., C], or a tuple of channel parts (normalized as their concatenation, returned as parts)."""
        parts = as_parts(x)
        c = sum(p.shape[-1] for p in parts)
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        norm = dict(num_groups=self.num_groups, epsilon=self.epsilon, fast_variance=self.use_fast_variance,
                    dtype=self.dtype, silu=self.silu)  # fmt: skip
        offsets = np.cumsum([p.shape[-1] for p in parts])[:-1].tolist()

        def plain(parts, scale, bias):  # the concatenation normalized, handed back as the same parts
            return tuple(jnp.split(group_norm(concatenated(parts), scale, bias, **norm), offsets, axis=-1))

        out = kernels.on_cpu(kernels.group_norm_form(norm), plain, parts, scale, bias)
        return tuple(out) if isinstance(x, (tuple, list)) else out[0]


def _flat_init(init, n_in: int):
    """nn.DenseGeneral's kernel initialization: `init` on the kernel flattened to [inputs, outputs], reshaped."""

    def wrapped(rng, shape, dtype=jnp.float32):
        flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
        return jnp.reshape(init(rng, flat, dtype), shape)

    return wrapped


class Conv(nn.Module):
    """nn.Conv (NHWC, 2-D) with its parameters ("kernel" [kh, kw, C, F], "bias" [F]) and initial values, the
    bias added as `add_bias` does. x may also be a tuple of channel parts: the convolution of their
    concatenation."""

    features: int
    kernel_size: tuple = (3, 3)
    strides: tuple = (1, 1)
    padding: Any = "SAME"
    use_bias: bool = True
    dtype: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        parts = as_parts(x)
        c = sum(p.shape[-1] for p in parts)
        kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, c, self.features), jnp.float32)
        bias = (
            self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
            if self.use_bias
            else None
        )
        dtype = self.dtype or jnp.result_type(*parts)
        strides, padding = tuple(self.strides), self.padding

        def convolve(p, k, acc=None):
            return jax.lax.conv_general_dilated(
                p, k, strides, conv_padding(padding), dimension_numbers=_NHWC, preferred_element_type=acc
            )

        def plain(parts, kernel, bias):
            return biased(convolve(concatenated(parts).astype(dtype), kernel.astype(dtype)), bias, dtype)

        cpu = kernels.conv_form(
            parts, self.features, tuple(self.kernel_size), strides, padding, dtype, convolve
        )
        return kernels.on_cpu(cpu, plain, parts, kernel, bias)


class Dense(nn.Module):
    """nn.Dense, or nn.DenseGeneral over x's last `axes` axes with features a tuple, with their parameters and
    initial values, the bias added as `add_bias` does. x may be a tuple of channel parts (axes=1), as in
    `Conv`: the UNet decoder's 1x1 skip projection of [h, skip]."""

    features: Any  # int, or a tuple: the kernel's trailing axes and the output's
    axes: int = 1
    use_bias: bool = True
    dtype: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        parts = as_parts(x)
        if len(parts) > 1 and self.axes != 1:
            raise ValueError("Dense of channel parts contracts the last axis only (axes=1)")
        features = tuple(self.features) if isinstance(self.features, (tuple, list)) else (self.features,)
        inputs = (*parts[0].shape[len(parts[0].shape) - self.axes : -1], sum(p.shape[-1] for p in parts))
        kernel = self.param(
            "kernel", _flat_init(self.kernel_init, self.axes), (*inputs, *features), jnp.float32
        )
        bias = (
            self.param("bias", nn.initializers.zeros_init(), features, jnp.float32) if self.use_bias else None
        )
        dtype = self.dtype or jnp.result_type(*parts)
        n = self.axes

        def product(p, k, acc=None):  # x's last n axes against the kernel's first n, as nn.DenseGeneral
            dims = (tuple(range(p.ndim - n, p.ndim)), tuple(range(n))), ((), ())
            return jax.lax.dot_general(p, k, dims, preferred_element_type=acc)

        def plain(parts, kernel, bias):
            return biased(product(concatenated(parts).astype(dtype), kernel.astype(dtype)), bias, dtype)

        return kernels.on_cpu(kernels.dense_form(parts, product, dtype, n - 1), plain, parts, kernel, bias)
