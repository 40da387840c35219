"""Readers of the published datasets' on-disk layouts, and of a user's own folders, as random-access sources.

`list_examples(name, root, split)` finds every (image, mask) pair of a split in the layout the dataset is
published in and refuses a missing folder or an image without a mask, naming the file. `RawSource` decodes
one pair into {"image": uint8 [H, W, 3], "label": uint8 [H, W] train ids with 255 = ignore, "id": str,
"ok": bool}, mapping raw ids with the dataset's lookup table and checking sizes and class ids. With
skip_bad, a bad example is reported once and replaced by the next good one ("ok" is then False, so
evaluation never counts it).
"""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
from PIL import Image

from semflow_jax.data import classes
from semflow_jax.errors import SemFlowError

SPLITS = ("train", "validation", "test")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class Record:
    """One example on disk: its image, and its mask file (or CelebAMask's (class, part file) pairs)."""

    id: str
    image: str
    mask: str | tuple = ""


class BadExample(Exception):
    """An example that cannot be used as it is on disk; the message names the file."""


def _need_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise SemFlowError(f"folder {path} not found: is the dataset root right and the dataset unpacked?")
    return path


def _files(folder: str, exts) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(exts) and not f.startswith("."))


def _pairs(image_dir: str, mask_dir: str, mask_name) -> list[Record]:
    """Every image of image_dir with its mask mask_dir/mask_name(stem); an image without one is an error."""
    out = []
    for f in _files(_need_dir(image_dir), IMAGE_EXTS):
        stem = os.path.splitext(f)[0]
        mask = os.path.join(_need_dir(mask_dir), mask_name(stem))
        if not os.path.exists(mask):
            raise SemFlowError(f"image {os.path.join(image_dir, f)} has no mask (expected {mask})")
        out.append(Record(stem, os.path.join(image_dir, f), mask))
    return out


def _split_dir(split: str, names: dict) -> str:
    if split not in names:
        raise SemFlowError(f"split {split!r} is not available here (have {sorted(names)})")
    return names[split]


def list_coco_stuff(root: str, split: str) -> list[Record]:
    """COCO-Stuff-164k: {train2017,val2017}/*.jpg and stuffthingmaps_trainval2017/{...}/*.png."""
    s = _split_dir(split, {"train": "train2017", "validation": "val2017"})
    masks = os.path.join(root, "stuffthingmaps_trainval2017", s)
    return _pairs(os.path.join(root, s), masks, lambda stem: stem + ".png")


def list_cityscapes(root: str, split: str) -> list[Record]:
    """Cityscapes: leftImg8bit/{split}/{city}/*_leftImg8bit.png and gtFine/{split}/{city}/*_gtFine_labelIds.png."""
    s = _split_dir(split, {"train": "train", "validation": "val", "test": "test"})
    image_root = _need_dir(os.path.join(root, "leftImg8bit", s))
    _need_dir(os.path.join(root, "gtFine", s))
    out = []
    for city in sorted(os.listdir(image_root)):
        if not os.path.isdir(os.path.join(image_root, city)):
            continue
        for f in _files(os.path.join(image_root, city), (".png",)):
            if not f.endswith("_leftImg8bit.png"):
                continue
            prefix = f[: -len("_leftImg8bit.png")]
            mask = os.path.join(root, "gtFine", s, city, f"{prefix}_gtFine_labelIds.png")
            if not os.path.exists(mask):
                raise SemFlowError(f"image {os.path.join(image_root, city, f)} has no mask (expected {mask})")
            out.append(Record(prefix, os.path.join(image_root, city, f), mask))
    return out


def list_ade20k(root: str, split: str) -> list[Record]:
    """ADE20K SceneParsing: ADEChallengeData2016/{images,annotations}/{training,validation}/."""
    if os.path.isdir(os.path.join(root, "ADEChallengeData2016")):
        root = os.path.join(root, "ADEChallengeData2016")
    s = _split_dir(split, {"train": "training", "validation": "validation"})
    return _pairs(
        os.path.join(root, "images", s), os.path.join(root, "annotations", s), lambda stem: stem + ".png"
    )


