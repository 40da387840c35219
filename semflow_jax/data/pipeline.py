"""Input pipelines on grain: a shuffled, repeated, per-process training stream, and padded eval batches.

Batches stay uint8 on the host; the device turns them into flow endpoints inside the jitted step.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from semflow_jax.data import shapes
from semflow_jax.errors import SemFlowError


def make_source(config, split: str):
    """The random-access source of `split` ("train" or "validation") for config.data."""
    d = config.data
    if d.name == "shapes":
        n = d.num_train if split == "train" else d.num_val
        return shapes.ShapesSource(config.seed, split, n, d.image_size)
    raise SemFlowError(f"data.name={d.name!r} has no reader")


def class_names_and_palette(config):
    """(names, uint8 [C, 3] display palette) of config.data's classes."""
    if config.data.name == "shapes":
        return shapes.CLASS_NAMES, shapes.PALETTE
    raise SemFlowError(f"data.name={config.data.name!r} has no class table")


def train_iterator(config, process_index: int = 0, process_count: int = 1):
    """An endless iterator of this process's share of global batches; has get_state/set_state for resume."""
    per_process = config.train.batch_size // process_count
    ds = grain.MapDataset.source(make_source(config, "train"))
    ds = ds.shuffle(seed=config.seed).repeat()
    ds = ds[process_index::process_count]  # each process reads only its own examples
    ds = ds.batch(per_process, drop_remainder=True)
    read = grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch)
    return iter(ds.to_iter_dataset(read))


def eval_batches(config, num_examples: int, batch_size: int, split: str = "validation") -> Iterator[dict]:
    """Yields fixed-size batches of the first num_examples of `split`, the last padded.

    Every batch has the same shape (one compilation) and a bool "valid" [B] that is False on padding, which
    no metric may count.
    """
    source = make_source(config, split)
    if num_examples > len(source):
        raise SemFlowError(f"asked for {num_examples} {split} examples, the split has {len(source)}")
    ds = grain.MapDataset.source(source)[:num_examples]
    ds = ds.batch(batch_size, drop_remainder=False)
    read = grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch)
    for batch in ds.to_iter_dataset(read):
        n = len(batch["label"])
        pad = batch_size - n
        out = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) if pad else v for k, v in batch.items()}
        out["valid"] = np.arange(batch_size) < n
        yield out
