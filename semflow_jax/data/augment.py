"""Augmentations applied identically to an image and its mask; the mask only ever nearest-neighbour resampled.

Images are resized with antialiased bilinear filtering, masks with NEAREST, so every mask pixel keeps a
class id that was in the original mask (never an average of two ids, never a made-up id).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize(image: np.ndarray, label: np.ndarray, height: int, width: int):
    """(image, label) resized to [height, width]: bilinear image, nearest-neighbour mask."""
    if image.shape[:2] == (height, width) and label.shape == (height, width):
        return image, label
    img = Image.fromarray(image).resize((width, height), Image.BILINEAR)
    lab = Image.fromarray(label).resize((width, height), Image.NEAREST)
    return np.asarray(img), np.asarray(lab)


def random_crop(image, label, height: int, width: int, rng: np.random.Generator):
    """A random [height, width] window of both (which must be at least that large)."""
    h, w = label.shape
    top = int(rng.integers(0, h - height + 1))
    left = int(rng.integers(0, w - width + 1))
    return image[top : top + height, left : left + width], label[top : top + height, left : left + width]


def hflip(image, label):
    """Both mirrored left to right."""
    return image[:, ::-1], label[:, ::-1]


def train_augment(example: dict, height: int, width: int, rng: np.random.Generator) -> dict:
    """Random crop of the largest window with the output's aspect ratio, resized to [height, width], and a
    horizontal flip with probability 1/2 (the paper's "random square crop + resize" for square outputs)."""
    image, label = example["image"], example["label"]
    h, w = label.shape
    scale = min(h / height, w / width)  # the largest height:width window that fits
    ch, cw = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
    image, label = random_crop(image, label, min(ch, h), min(cw, w), rng)
    image, label = resize(image, label, height, width)
    if rng.random() < 0.5:
        image, label = hflip(image, label)
    return {**example, "image": np.ascontiguousarray(image), "label": np.ascontiguousarray(label)}


def eval_resize(example: dict, height: int, width: int) -> dict:
    """The evaluation transform: resize to [height, width], nothing random."""
    image, label = resize(example["image"], example["label"], height, width)
    return {**example, "image": image, "label": label}
