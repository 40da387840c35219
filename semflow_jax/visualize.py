"""Pictures: colourized label maps, overlays, grids of image rows, ODE trajectories as GIFs; PNGs written
atomically."""

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
    atomic_write_bytes(path, png_bytes(picture))


def png_bytes(picture) -> bytes:
    """uint8 [H, W, 3] or [H, W] as the bytes of a PNG file."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(picture, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def overlay(image, colors, alpha: float = 0.5) -> np.ndarray:
    """A colourized label map [H, W, 3] blended over its uint8 image [H, W, 3] with weight alpha."""
    mixed = (1.0 - alpha) * np.asarray(image, np.float32) + alpha * np.asarray(colors, np.float32)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def upscale(pictures, min_side: int = 128) -> np.ndarray:
    """Pictures [..., H, W, C] repeated (nearest neighbour) by a whole factor until the short side is at
    least min_side: small scenes stay crisp where a viewer would blur them."""
    pictures = np.asarray(pictures)
    h, w = pictures.shape[-3:-1]
    k = max(1, -(-min_side // min(h, w)))
    return np.repeat(np.repeat(pictures, k, axis=-3), k, axis=-2) if k > 1 else pictures


def with_time_bar(frames, times) -> np.ndarray:
    """Frames [T, H, W, 3] with a strip below each whose dark part is that frame's t in [0, 1] (the flow's
    time: 0 image, 1 mask), so a trajectory shows where on the path each frame lies."""
    frames = np.asarray(frames, np.uint8)
    t_count, h, w, _ = frames.shape
    bar_h = max(3, h // 24)
    bars = np.full((t_count, bar_h, w, 3), 230, np.uint8)
    for i, t in enumerate(times):
        bars[i, 1:-1, : int(round(float(t) * w))] = 60
    return np.concatenate([frames, bars], axis=1)


def gif_bytes(frames, seconds: float = 2.5, hold_last: float = 1.0) -> bytes:
    """uint8 frames [T, H, W, 3] as a looping animated GIF of about `seconds`, the last frame held longer."""
    frames = np.asarray(frames, np.uint8)
    step_ms = max(20, int(1000 * seconds / len(frames)))
    durations = [step_ms] * (len(frames) - 1) + [step_ms + int(1000 * hold_last)]
    pictures = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    pictures[0].save(
        buf, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0, disposal=1
    )
    return buf.getvalue()
