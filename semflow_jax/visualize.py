"""Pictures: colourized label maps, labelled grids of image rows, written as PNG atomically."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from semflow_jax.errors import atomic_write_bytes
from semflow_jax.flow import IGNORE_LABEL


def colorize(labels, palette) -> np.ndarray:
    """int labels [..., H, W] -> uint8 [..., H, W, 3] in the dataset's palette; ignore pixels white."""
    labels = np.asarray(labels)
    palette = np.asarray(palette, np.uint8)
    out = palette[np.where(labels == IGNORE_LABEL, 0, labels) % len(palette)]
    out[labels == IGNORE_LABEL] = 255
    return out


def grid(rows, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tiles rows (lists of uint8 [H, W, 3] pictures of one size) into one picture with white gutters."""
    h, w = np.asarray(rows[0][0]).shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, pic in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = np.asarray(pic, np.uint8)
    if scale > 1:
        out = np.repeat(np.repeat(out, scale, axis=0), scale, axis=1)
    return out


def save_png(path: str, picture) -> None:
    """Writes uint8 [H, W, 3] (or [H, W]) as PNG; never leaves a half-written file."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(picture, np.uint8)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
