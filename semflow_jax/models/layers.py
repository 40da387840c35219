"""Layers both UNets share, written in the form XLA compiles fastest, with the parameters of the flax layers.

`UpsampleConv` is nearest-neighbour x2 followed by a 3x3 convolution, the up-sampling step of our UNet and of
Stable Diffusion's. Upsampling first repeats every pixel, so each output pixel's 3x3 window only spans a 2x2
patch of the low-resolution input, with some of the nine taps landing on the same input pixel. Adding those
taps' weights gives four 2x2 kernels, one per output-pixel parity, and the same result (up to float rounding)
from four 2x2 convolutions at the low resolution: 16 instead of 36 multiply-adds per input channel, output
channel and low-resolution pixel, and a four times smaller input. Measured on a 2-core CPU: 1.7-2.2x faster
forward and 2.0-2.3x faster forward + backward than repeat-then-convolve (benchmarks/layers.py).

`GroupNorm` is nn.GroupNorm with its statistics computed the way XLA:CPU reduces fastest (see `group_norm`);
with silu=True it also applies the SiLU that follows every GroupNorm in both UNets, written without scalar
constants: XLA:CPU hands each scalar constant a YNN fusion reads to it as a materialized full-size array.

`Conv` and `Dense` are nn.Conv and nn.Dense (or nn.DenseGeneral) with their parameters, adding the bias in
float32 where the compute dtype is bfloat16 (`add_bias`: the bias gradient is then a float32 sum). Given a
channel concatenation as its parts, they compute one product per part, summed; with `GroupNorm` of parts
this lets the decoder's ResBlocks read [h, skip] without ever writing the concatenated array (on a 2-core
CPU the mid model's 25-step sampler and train step about 2% faster).

`winograd_conv3x3` is a float32 3x3 convolution computed with Winograd's F(4, 3) along the width: six
3x1 convolutions of transformed column tiles do the work of the 3x3 one with half the multiply-adds, the
transforms being additions only. `Conv` uses it on the CPU for layers of 128 channels or more in and out
(`use_winograd`): the mid model's sampler about 10% faster on 2 cores. SEMFLOW_WINOGRAD=0 turns it off;
`Conv(winograd=...)` chooses per layer.

`amx_conv` is a bfloat16 stride-1 convolution whose backward pass (and, for wide layers, forward pass) is
products with float32 results, which XLA:CPU hands to YNNPACK's AMX kernels (its bfloat16 convolutions have no
AMX path, and their gradients are slow); `Conv` and `upsample_conv` use it in bfloat16 where
`dots_reach_amx()` (xla_options turns YNNPACK's dots on where the CPU has AMX).

Every CPU-only form (Winograd, AMX, the sums over channel parts and the GroupNorm of parts) goes through one
door, `on_cpu(cpu, plain, ...)`, a `jax.lax.platform_dependent` choice: a program compiled for a TPU or GPU
holds only the plain form. `CPU_FORMS` names the CPU forms' functions; tests/test_tpu.py finds none of them
in the compiled TPU programs' HLO, and finds them in the CPU ones.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# _TAPS[parity, tap, k]: which of the 3x3 kernel's rows (or columns) k add up to each of the two taps an output
# row of that parity sees. Even output rows 2i read input rows i-1 (kernel row 0) and i (rows 1 and 2); odd
# rows 2i+1 read rows i (kernel rows 0 and 1) and i+1 (row 2).
_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)
# The low-resolution padding each parity needs: even rows reach one row up, odd rows one row down.
_PAD = ((1, 0), (0, 1))


def as_parts(x) -> tuple:
    """x as a tuple of channel parts: a tuple or list as it is, one array as a 1-tuple."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def concatenated(parts):
    """The channel concatenation of a tuple of parts (the array itself for one part)."""
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def on_cpu(cpu, plain, *args):
    """cpu(*args) in a program compiled for the CPU, plain(*args) in one compiled for any other platform.

    The one door of the CPU forms in this module (Winograd, `amx_conv`, sums over channel parts). The choice is
    jax.lax.platform_dependent's: made when the program is lowered for its platform, not when it is traced,
    so a train step or sampler compiled for a TPU or GPU, ahead of time on a CPU host too, holds only the
    plain form (tests/test_tpu.py reads it back from the compiled program). cpu=None: plain everywhere."""
    if cpu is None:
        return plain(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=plain)


