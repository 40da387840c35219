"""Array helpers the layers (models/layers.py) and their CPU forms (cpu/kernels.py) share."""

from __future__ import annotations

import jax.numpy as jnp


def as_parts(x) -> tuple:
    """x as a tuple of channel parts: a tuple or list as it is, one array as a 1-tuple."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def concatenated(parts):
    """The channel concatenation of a tuple of parts (the array itself for one part)."""
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def add_bias(y, bias):
    """y + bias, bias broadcast against y (a layer's bias, a per-example time embedding), in y's dtype.

    Where y is in a low-precision compute dtype (bfloat16) the sum is taken in float32 and rounded once, so
    the gradient of the broadcast bias, a sum over every position and example, accumulates in float32
    (flax's layers sum it in the compute dtype, which leaves bfloat16 bias gradients far off their float32
    values). In float32 it is exactly y + bias."""
    if jnp.finfo(y.dtype).bits >= 32:
        return y + bias.astype(y.dtype)
    return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)


def biased(out, bias, dtype):
    """out + bias (added as `add_bias` does) where there is one, in dtype."""
    return (out if bias is None else add_bias(out, bias)).astype(dtype)


def conv_padding(padding):
    """nn.Conv's padding argument ("SAME", "VALID", an int, or (low, high) pairs) as lax takes it."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
