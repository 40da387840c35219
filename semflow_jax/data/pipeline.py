"""Input pipelines on grain: a shuffled, repeated, per-process training stream, and padded eval batches.

Sources: the embedded shapes scenes, a published dataset's folders (`folders.RawSource`) or its ArrayRecord
shards (`records.RecordSource`); for latent-mode training also cached VAE latents (`latent_source.LatentSource`).
Real images are augmented for training (random crop, resize, flip, the
same for image and mask) and resized for evaluation. Batches stay uint8 on the host; the device turns them
into flow endpoints inside the jitted step.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from semflow_jax import config_lib
from semflow_jax.data import augment, classes, folders, latent_source, records, shapes
from semflow_jax.errors import SemFlowError


def make_source(config, split: str):
    """The random-access source of `split` ("train" or "validation") for config.data."""
    d = config.data
    if d.name == "shapes":
        n = d.num_train if split == "train" else d.num_val
        return shapes.ShapesSource(config.seed, split, n, d.image_size)
    if d.format == "arrayrecord":
        return records.RecordSource(d.root, split)
    return folders.RawSource(d.name, folders.list_examples(d.name, d.root, split), d.num_classes, d.skip_bad)


def class_names_and_palette(config):
    """(names, uint8 [C, 3] display palette) of config.data's classes."""
    name, n = config.data.name, int(config.data.num_classes)
    tables = {
        "shapes": (shapes.CLASS_NAMES, shapes.PALETTE),
        "coco_stuff": (classes.COCO_NAMES, classes.COCO_PALETTE),
        "cityscapes": (classes.CITYSCAPES_NAMES, classes.CITYSCAPES_PALETTE),
        "celebamask": (classes.CELEBAMASK_NAMES, classes.CELEBAMASK_PALETTE),
        "ade20k": (classes.ADE20K_NAMES, classes.ADE20K_PALETTE),
    }
    if name in tables:
        return tables[name]
    return folders.folder_classes(config.data.root, n)


def _train_transform(config):
    """Per-example training augmentation (none for shapes, which are made at their size)."""
    if config.data.name == "shapes":
        return None
    h, w = config_lib.image_hw(config)

    def transform(example, rng):
        out = augment.train_augment(example, h, w, rng)
        return {"image": out["image"], "label": out["label"]}

    return transform


def eval_transform(config):
    """Evaluation: resize real images to the model's size; keep image, label and whether the row is real."""
    h, w = config_lib.image_hw(config)

    def transform(example):
        if config.data.name != "shapes":
            example = augment.eval_resize(example, h, w)
        return {"image": example["image"], "label": example["label"], "ok": bool(example.get("ok", True))}

    return transform


def split_size(config, split: str = "validation") -> int:
    """How many examples `split` has."""
    return len(make_source(config, split))


def train_iterator(config, process_index: int = 0, process_count: int = 1):
    """An endless iterator of this process's rows of every global batch; has get_state/set_state for resume.

    Global batch b is examples [b * B, (b + 1) * B) of the shuffled, repeated stream, and process p's rows
    of it are the p-th contiguous block (the rows its devices hold). So the global batches do not depend on
    the number of processes, and each process reads only its own examples.
    """
    per_process = config.train.batch_size // process_count
    if config.data.latents:  # cached VAE latents (semflow_jax.data.latents): no images, no augmentation
        ds = grain.MapDataset.source(latent_source.LatentSource(config)).shuffle(seed=config.seed).repeat()
        transform = latent_source.pick_mask
    else:
        ds = grain.MapDataset.source(make_source(config, "train")).shuffle(seed=config.seed).repeat()
        transform = _train_transform(config)
    if transform is not None:  # the random draws depend on (seed, position in the stream): reproducible
        ds = ds.random_map(transform, seed=config.seed)
    ds = ds.batch(per_process, drop_remainder=True)
    ds = ds[process_index::process_count]  # lazy: the other processes' blocks are never read
    read = grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch)
    return iter(ds.to_iter_dataset(read))


def eval_batches(
    config,
    num_examples: int,
    batch_size: int,
    split: str = "validation",
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict]:
    """Yields this process's part of fixed-size global batches over the first num_examples of `split`
    (all of it for num_examples = -1).

    batch_size is global: each process gets batch_size / process_count rows per batch, taken from examples
    process_index, process_index + process_count, ... Every process yields the same number of batches
    (collectives must match), all of one shape (one compilation). Rows past the end are padding: "valid"
    [B] is False there and no metric may count them. "index" [B] holds each row's example index.
    """
    source = make_source(config, split)
    num_examples = len(source) if num_examples < 0 else num_examples
    if num_examples > len(source):
        raise SemFlowError(f"asked for {num_examples} {split} examples, the split has {len(source)}")
    if batch_size % process_count:
        raise SemFlowError(f"eval batch {batch_size} must be divisible by the {process_count} processes")
    per_process = batch_size // process_count
    num_batches = -(-num_examples // batch_size)  # the same on every process
    indices = np.arange(process_index, num_examples, process_count)
    transform = eval_transform(config)
    ds = grain.MapDataset.source(source)[process_index:num_examples:process_count].map(transform)
    ds = ds.batch(per_process, drop_remainder=False)
    read = grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch)
    batches = iter(ds.to_iter_dataset(read))
    filler = transform(source[0])  # what padding rows hold (never counted)
    for b in range(num_batches):
        index = indices[b * per_process : (b + 1) * per_process]
        n, pad = len(index), per_process - len(index)
        batch = next(batches) if n else {k: np.asarray(v)[None][:0] for k, v in filler.items()}
        out = {
            k: np.concatenate([v, np.repeat(np.asarray(filler[k])[None], pad, axis=0)]) if pad else v
            for k, v in batch.items()
        }
        out["index"] = np.concatenate([index, np.zeros(pad, index.dtype)]).astype(np.int32)
        # A bad example that skip_bad replaced by a neighbour ("ok" False) counts no more than padding.
        out["valid"] = (np.arange(per_process) < n) & out.pop("ok")
        yield out