def upsample_conv(x, kernel, bias=None):
    """Nearest x2 upsampling, then a SAME 3x3 convolution: x [N, H, W, C], kernel [3, 3, C, F] -> [N, 2H, 2W, F].

    On the CPU in bfloat16 where products reach AMX (`_use_amx_conv`) the parities run as `amx_conv`; every
    other platform and dtype runs XLA's convolutions (`on_cpu`)."""
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"upsample_conv needs a 3x3 kernel, got {kernel.shape[:2]}")
    n, h, w, _ = x.shape
    c, f = kernel.shape[2:]

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
        y = jax.lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if bias is None else add_bias(y, bias)

    def parity_amx(x, k, pads, bias):  # a float32 result: the bias is added before it is rounded
        y = amx_conv(x, k, pads, min(c, f) >= DOTS_FORWARD_MIN_CHANNELS)
        return (y if bias is None else add_bias(y, bias)).astype(x.dtype)

    cpu = upsampled(parity_amx) if _use_amx_conv(x.dtype, f) else None
    return on_cpu(cpu, upsampled(parity_conv), x, kernel, bias)


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


@jax.custom_jvp
def _silu(y, one):
    """silu(y) = y * sigmoid(y), with its 1 given as the runtime array `one` (see `group_norm`)."""
    return y * (one / (one + jnp.exp(-y)))


@_silu.defjvp
def _silu_jvp(primals, tangents):
    # d/dy y*s(y) = s * (1 + y * (1 - s)); finite where exp(-y) overflows (s is then exactly 0). `one`'s
    # tangent is ignored: it is identically 1 (mul * 0 + 1), so its derivative is 0.
    y, one = primals
    sig = one / (one + jnp.exp(-y))
    return y * sig, tangents[0] * sig * (one + y * (one - sig))


def group_norm(
    x, scale, bias, num_groups: int, epsilon: float, fast_variance: bool = True, dtype=None, silu=False
):
    """GroupNorm of x [N, ..., C] over all but the batch axis, per group of C // num_groups channels.

    x may also be a tuple of arrays [N, ..., C_i]: the GroupNorm of their concatenation along channels,
    returned as a tuple of the same parts, with the concatenation never built (see `Conv`).

    The statistics are summed per channel over space first (a reduction along the slow axis, contiguous in
    NHWC, one fast pass) and only then over each group's channels; summing over (space, channels-in-group) at
    once, as flax does, costs XLA:CPU up to four times more. The affine is folded into one multiply-add per
    (example, channel), which XLA fuses into the consumer. Statistics and normalization run in float32; the
    result is cast to dtype (x's by default). fast_variance: E[x^2] - E[x]^2 (flax's default); otherwise the
    two-pass mean of squared deviations (torch's numerics).
    """
    parts = as_parts(x)
    first = parts[0]
    n, widths = first.shape[0], [p.shape[-1] for p in parts]
    c = sum(widths)
    if c % num_groups:
        raise ValueError(f"GroupNorm: {c} channels do not split into {num_groups} groups")
    per = c // num_groups
    space = tuple(range(1, first.ndim - 1))
    xf = [p.astype(jnp.float32) for p in parts]  # kept [N, ..., C]: a reshape makes XLA:CPU's consumer slower
    count = math.prod(first.shape[1:-1]) * per
    column = (n,) + (1,) * len(space) + (-1,)  # [N, C] broadcast against x

    def group_mean(channel_sums):  # [N, C] per-channel sums -> each channel's group mean, [N, C]
        return jnp.repeat(channel_sums.reshape(n, num_groups, per).sum(-1) / count, per, axis=-1)

    def channel_sums(fn):  # fn(part, index) summed over space, parts side by side: [N, C]
        return jnp.concatenate([jnp.sum(fn(p, i), axis=space) for i, p in enumerate(xf)], axis=-1)

    offsets = np.cumsum([0, *widths])
    mean = group_mean(channel_sums(lambda p, i: p))

    def sliced(v, i):  # part i's columns of a [N, C] array, shaped to broadcast against the part
        return v[:, offsets[i] : offsets[i + 1]].reshape(column)

    if fast_variance:
        var = jnp.maximum(group_mean(channel_sums(lambda p, i: p * p)) - mean * mean, 0.0)
    else:
        var = group_mean(channel_sums(lambda p, i: jnp.square(p - sliced(mean, i))))
    mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var + epsilon)
    shift = bias.astype(jnp.float32) - mean * mul
    # The activation's 1 as a per-(example, channel) array computed at run time, not a constant: XLA:CPU
    # materializes a full-size broadcast of every scalar constant a YNN fusion reads (64 MiB at 64x64x64
    # x 16 in float32, rewritten on each call and read by every fusion that uses it).
    one = mul * 0.0 + 1.0
    out = []
    for i, p in enumerate(xf):
        y = p * sliced(mul, i) + sliced(shift, i)
        if silu:
            y = _silu(y, sliced(one, i))
        out.append(y.astype(parts[i].dtype if dtype is None else dtype))
    return tuple(out) if isinstance(x, (tuple, list)) else out[0]


