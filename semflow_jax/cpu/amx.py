"""`amx_conv`: a bfloat16 stride-1 convolution as products with float32 results, which XLA:CPU runs on AMX.

XLA:CPU's bfloat16 convolutions have no AMX path and their gradients are slow, while YNNPACK's bfloat16 dots
with float32 results run on AMX where the CPU has it and the dot fusion is on (cpu/xla_options.py turns it on
there). The backward pass is always products; the forward pass is products for wide layers. cpu/kernels.py
runs it, on the CPU only, in bfloat16 where `dots_reach_amx()`. Why these thresholds: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from semflow_jax.ops import conv_padding

# The forward pass runs as products (`_conv_as_dots`) where input and output both have at least this many
# channels, as XLA's convolution otherwise; layers giving fewer than AMX_CONV_MIN_FEATURES channels (the
# UNet's 3-channel output) keep XLA's convolution both ways: products that give a few channels are slow.
DOTS_FORWARD_MIN_CHANNELS = 128


AMX_CONV_MIN_FEATURES = 16


def dots_reach_amx() -> bool:
    """Whether bfloat16 products with float32 results run on AMX in a CPU program here: $XLA_FLAGS asks for
    XLA's YNNPACK dot fusion (`tuning.tune()` does where the CPU has AMX)."""
    from semflow_jax.cpu import xla_options

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
    output is Σ_j y_j shifted by j - left columns. Only the float32 partial sums move sideways: no
    column-shifted copy of x is built (XLA:CPU builds those, and im2col's patches, slowly)."""
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


def amx_padding(padding, kernel_size):
    """nn.Conv's padding as explicit ((top, bottom), (left, right)) pairs that amx_conv takes, or None."""
    if padding == "SAME":
        pairs = tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_size)
    elif padding == "VALID":
        pairs = ((0, 0), (0, 0))
    else:
        pairs = conv_padding(padding)
    if len(pairs) != 2 or not all(
        0 <= p <= k - 1 for (lo, hi), k in zip(pairs, kernel_size, strict=True) for p in (lo, hi)
    ):
        return None
    return tuple(tuple(p) for p in pairs)


def use_amx_conv(dtype, features: int) -> bool:
    """Whether a convolution computed in `dtype` giving `features` channels runs as amx_conv."""
    return jnp.dtype(dtype) == jnp.bfloat16 and features >= AMX_CONV_MIN_FEATURES and dots_reach_amx()
