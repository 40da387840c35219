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
    """An endless iterator of this process's rows of every global batch; has get_state/set_state for resume.

    Global batch b is examples [b * B, (b + 1) * B) of the shuffled, repeated stream, and process p's rows
    of it are the p-th contiguous block (the rows its devices hold). So the global batches do not depend on
    the number of processes, and each process reads only its own examples.
    """
    per_process = config.train.batch_size // process_count
    ds = grain.MapDataset.source(make_source(config, "train"))
    ds = ds.shuffle(seed=config.seed).repeat()
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
    """Yields this process's part of fixed-size global batches over the first num_examples of `split`.

    batch_size is global: each process gets batch_size / process_count rows per batch, taken from examples
    process_index, process_index + process_count, ... Every process yields the same number of batches
    (collectives must match), all of one shape (one compilation). Rows past the end are padding: "valid"
    [B] is False there and no metric may count them. "index" [B] holds each row's example index.
    """
    source = make_source(config, split)
    if num_examples > len(source):
        raise SemFlowError(f"asked for {num_examples} {split} examples, the split has {len(source)}")
    if batch_size % process_count:
        raise SemFlowError(f"eval batch {batch_size} must be divisible by the {process_count} processes")
    per_process = batch_size // process_count
    num_batches = -(-num_examples // batch_size)  # the same on every process
    indices = np.arange(process_index, num_examples, process_count)
    ds = grain.MapDataset.source(source)[process_index:num_examples:process_count]
    ds = ds.batch(per_process, drop_remainder=False)
    read = grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch)
    batches = iter(ds.to_iter_dataset(read))
    filler = source[0]  # what padding rows hold (never counted)
    for b in range(num_batches):
        index = indices[b * per_process : (b + 1) * per_process]
        n, pad = len(index), per_process - len(index)
        batch = next(batches) if n else {k: np.asarray(v)[None][:0] for k, v in filler.items()}
        out = {
            k: np.concatenate([v, np.repeat(np.asarray(filler[k])[None], pad, axis=0)]) if pad else v
            for k, v in batch.items()
        }
        out["index"] = np.concatenate([index, np.zeros(pad, index.dtype)]).astype(np.int32)
        out["valid"] = np.arange(per_process) < n
        yield out