class GroupNorm(nn.Module):
    """nn.GroupNorm's parameters ("scale", "bias") and numerics, statistics computed as `group_norm` does."""

    num_groups: int = 32
    epsilon: float = 1e-6
    use_fast_variance: bool = True
    dtype: Any = None
    silu: bool = False  # apply SiLU to the result (fused the way `group_norm` explains)

    @nn.compact
    def __call__(self, x):
        """x [N, ..., C], or a tuple of channel parts (normalized as their concatenation, returned as parts)."""
        parts = as_parts(x)
        c = sum(p.shape[-1] for p in parts)
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        norm = functools.partial(
            group_norm,
            num_groups=self.num_groups,
            epsilon=self.epsilon,
            fast_variance=self.use_fast_variance,
            dtype=self.dtype,
            silu=self.silu,
        )
        if not isinstance(x, (tuple, list)):
            return norm(x, scale, bias)
        offsets = np.cumsum([p.shape[-1] for p in parts])[:-1].tolist()

        def plain(parts, scale, bias):  # the concatenation normalized, handed back as the same parts
            return tuple(jnp.split(norm(concatenated(parts), scale, bias), offsets, axis=-1))

        return on_cpu(functools.partial(_group_norm_of_parts, norm=norm), plain, parts, scale, bias)


def _group_norm_of_parts(parts, scale, bias, norm):
    """The CPU form of a GroupNorm of channel parts: part by part, the concatenation never built."""
    return norm(tuple(parts), scale, bias)


def add_bias(y, bias):
    """y + bias, bias broadcast against y (a layer's bias, a per-example time embedding), in y's dtype.

    Where y is in a low-precision compute dtype (bfloat16) the sum is taken in float32 and rounded once, so
    the gradient of the broadcast bias, a sum over every position (and example), accumulates in float32.
    flax's layers add the bias and sum its gradient in the compute dtype: on XLA:CPU the mid UNet's bias
    gradients then came out up to 16% off their float32 values (median 0.8%), against 3% for kernels; with
    this and the time embedding added the same way, every leaf is within 0.9% (biases median 0.24%). In
    float32 it is exactly y + bias."""
    if jnp.finfo(y.dtype).bits >= 32:
        return y + bias.astype(y.dtype)
    return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)


def _flat_init(init, n_in: int):
    """nn.DenseGeneral's kernel initialization: `init` on the kernel flattened to [inputs, outputs], reshaped."""

    def wrapped(rng, shape, dtype=jnp.float32):
        flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
        return jnp.reshape(init(rng, flat, dtype), shape)

    return wrapped


