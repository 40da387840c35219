"""Winograd's F(4, 3) along the width: a float32 3x3 convolution with half the multiply-adds, for the CPU.

Six 3x1 convolutions of transformed column tiles do the work of the 3x3 one, the transforms being additions
only (Lavin & Gray, arXiv:1509.09308). cpu/kernels.py runs it, on the CPU only, for float32 layers of at
least WINOGRAD_MIN_CHANNELS channels in and out; it equals lax.conv_general_dilated up to float rounding.
Why these thresholds: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from semflow_jax.ops import as_parts

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
# Layers with at least this many input and output channels run as `winograd_conv3x3` on the CPU.
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
    steps, which were slower in the train step (docs/PERFORMANCE.md)."""
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
    """Whether a layer's CPU form is `winograd_conv3x3`: in float32, a convolution `winograd_applies` to,
    with at least WINOGRAD_MIN_CHANNELS channels in and out (the rule follows the whole model's speed)."""
    return (
        jnp.dtype(dtype) == jnp.float32
        and min(in_channels, features) >= WINOGRAD_MIN_CHANNELS
        and winograd_applies(kernel_size, strides, padding, width)
    )
