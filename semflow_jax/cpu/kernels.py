"""The CPU forms of the model layers, and the one door through which a layer takes them: `on_cpu`.

models/layers.py holds the layers in their plain form, the one that runs on TPU and GPU. On the CPU, XLA
compiles some of them faster written another way, with the same result up to float rounding:
- wide float32 3x3 convolutions as Winograd's F(4, 3) (cpu/winograd.py);
- bfloat16 convolutions as products with float32 results, which reach AMX (cpu/amx.py);
- a convolution or dense layer of a channel concatenation [h, skip] as one product per part, summed, so the
  concatenation is never written (the UNet decoder's ResBlocks), and the GroupNorm of such parts;
- GroupNorm's statistics per channel first, then per group, and its SiLU without scalar constants.

`on_cpu(cpu, plain, ...)` is a `jax.lax.platform_dependent` choice, made when a program is lowered for its
platform: a train step or sampler compiled for a TPU or GPU (ahead of time on a CPU host too) holds only the
plain form, which tests/test_tpu.py reads back from the compiled HLO (`CPU_FORMS`). The config key
`model.kernels` ("auto", the default, or "plain": the plain form on the CPU too) reaches the door through
`chosen_by`, which the models' top-level methods wear. tests/test_kernels.py checks each CPU form against the
plain one. Why each exists, with numbers: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from semflow_jax.cpu import amx, winograd
from semflow_jax.ops import as_parts, biased

CHOICES = ("auto", "plain")  # model.kernels: the CPU forms on the CPU, or the plain form everywhere
_CHOICE = contextvars.ContextVar("semflow_jax_kernels", default="auto")


@contextlib.contextmanager
def chosen(kernels: str):
    """Layers traced inside take their CPU forms on the CPU ("auto") or never ("plain")."""
    if kernels not in CHOICES:
        raise ValueError(f"model.kernels must be one of {CHOICES}, got {kernels!r}")
    token = _CHOICE.set(kernels)
    try:
        yield
    finally:
        _CHOICE.reset(token)


def chosen_by(method):
    """Decorates a model's method: its layers are traced under `chosen(self.kernels)`."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with chosen(self.kernels):
            return method(self, *args, **kwargs)

    return wrapped


def on_cpu(cpu, plain, *args):
    """cpu(*args) in a program compiled for the CPU, plain(*args) in one compiled for any other platform.

    The one door of the CPU forms. cpu=None, or model.kernels="plain" (`chosen`): plain everywhere."""
    if cpu is None or _CHOICE.get() == "plain":
        return plain(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=plain)


def conv_form(parts, features: int, kernel_size, strides, padding, dtype, convolve):
    """The CPU form of a Conv layer (a function of (parts, kernel, bias)), or None where it is the plain one:
    Winograd for wide float32 layers, `amx_conv` for bfloat16 where products reach AMX, else one `convolve`
    per channel part where there are several."""
    c, width = sum(p.shape[-1] for p in parts), parts[0].shape[2]
    pads = amx.amx_padding(padding, kernel_size)
    if winograd.use_winograd(dtype, c, features, width, kernel_size, strides, padding):
        return functools.partial(_winograd_layer, dtype=dtype)
    if strides == (1, 1) and pads is not None and amx.use_amx_conv(dtype, features):

        def amx_product(p, k, acc):  # float32 out; _sum_of_parts adds the bias and rounds once
            return amx.amx_conv(p, k, pads, min(p.shape[-1], features) >= amx.DOTS_FORWARD_MIN_CHANNELS)

        return functools.partial(_sum_of_parts, product=amx_product, dtype=dtype)
    if len(parts) > 1:
        return functools.partial(_sum_of_parts, product=convolve, dtype=dtype)
    return None


def dense_form(parts, product, dtype, in_axis: int):
    """The CPU form of a Dense layer of several channel parts (one product per part), or None for one part."""
    if len(parts) > 1:
        return functools.partial(_sum_of_parts, product=product, dtype=dtype, in_axis=in_axis)
    return None


def upsample_form(dtype, channels: int, features: int, upsampled):
    """The CPU form of layers.upsample_conv: its parities as `amx_conv` in bfloat16 where products reach AMX
    (None otherwise). `upsampled(parity)` builds the layer from one parity's convolution."""
    if not amx.use_amx_conv(dtype, features):
        return None

    def parity_amx(x, k, pads, bias):  # a float32 result: the bias is added before it is rounded
        y = amx.amx_conv(x, k, pads, min(channels, features) >= amx.DOTS_FORWARD_MIN_CHANNELS)
        return biased(y, bias, x.dtype)

    return upsampled(parity_amx)


def group_norm_form(norm_kwargs: dict):
    """The CPU form of a GroupNorm layer: `group_norm_by_channels` (a function of (parts, scale, bias))."""
    return functools.partial(_group_norm_of_parts, **norm_kwargs)


def _group_norm_of_parts(parts, scale, bias, **norm_kwargs):
    return group_norm_by_channels(tuple(parts), scale, bias, **norm_kwargs)


@jax.custom_jvp
def _silu(y, one):
    """silu(y) = y * sigmoid(y), with its 1 given as the runtime array `one` (see `group_norm_by_channels`)."""
    return y * (one / (one + jnp.exp(-y)))


@_silu.defjvp
def _silu_jvp(primals, tangents):
    # d/dy y*s(y) = s * (1 + y * (1 - s)); finite where exp(-y) overflows (s is then exactly 0). `one`'s
    # tangent is ignored: it is identically 1 (mul * 0 + 1), so its derivative is 0.
    y, one = primals
    sig = one / (one + jnp.exp(-y))
    return y * sig, tangents[0] * sig * (one + y * (one - sig))


def group_norm_by_channels(
    x, scale, bias, num_groups: int, epsilon: float, fast_variance: bool = True, dtype=None, silu=False
):
    """layers.group_norm's result computed the way XLA:CPU reduces fastest, for x [N, ..., C] or a tuple of
    channel parts [N, ..., C_i] (normalized as their concatenation, returned as the same parts, the
    concatenation never built).

    The statistics are summed per channel over space first (a reduction along the slow axis, contiguous in
    NHWC) and only then over each group's channels: summing over (space, channels-in-group) at once costs
    XLA:CPU up to four times more. The affine is folded into one multiply-add per (example, channel). The
    SiLU is written without scalar constants (`_silu`): XLA:CPU hands each scalar constant a YNN fusion
    reads to it as a materialized full-size array.
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
    # The activation's 1 as a per-(example, channel) array computed at run time, not a constant (see above).
    one = mul * 0.0 + 1.0
    out = []
    for i, p in enumerate(xf):
        y = p * sliced(mul, i) + sliced(shift, i)
        if silu:
            y = _silu(y, sliced(one, i))
        out.append(y.astype(parts[i].dtype if dtype is None else dtype))
    return tuple(out) if isinstance(x, (tuple, list)) else out[0]


def _winograd_layer(parts, kernel, bias, dtype):
    """A Conv layer's CPU form as `winograd_conv3x3`, bias added, in dtype."""
    out = winograd.winograd_conv3x3(tuple(p.astype(dtype) for p in parts), kernel.astype(dtype))
    return biased(out, bias, dtype)


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
    return biased(out, bias, dtype)


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
