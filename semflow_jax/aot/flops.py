"""The multiply-adds of one convolution, counted the same way from a jaxpr and from compiled HLO.

A product counts once per (output value, kernel tap) pair whose tap lands on a real input element: taps on
padding and on the holes of an input dilation do no work. The rule matters for what XLA writes: a
transposed convolution is an input-dilated one, and the TPU compiler expresses batched matrix products as
convolutions whose batch dimensions are spatial ones, dilated by their own size, so that each output sees
exactly one tap (counting the whole window would count attention's products 64 times over). Taps on a
convolution's own zero padding are left out too, which makes the count a few percent under the
full-window convention at the image borders, in both counters alike.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4096)
def window_taps(
    size: int,
    window: int,
    outputs: int,
    stride: int = 1,
    pad_lo: int = 0,
    lhs_dilate: int = 1,
    rhs_dilate: int = 1,
) -> int:
    """How many (output position, window tap) pairs of one spatial dimension land on a real input element."""
    taps = np.arange(window, dtype=np.int64)[None, :] * rhs_dilate - pad_lo
    rows = max(1, 2**22 // max(window, 1))  # output positions per block: bounded memory for long windows
    total = 0
    for first in range(0, outputs, rows):
        p = np.arange(first, min(outputs, first + rows), dtype=np.int64)[:, None] * stride + taps
        total += int(((p >= 0) & (p <= (size - 1) * lhs_dilate) & (p % lhs_dilate == 0)).sum())
    return total


def conv_flops(out_elements: int, in_features: int, dims: list[tuple]) -> float:
    """2 x multiply-adds of a convolution with `out_elements` outputs, `in_features` input features per
    output (per feature group) and, per spatial dimension, (input size, window, outputs, stride, low
    padding, input dilation, window dilation)."""
    per_output = 1.0
    for size, window, outputs, *rest in dims:
        if outputs:
            per_output *= window_taps(size, window, outputs, *rest) / outputs
    return 2.0 * out_elements * in_features * per_output