# CelebA's official partition, by the index of the original CelebA image: train, val, test.
CELEBA_VAL_START, CELEBA_TEST_START = 162770, 182637


def list_celebamask(root: str, split: str) -> list[Record]:
    """CelebAMask-HQ: CelebA-HQ-img/{i}.jpg, parts CelebAMask-HQ-mask-anno/{i // 2000}/{i:05d}_{part}.png;
    the split is CelebA's official partition of the original image (CelebA-HQ-to-CelebA-mapping.txt)."""
    _split_dir(split, {"train": 0, "validation": 1, "test": 2})
    mapping = os.path.join(root, "CelebA-HQ-to-CelebA-mapping.txt")
    if not os.path.exists(mapping):
        raise SemFlowError(f"{mapping} not found: it assigns each image to CelebA's train/val/test split")
    image_dir = _need_dir(os.path.join(root, "CelebA-HQ-img"))
    anno_dir = _need_dir(os.path.join(root, "CelebAMask-HQ-mask-anno"))
    out = []
    with open(mapping) as f:
        for n, line in enumerate(f):
            fields = line.split()
            if n == 0 or not fields:
                continue  # header: idx orig_idx orig_file
            try:
                idx, orig = int(fields[0]), int(fields[1])
            except (ValueError, IndexError):
                raise SemFlowError(f"{mapping}, line {n + 1}: expected 'idx orig_idx orig_file'") from None
            which = (
                "train" if orig < CELEBA_VAL_START else "validation" if orig < CELEBA_TEST_START else "test"
            )
            if which != split:
                continue
            image = os.path.join(image_dir, f"{idx}.jpg")
            if not os.path.exists(image):
                raise SemFlowError(f"image {image} listed in {mapping} is missing")
            folder = os.path.join(anno_dir, str(idx // 2000))
            parts = tuple(
                (c + 1, os.path.join(folder, f"{idx:05d}_{part}.png"))
                for c, part in enumerate(classes.CELEBAMASK_PARTS)
            )
            if not any(os.path.exists(p) for _, p in parts):
                raise SemFlowError(f"image {image} has no mask (no {folder}/{idx:05d}_<part>.png)")
            out.append(Record(str(idx), image, parts))
    return out


def list_folder(root: str, split: str) -> list[Record]:
    """Your own data: ROOT/{train,val}/images/*.{png,jpg} with ROOT/{train,val}/masks/<same stem>.png."""
    s = _split_dir(split, {"train": "train", "validation": "val"})
    return _pairs(os.path.join(root, s, "images"), os.path.join(root, s, "masks"), lambda stem: stem + ".png")


LISTERS = {
    "coco_stuff": list_coco_stuff,
    "cityscapes": list_cityscapes,
    "ade20k": list_ade20k,
    "celebamask": list_celebamask,
    "folder": list_folder,
}
LUTS = {
    "coco_stuff": classes.COCO_LUT,
    "cityscapes": classes.CITYSCAPES_LUT,
    "ade20k": classes.ADE20K_LUT,
    "celebamask": None,  # merged from part files straight into train ids
    "folder": None,  # stored as train ids already
}


def list_examples(name: str, root: str, split: str) -> list[Record]:
    """Every example of `split` of dataset `name` under `root`, in a fixed (sorted) order."""
    if not root:
        raise SemFlowError(f"data.root must name the folder that holds {name}")
    records = LISTERS[name](_need_dir(root), split)
    if not records:
        raise SemFlowError(f"no {split} examples of {name} under {root}")
    return records


def _read(path: str, mode: str | None = None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode) if mode else im)
    except (OSError, ValueError, SyntaxError) as e:
        raise BadExample(
            f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def read_mask(record: Record, lut) -> np.ndarray:
    """The record's mask as uint8 train ids (255 ignore)."""
    if isinstance(record.mask, tuple):  # CelebAMask: paint the parts in order, later over earlier
        label = None
        for cls, path in record.mask:
            if not os.path.exists(path):
                continue
            part = _read(path, "L") > 127
            label = np.zeros(part.shape, np.uint8) if label is None else label
            if part.shape != label.shape:
                raise BadExample(f"mask {path} is {part.shape[1]}x{part.shape[0]}, the other parts differ")
            label[part] = cls
        return label
    raw = _read(record.mask)
    if raw.ndim != 2 or raw.dtype != np.uint8:
        raise BadExample(
            f"mask {record.mask} must be a single-channel 8-bit PNG of class ids, got {raw.dtype} {raw.shape}"
        )
    return lut[raw] if lut is not None else raw


def decode(record: Record, lut, num_classes: int, resize_image_to_mask: bool = False) -> dict:
    """One example from disk, checked: sizes agree, every id is < num_classes or 255."""
    image = _read(record.image, "RGB")
    label = read_mask(record, lut)
    mask_name = record.mask if isinstance(record.mask, str) else f"{record.id} parts"
    if image.shape[:2] != label.shape:
        if not resize_image_to_mask:
            raise BadExample(
                f"mask {mask_name} is {label.shape[1]}x{label.shape[0]} but image {record.image} is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        image = np.asarray(Image.fromarray(image).resize(label.shape[::-1], Image.BILINEAR))
    bad = (label >= num_classes) & (label != classes.IGNORE)
    if bad.any():
        raise BadExample(
            f"mask {mask_name} has class id {int(label[bad][0])}, at or above the {num_classes} classes"
        )
    return {"image": image, "label": label, "id": record.id}


class RawSource:
    """grain random-access source over records; decodes on access. With skip_bad, a bad example is replaced
    by the next good one and counted (`skipped`), and its file named once on stderr."""

    def __init__(self, name: str, records, num_classes: int, skip_bad: bool = False):
        self.name, self.records, self.num_classes, self.skip_bad = name, list(records), num_classes, skip_bad
        self.lut = LUTS[name]
        self.resize_image_to_mask = name == "celebamask"  # 1024^2 images, 512^2 masks, as published
        self._bad: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def skipped(self) -> int:
        """How many distinct bad examples were met (and replaced) so far in this process."""
        return len(self._bad)

    def __getitem__(self, index: int) -> dict:
        n = len(self.records)
        for k in range(n):
            i = (int(index) + k) % n
            try:
                example = decode(self.records[i], self.lut, self.num_classes, self.resize_image_to_mask)
            except BadExample as e:
                if not self.skip_bad:
                    raise SemFlowError(f"{e} (set data.skip_bad=True to skip bad examples)") from None
                with self._lock:
                    if i not in self._bad:
                        self._bad.add(i)
                        print(f"skipping bad example ({len(self._bad)} so far): {e}", flush=True)
                continue
            return {**example, "ok": k == 0}
        raise SemFlowError(f"every example of {self.name} is bad")


def folder_classes(root: str, num_classes: int):
    """(names, uint8 [C, 3] palette) of a folder dataset: ROOT/classes.json if present, else numbered classes.

    classes.json: {"names": [...C names...], "colors": [[r, g, b], ...C colours...]} (colours optional).
    """
    path = os.path.join(root, "classes.json")
    names = tuple(f"class {i}" for i in range(num_classes))
    palette = classes.voc_palette(num_classes)
    if root and os.path.exists(path):
        import json

        try:
            spec = json.load(open(path))
            names = tuple(str(x) for x in spec["names"])
            if "colors" in spec:
                palette = np.asarray(spec["colors"], np.int64)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SemFlowError(f"{path} must be JSON with a 'names' list (and 'colors'): {e}") from None
        if (
            len(names) != num_classes
            or palette.shape != (num_classes, 3)
            or palette.min() < 0
            or palette.max() > 255
        ):
            raise SemFlowError(
                f"{path} must list {num_classes} names and {num_classes} [r, g, b] colours in 0-255 "
                f"(data.num_classes), got {len(names)} names and colours of shape {list(palette.shape)}"
            )
        palette = palette.astype(np.uint8)
    return names, palette
