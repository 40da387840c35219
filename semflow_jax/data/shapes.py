"""`shapes`: the embedded dataset, procedural scenes made on the fly from (seed, split, index), no files.

Every example is a textured background with 1-4 overlapping objects of four classes. Colour alone does not
give a pixel's class away: disks and rings draw their colours and textures from one shared distribution and
differ only in shape (a ring has a hole), so a segmenter must look at the outline. Triangles (striped,
green-cyan) and squares (speckled, blue-violet) have their own distributions, each with real spread in hue,
brightness and texture.
Labels are exact: a pixel's label is the class of the top-most object covering its centre.
"""

from __future__ import annotations

import numpy as np

# The order fixes each class's anchor. With the shapes config's anchors (k = 2, s = 255: black, blue, green,
# cyan, red for ids 0-4) every class is painted near its own typical colour (squares are blue-violet,
# triangles green, disks warm), so the straight paths of different classes do not cross in colour space;
# where they cross, a rectified flow can only average, and many-step integration drifts between classes.
CLASS_NAMES = ("background", "square", "triangle", "ring", "disk")
NUM_CLASSES = len(CLASS_NAMES)
# Display colours for pictures of label maps (not the flow's anchors, which are in semflow_jax.flow).
PALETTE = np.array(
    [[40, 40, 40], [90, 110, 240], [60, 200, 120], [250, 190, 40], [230, 80, 60]], dtype=np.uint8
)
# Disjoint index spaces: split ids go into the RNG seed, so train and validation never share a scene.
SPLITS = {"train": 0, "validation": 1}


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB, all in [0, 1]."""
    i = np.floor(h * 6.0) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, u = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = [(v, u, p), (q, v, p), (p, v, u), (p, q, v), (u, p, v), (v, p, q)]
    rgb = np.zeros(np.broadcast(h, s, v).shape + (3,), np.float64)
    for k, (r, g, b) in enumerate(table):
        sel = i == k
        rgb[sel] = np.stack(np.broadcast_arrays(r, g, b), -1)[sel]
    return rgb


def _warm_texture(rng, yy, xx, size):
    """Shared by disks and rings: orange-red hues, a soft directional gradient and fine grain."""
    hue = rng.uniform(0.0, 0.12)
    sat = rng.uniform(0.55, 0.95)
    val = rng.uniform(0.6, 0.95)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size
    v = np.clip(val + 0.25 * ramp + rng.normal(0, 0.05, yy.shape), 0, 1)
    return _hsv_to_rgb(np.full(yy.shape, hue), np.full(yy.shape, sat), v)


def _striped_texture(rng, yy, xx, size):
    """Triangles: green-cyan hues with sinusoidal stripes of random orientation and period."""
    hue = rng.uniform(0.3, 0.5)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(3.0, 6.0) * size / 32
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
    v = np.clip(rng.uniform(0.45, 0.7) + 0.3 * stripes + rng.normal(0, 0.04, yy.shape), 0, 1)
    return _hsv_to_rgb(np.full(yy.shape, hue), np.full(yy.shape, rng.uniform(0.5, 0.9)), v)


def _speckled_texture(rng, yy, xx, size):
    """Squares: blue-violet hues with coarse speckle."""
    hue = rng.uniform(0.6, 0.78)
    v = np.clip(rng.uniform(0.55, 0.9) + rng.normal(0, 0.12, yy.shape), 0, 1)
    s = np.clip(rng.uniform(0.4, 0.8) + rng.normal(0, 0.08, yy.shape), 0, 1)
    return _hsv_to_rgb(np.full(yy.shape, hue), s, v)


def _background(rng, yy, xx, size):
    """Muted, low-saturation gradient between two random colours plus grain (any hue)."""
    c0 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.15, 0.45))
    c1 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.3), rng.uniform(0.15, 0.45))
    angle = rng.uniform(0, 2 * np.pi)
    w = np.clip(0.5 + (np.cos(angle) * (xx - size / 2) + np.sin(angle) * (yy - size / 2)) / size, 0, 1)
    rgb = c0 * (1 - w[..., None]) + c1 * w[..., None]
    return np.clip(rgb + rng.normal(0, 0.03, yy.shape + (3,)), 0, 1)


def _shape_mask(rng, cls, yy, xx, size):
    """Boolean [H, W] footprint of one object of class `cls` at a random place, size and rotation."""
    r = rng.uniform(0.17, 0.3) * size
    cy, cx = rng.uniform(r * 0.6, size - r * 0.6, size=2)
    dy, dx = yy - cy, xx - cx
    theta = rng.uniform(0, 2 * np.pi)
    ry = np.cos(theta) * dy - np.sin(theta) * dx
    rx = np.sin(theta) * dy + np.cos(theta) * dx
    if cls == 1:  # square, rotated, the area of a disk of radius r
        half = r * np.sqrt(np.pi) / 2
        return (np.abs(ry) <= half) & (np.abs(rx) <= half)
    if cls == 2:  # equilateral triangle, rotated; circumradius 1.5 r gives about a disk's area
        big = 1.5 * r
        inside = np.ones_like(yy, dtype=bool)
        for k in range(3):
            a = theta + 2 * np.pi * k / 3
            inside &= np.cos(a) * dx + np.sin(a) * dy <= big / 2
        return inside
    d2 = dy**2 + dx**2
    if cls == 3:  # ring: an annulus, its hole showing whatever lies beneath
        return (d2 <= r**2) & (d2 >= (r * rng.uniform(0.4, 0.6)) ** 2)
    return d2 <= r**2  # disk


_TEXTURES = {1: _speckled_texture, 2: _striped_texture, 3: _warm_texture, 4: _warm_texture}


def make_example(seed: int, split: str, index: int, size: int = 32) -> dict:
    """One scene: {"image": uint8 [size, size, 3], "label": uint8 [size, size]}, a pure function of its args."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    image = _background(rng, yy, xx, size)
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 5)):
        cls = int(rng.integers(1, NUM_CLASSES))
        mask = _shape_mask(rng, cls, yy, xx, size)
        image[mask] = _TEXTURES[cls](rng, yy, xx, size)[mask]
        label[mask] = cls
    return {"image": np.round(image * 255).astype(np.uint8), "label": label}


class ShapesSource:
    """A grain random-access source of `num_examples` scenes of one split (len + getitem, picklable)."""

    def __init__(self, seed: int, split: str, num_examples: int, size: int):
        if split not in SPLITS:
            raise ValueError(f"shapes has splits {sorted(SPLITS)}, not {split!r}")
        self.seed, self.split, self.num_examples, self.size = seed, split, num_examples, size

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        return make_example(self.seed, self.split, int(index), self.size)

    def __repr__(self) -> str:
        return (
            f"ShapesSource(seed={self.seed}, split={self.split!r}, n={self.num_examples}, size={self.size})"
        )