def _padding(padding):
    """nn.Conv's padding argument ("SAME", "VALID", an int, or (low, high) pairs) as lax takes it."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


# Winograd F(4, 3) in one dimension: four outputs of a 3-tap filter from a tile of six inputs with six
# products instead of twelve. _WINO_G transforms the filter (applied to the kernel, once per call, in float32);
# the input and output transforms (B^T and A^T of Lavin & Gray, arXiv:1509.09308) are written out as additions
# in `_winograd_input` / `_winograd_output`: XLA:CPU would hand each scalar constant of a multiplication to
# YNNPACK as a materialized activation-sized array (see `group_norm`).
_WINO_G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    np.float32,
)
WINOGRAD_TILE = 4  # outputs per tile along the width
# Layers with at least this many input and output channels run as `winograd_conv3x3` on the CPU. Measured on
# the 2-core Xeon (one core, GroupNorm-SiLU before and bias and residual after, as in a ResBlock; speed-up
# over XLA's convolution): batch 8, 128->128 at 32x32 and 16x16 1.31-1.32x, at 8x8 1.02x, 256->256 at 32x32
# 1.47x, 64->128 at 32x32 1.10x, but 64->64 and 128->64 at 64x64 0.89-0.91x (the transforms' passes over
# memory weigh more against fewer channels); batch 1-2, 320->320 at 64x64 1.39x, 128->128 and 256->256 at
# 128x128 1.15x / 1.30x, 128->128 at 256x256 0.95x. docs/PERFORMANCE.md has the whole-model numbers.
WINOGRAD_MIN_CHANNELS = 128


def _twice(a):
    return a + a


def _winograd_input(d):
    """B^T d for the six column slices d0..d5 of each tile, additions only: the six transformed inputs."""
    d0, d1, d2, d3, d4, d5 = d
    a, b = d4 - d2, d3 - d1
    c, e = d4 - _twice(_twice(d2)), d3 - _twice(_twice(d1))
    return (
        _twice(_twice(d0 - d2)) + a,  # 4 d0 - 5 d2 + d4
        c + e,  # -4 d1 - 4 d2 + d3 + d4
        c - e,  # 4 d1 - 4 d2 - d3 + d4
        a + _twice(b),  # -2 d1 - d2 + 2 d3 + d4
        a - _twice(b),  # 2 d1 - d2 - 2 d3 + d4
        _twice(_twice(d1 - d3)) + (d5 - d3),  # 4 d1 - 5 d3 + d5
    )


def _winograd_output(m):
    """A^T m for the six products m0..m5: the tile's four outputs, additions only."""
    m0, m1, m2, m3, m4, m5 = m
    s12, d12, s34, d34 = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return (
        m0 + s12 + s34,
        d12 + _twice(d34),
        s12 + _twice(_twice(s34)),
        d12 + _twice(_twice(_twice(d34))) + m5,
    )


def winograd_conv3x3(x, kernel):
    """`winograd_forward`'s convolution with the gradients of XLA's: the same values up to float rounding.

    Differentiated as lax.conv_general_dilated is (jax's transposed convolutions), not through the Winograd
    steps: on the 2-core CPU the mid model's train step ran 1-2% slower with the transposed Winograd steps
    than with XLA's convolution gradients, and at the same speed with this split (alternating in one
    process)."""
    return _winograd_conv(as_parts(x), kernel)


def _direct_conv_of_parts(parts, kernel):
    out, start = None, 0
    for p in parts:
        k = kernel[:, :, start : start + p.shape[-1]]
        start += p.shape[-1]
        y = jax.lax.conv_general_dilated(p, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        out = y if out is None else out + y
    return out


@jax.custom_vjp
def _winograd_conv(parts, kernel):
    return winograd_forward(parts, kernel)


def _winograd_conv_fwd(parts, kernel):
    return winograd_forward(parts, kernel), (parts, kernel)


def _winograd_conv_bwd(saved, g):
    return jax.vjp(_direct_conv_of_parts, *saved)[1](g)


_winograd_conv.defvjp(_winograd_conv_fwd, _winograd_conv_bwd)


def winograd_forward(x, kernel):
    """The SAME, stride-1 3x3 convolution of x [N, H, W, C] (or a tuple of channel parts, as `Conv` takes
    them) with kernel [3, 3, C, F], W a multiple of WINOGRAD_TILE, in x's dtype, by Winograd's F(4, 3) along
    the width.

    Each row of four outputs reads a tile of six input columns; the tiles' transformed columns (six arrays
    [N, H, W / 4, C], additions of column slices) each go through a 3x1 convolution over the rows with the
    correspondingly transformed kernel, and the six results combine into the four output columns. 18 instead
    of 36 multiply-adds per output pixel, input and output channel, in contractions over 3C as deep as the
    3x3 convolution's 9C is. Equal to lax.conv_general_dilated up to float rounding (relative error a few
    1e-6 in float32: the transforms' coefficients reach 8 and 1/24); jax differentiates it through the
    transposed steps (`winograd_conv3x3` takes XLA's convolution gradients instead)."""
    parts = as_parts(x)
    n, h, w, _ = parts[0].shape
    if kernel.shape[:2] != (3, 3) or w % WINOGRAD_TILE:
        raise ValueError(
            f"winograd_conv3x3 needs a 3x3 kernel and a width divisible by {WINOGRAD_TILE}, "
            f"got kernel {kernel.shape[:2]} and width {w}"
        )
    tiles = w // WINOGRAD_TILE
    # The filter transformed along its columns: [6, 3 (rows), C, F] as six 3x1 kernels.
    g = jnp.einsum("mk,ikcf->micf", _WINO_G, kernel.astype(jnp.float32)).astype(parts[0].dtype)
    products, start = None, 0
    for p in parts:
        c = p.shape[-1]
        # Columns padded by one on the left (SAME) and to whole tiles on the right, then split into tiles of
        # four: tile j's six input columns are its own four and the next tile's first two.
        cols = jnp.pad(p, ((0, 0), (0, 0), (1, (tiles + 1) * WINOGRAD_TILE - w - 1), (0, 0)))
        cols = cols.reshape(n, h, tiles + 1, WINOGRAD_TILE, c)
        d = [cols[:, :, :tiles, k] for k in range(WINOGRAD_TILE)] + [cols[:, :, 1:, k] for k in range(2)]
        m = [
            jax.lax.conv_general_dilated(
                t,
                g[i, :, None, start : start + c],
                (1, 1),
                ((1, 1), (0, 0)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            for i, t in enumerate(_winograd_input(d))
        ]
        products = m if products is None else [a + b for a, b in zip(products, m, strict=True)]
        start += c
    # Output column 4j + k is the tile's k-th output: [N, H, W / 4, 4, F] -> [N, H, W, F].
    return jnp.stack(_winograd_output(products), axis=3).reshape(n, h, w, kernel.shape[-1])


def winograd_applies(kernel_size, strides, padding, width: int) -> bool:
    """Whether `winograd_conv3x3` can compute this convolution: SAME, stride 1, 3x3, width a multiple of 4."""
    return (
        tuple(kernel_size) == (3, 3)
        and tuple(strides) == (1, 1)
        and isinstance(padding, (str, int, tuple))
        and padding in ("SAME", 1, ((1, 1), (1, 1)))
        and width % WINOGRAD_TILE == 0
    )


def use_winograd(dtype, in_channels: int, features: int, width: int, kernel_size, strides, padding) -> bool:
    """Whether `Conv`'s CPU form of this convolution is `winograd_conv3x3` by default: in float32, a
    convolution `winograd_applies` to with at least WINOGRAD_MIN_CHANNELS channels in and out, unless
    $SEMFLOW_WINOGRAD is 0 (read when the layer is traced). Other platforms never run it (`on_cpu`).

    Measured in the whole mid model (its sampler about 10% faster with the CPU split into two devices and
    on one device alike). A lone 128-channel layer on one device spanning both cores gains nothing (XLA's
    3x3 convolution splits over the threads better than the six small 3x1 ones: 0.92-1.00x); the rule
    follows the whole model, where users feel it (docs/PERFORMANCE.md)."""
    from semflow_jax import xla_options

    return (
        jnp.dtype(dtype) == jnp.float32
        and min(in_channels, features) >= WINOGRAD_MIN_CHANNELS
        and winograd_applies(kernel_size, strides, padding, width)
        and not xla_options.switched_off(os.environ, "SEMFLOW_WINOGRAD")
    )


# bfloat16 convolutions on a CPU with AMX (`dots_reach_amx`) run as `amx_conv`. Its forward pass is products
# (`_conv_as_dots`) where input and output both have at least DOTS_FORWARD_MIN_CHANNELS channels, XLA's
# convolution otherwise. Measured on one core of a Xeon with AMX, batch 8, forward: 128->128 at 32x32 and 16x16
# 2.2-2.4x faster as products, 64->64 at 64x64 the same, 128->64 there 1.25x slower (few channels to contract
# or to give, and large float32 partial sums). Its backward pass is always products: XLA:CPU's bfloat16
# convolution gradients are slow (one core, forward + backward: 128->128 at 32x32 94 ms as convolutions, 17
# with the products' backward; 64->64 at 64x64 80 -> 26, though 0.82x on one device with both cores in
# benchmarks/layers.py, and the mid model's train step the same with or without it for its 64-channel layers).
# Layers giving fewer than AMX_CONV_MIN_FEATURES channels (the UNet's 3-channel output) keep the convolution:
# products that give a few channels are slow. In float32 XLA's convolutions are as fast as the products or
# faster, both ways.
DOTS_FORWARD_MIN_CHANNELS = 128
AMX_CONV_MIN_FEATURES = 16


def dots_reach_amx() -> bool:
    """Whether bfloat16 products with float32 results run on AMX in a CPU program here: XLA's YNNPACK dot
    fusion is on (`xla_options` turns it on where the CPU has AMX). There they run at 620-670 GFLOP/s per core
    against 130-160 for XLA:CPU's bfloat16 convolutions and bfloat16-result dots. Programs for other
    platforms never run `amx_conv` (`on_cpu`)."""
    from semflow_jax import xla_options

    return "individual_dot" in xla_options.ynn_fusions()


def _shift_columns(y, s: int, width: int):
    """z [N, H, width, F] with z[:, :, v] = y[:, :, v + s] where 0 <= v + s < y's width, else 0."""
    lo, hi = max(0, -s), min(width, y.shape[2] - s)
    if hi <= lo:
        return jnp.zeros((*y.shape[:2], width, y.shape[3]), y.dtype)
    return jnp.pad(y[:, :, lo + s : hi + s], ((0, 0), (0, 0), (lo, width - hi), (0, 0)))


def _conv_as_dots(x, kernel, padding):
    """The stride-1 convolution of x [N, H, W, C] with kernel [kh, kw, C, F] and padding ((top, bottom), (left,
    right)) as kh * kw products, float32 result.

    Padding x's rows makes each kernel row i a contiguous row range of it; for each kernel column j,
    y_j = Σ_i rows_i(x) @ kernel[i, j] is that column's contribution before its horizontal shift, and the
    output is Σ_j y_j shifted by j - left columns. Only the float32 partial sums move sideways: no column-shifted copy
    of x is built (XLA:CPU builds those, and im2col's patches, at 1-3 GB/s)."""
    (top, bottom), (left, right) = padding
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1:3]
    out_h, out_w = h + top + bottom - kh + 1, w + left + right - kw + 1
    xh = jnp.pad(x, ((0, 0), (top, bottom), (0, 0), (0, 0)))
    dims = (((3,), (0,)), ((), ()))
    rows = [xh[:, i : i + out_h] for i in range(kh)]
    out = None
    for j in range(kw):
        y = sum(
            jax.lax.dot_general(rows[i], kernel[i, j], dims, preferred_element_type=jnp.float32)
            for i in range(kh)
        )
        y = _shift_columns(y, j - left, out_w)
        out = y if out is None else out + y
    return out


def _conv_f32(x, kernel, padding, as_dots: bool):
    """The stride-1 convolution, float32 result: as products, or as XLA's convolution."""
    if as_dots:
        return _conv_as_dots(x, kernel, padding)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def amx_conv(x, kernel, padding, dots_forward: bool):
    """Stride-1 convolution, NHWC / HWIO, explicit padding ((top, bottom), (left, right)) with each side at
    most the kernel's extent - 1, float32 result: forward as products if dots_forward, else XLA's
    convolution; backward always as products taking x's dtype in and giving float32 out.

    Equal to lax.conv_general_dilated(..., preferred_element_type=float32) and its gradients up to float
    rounding: the output gradient is rounded to x's dtype before the backward products, and the gradients are
    returned in x's and kernel's dtypes. The backward pass is written out because
    jax's transpose of a float32-result product would cast bfloat16 operands to float32, off AMX: the input
    gradient is the convolution of the output gradient with the flipped, transposed kernel (padding
    extent - 1 - p per side); the kernel gradient is kh * kw products of x's row ranges with the column-shifted
    output gradient, contracted over examples and positions."""
    return _conv_f32(x, kernel, padding, dots_forward)


def _amx_conv_fwd(x, kernel, padding, dots_forward):
    return _conv_f32(x, kernel, padding, dots_forward), (x, kernel)


def _amx_conv_bwd(padding, dots_forward, saved, g):
    x, kernel = saved
    (top, bottom), (left, right) = padding
    kh, kw = kernel.shape[:2]
    flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
    back = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
    dx = _conv_as_dots(g.astype(x.dtype), flipped, back).astype(x.dtype)
    xh = jnp.pad(x, ((0, 0), (top, bottom), (0, 0), (0, 0)))
    # Column j's partial sum at position c reaches the output at c - (j - left): its gradient is g shifted back.
    shifted = [_shift_columns(g, left - j, x.shape[2]).astype(x.dtype) for j in range(kw)]
    dims = (((0, 1, 2), (0, 1, 2)), ((), ()))
    rows = [xh[:, i : i + g.shape[1]] for i in range(kh)]
    dk = jnp.stack(
        [
            jnp.stack([jax.lax.dot_general(r, s, dims, preferred_element_type=jnp.float32) for s in shifted])
            for r in rows
        ]
    )
    return dx, dk.astype(kernel.dtype)


amx_conv.defvjp(_amx_conv_fwd, _amx_conv_bwd)


def _amx_padding(padding, kernel_size):
    """nn.Conv's padding as explicit ((top, bottom), (left, right)) pairs that amx_conv takes, or None."""
    if padding == "SAME":
        pairs = tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_size)
    elif padding == "VALID":
        pairs = ((0, 0), (0, 0))
    else:
        pairs = _padding(padding)
    if len(pairs) != 2 or not all(
        0 <= p <= k - 1 for (lo, hi), k in zip(pairs, kernel_size, strict=True) for p in (lo, hi)
    ):
        return None
    return tuple(tuple(p) for p in pairs)


def _use_amx_conv(dtype, features: int) -> bool:
    """Whether a convolution computed in `dtype` giving `features` channels runs as amx_conv."""
    return jnp.dtype(dtype) == jnp.bfloat16 and features >= AMX_CONV_MIN_FEATURES and dots_reach_amx()


class Conv(nn.Module):
    """nn.Conv (NHWC, 2-D) with its parameters ("kernel" [kh, kw, C, F], "bias" [F]) and initial values, the
    bias added as `add_bias` does (in float32 where computing in bfloat16).

    x may also be a tuple of channel parts: the result is the convolution of their concatenation. On the CPU
    it is computed as one convolution per part with that part's rows of the kernel, summed, so the
    concatenation is never written (in the UNet's decoder every ResBlock starts from [h, skip]; on XLA:CPU
    building that array costs more than the second convolution's overhead, benchmarks/README.md); there too
    wide float32 layers run as `winograd_conv3x3` and bfloat16 ones as `amx_conv` where products reach AMX.
    Every other platform convolves the concatenation with XLA's convolution (`on_cpu`).
    """

    features: int
    kernel_size: tuple = (3, 3)
    strides: tuple = (1, 1)
    padding: Any = "SAME"
    use_bias: bool = True
    dtype: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    # None: `use_winograd` decides (float32, wide layers; CPU only); True / False: on the CPU always / never
    # compute it as `winograd_conv3x3`.
    winograd: Any = None

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
        strides, padding, width = tuple(self.strides), self.padding, parts[0].shape[2]

        def convolve(p, k, acc=None):
            return jax.lax.conv_general_dilated(
                p, k, strides, _padding(padding), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                preferred_element_type=acc,
            )  # fmt: skip

        def plain(parts, kernel, bias):
            return _biased(convolve(concatenated(parts).astype(dtype), kernel.astype(dtype)), bias, dtype)

        winograd = self.winograd
        if winograd is None:
            winograd = use_winograd(dtype, c, self.features, width, self.kernel_size, strides, padding)
        elif winograd and not winograd_applies(self.kernel_size, strides, padding, width):
            raise ValueError(
                f"Conv(winograd=True) needs a SAME, stride-1 3x3 convolution of a width divisible by "
                f"{WINOGRAD_TILE}; got kernel {tuple(self.kernel_size)}, strides {strides}, "
                f"padding {padding!r}, width {width}"
            )
        pads = _amx_padding(padding, tuple(self.kernel_size))
        if winograd:
            cpu = functools.partial(_winograd_layer, dtype=dtype)
        elif strides == (1, 1) and pads is not None and _use_amx_conv(dtype, self.features):

            def amx_product(p, k, acc):  # float32 out; _sum_of_parts adds the bias and rounds once
                return amx_conv(p, k, pads, min(p.shape[-1], self.features) >= DOTS_FORWARD_MIN_CHANNELS)

            cpu = functools.partial(_sum_of_parts, product=amx_product, dtype=dtype)
        elif len(parts) > 1:
            cpu = functools.partial(_sum_of_parts, product=convolve, dtype=dtype)
        else:
            cpu = None
        return on_cpu(cpu, plain, parts, kernel, bias)


class Dense(nn.Module):
    """nn.Dense, or nn.DenseGeneral over x's last `axes` axes with features a tuple, with their parameters and
    initial values, the bias added as `add_bias` does. x may be a tuple of channel parts (axes=1), as in
    `Conv`: the UNet decoder's 1x1 skip projection of [h, skip], one product per part on the CPU."""

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
            return _biased(product(concatenated(parts).astype(dtype), kernel.astype(dtype)), bias, dtype)

        cpu = None
        if len(parts) > 1:
            cpu = functools.partial(_sum_of_parts, product=product, dtype=dtype, in_axis=n - 1)
        return on_cpu(cpu, plain, parts, kernel, bias)


def _biased(out, bias, dtype):
    """out + bias (added as `add_bias` does) where there is one, in dtype."""
    return (out if bias is None else add_bias(out, bias)).astype(dtype)


def _winograd_layer(parts, kernel, bias, dtype):
    """A Conv layer's CPU form as `winograd_conv3x3`, bias added, in dtype."""
    out = winograd_conv3x3(tuple(p.astype(dtype) for p in parts), kernel.astype(dtype))
    return _biased(out, bias, dtype)


def _sum_of_parts(parts, kernel, bias, product, dtype, in_axis=-2):
    """Σ_i product(part_i, the kernel's rows for part i) (+ bias), in dtype: the CPU form of Conv and Dense
    of channel parts (and of their `amx_conv` products). The kernel's `in_axis` holds the input channels."""
    # Several parts accumulate in float32 and round once, as one product over the concatenation does. The
    # price, in bfloat16 only: jax's transpose of a float32-result product casts the weights to float32, so
    # these backward products run in float32. One part is the plain product.
    acc = jnp.float32 if len(parts) > 1 else None
    out, start = None, 0
    for p in parts:
        k = jax.lax.slice_in_dim(kernel, start, start + p.shape[-1], axis=in_axis % kernel.ndim).astype(dtype)
        start += p.shape[-1]
        y = product(p.astype(dtype), k, acc)
        out = y if out is None else out + y
    return _biased(out, bias, dtype)


# The CPU forms behind `on_cpu`: a program compiled for any other platform holds no operation made by these
# (tests/test_tpu.py reads the compiled program's source frames).
CPU_FORMS = (
    "winograd_forward",
    "_winograd_layer",
    "_conv_as_dots",
    "_amx_conv_bwd",
    "amx_product",
    "parity_amx",
    "_sum_of_parts",
    "_group_norm_of_parts",
)
