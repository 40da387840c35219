"""Data throughput: `python benchmarks/data.py [--root=DIR --dataset=NAME] [--size=512] [--out=FILE]`.

Examples/s of the training input pipeline (decode, label mapping, random crop + resize + flip, batching)
read straight from the published folders and from ArrayRecord shards of the same data, with grain on one
reader thread (examples/s per CPU core) and on every core. Without --root it generates a folder dataset of
--num_images JPEG/PNG pairs of --source_width x --source_height (COCO-like 640x480) in a temporary directory.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.run import environment, summarize  # noqa: E402
from semflow_jax import config_lib  # noqa: E402
from semflow_jax.data import pipeline, prepare  # noqa: E402
from semflow_jax.errors import atomic_write_bytes  # noqa: E402


def make_dataset(root: str, num_images: int, width: int, height: int, num_classes: int = 20) -> None:
    """A folder dataset of smooth random images (JPEG, as published datasets are) and blocky PNG masks."""
    rng = np.random.default_rng(0)
    for split, n in (("train", num_images), ("val", 1)):
        os.makedirs(os.path.join(root, split, "images"), exist_ok=True)
        os.makedirs(os.path.join(root, split, "masks"), exist_ok=True)
        for i in range(n):
            small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
            image.save(os.path.join(root, split, "images", f"{i:06d}.jpg"), quality=90)
            cells = rng.integers(0, num_classes, (height // 32, width // 32), dtype=np.uint8)
            mask = Image.fromarray(cells).resize((width, height), Image.NEAREST)
            mask.save(os.path.join(root, split, "masks", f"{i:06d}.png"))


def measure(config, threads: int, batches: int, repeats: int) -> dict:
    """examples/s of the train iterator with `threads` reader threads, medians over `repeats` windows."""
    config = config.copy_and_resolve_references()
    config.data.num_threads, config.data.prefetch = threads, max(2, threads)
    it = pipeline.train_iterator(config)
    for _ in range(2):  # warm-up: thread pool start, first files
        next(it)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches * config.train.batch_size / (time.perf_counter() - start))
    return summarize(rates)


def run(root, dataset, num_classes, size, batch, batches, repeats, workdir) -> dict:
    """Measures raw folders and ArrayRecord at one thread and at every core."""
    config = config_lib.base_config()
    config.data.name, config.data.root, config.data.num_classes = dataset, root, num_classes
    config.data.image_size = size
    config.train.batch_size = batch
    config = config_lib.validate(config)
    shards = os.path.join(workdir, "arrayrecord")
    start = time.perf_counter()
    prepare.convert(
        dataset, root, shards, splits=("train",), num_shards=8, num_classes=num_classes, quiet=True
    )
    convert_sec = time.perf_counter() - start
    cores = os.cpu_count() or 1
    out = {"convert_sec": convert_sec, "image_size": size, "batch_size": batch, "cores": cores}
    for fmt, data_root in (("raw", root), ("arrayrecord", shards)):
        c = config.copy_and_resolve_references()
        c.data.format, c.data.root = fmt, data_root
        one = measure(c, 1, batches, repeats)
        out[fmt] = {
            "examples_per_sec_per_core": one,
            "examples_per_sec_all_cores": measure(c, cores, batches, repeats),
        }
    return out


def main(argv):
    """CLI entry."""
    del argv
    from absl import flags

    f = flags.FLAGS
    with tempfile.TemporaryDirectory() as tmp:
        root, dataset, num_classes = f.root, f.dataset, f.num_classes
        if not root:
            root, dataset, num_classes = os.path.join(tmp, "folder"), "folder", 20
            make_dataset(root, f.num_images, f.source_width, f.source_height)
        result = run(root, dataset, num_classes, f.size, f.batch_size, f.batches, f.repeats, tmp)
    name = dataset if f.root else f"generated: {f.num_images} images of {f.source_width}x{f.source_height}"
    result = {"dataset": name, **result, "environment": environment()}
    for fmt in ("raw", "arrayrecord"):
        r = result[fmt]
        print(f"{fmt:<12} {r['examples_per_sec_per_core']['median']:8.1f} examples/s per core   "
              f"{r['examples_per_sec_all_cores']['median']:8.1f} on {result['cores']} cores")  # fmt: skip
    print(f"conversion to ArrayRecord: {result['convert_sec']:.1f} s")
    if f.out:
        os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
        atomic_write_bytes(f.out, (json.dumps(result, indent=2) + "\n").encode())
        print(f"wrote {f.out}")


if __name__ == "__main__":
    from absl import flags

    from semflow_jax.errors import run_cli

    flags.DEFINE_string("root", "", "A dataset folder as published (default: generate one).")
    flags.DEFINE_string("dataset", "folder", "Its name (coco_stuff, cityscapes, celebamask, ade20k, folder).")
    flags.DEFINE_integer("num_classes", 20, "Class count (folder datasets).")
    flags.DEFINE_integer("size", 512, "Training crop size.")
    flags.DEFINE_integer("batch_size", 16, "Examples per batch.")
    flags.DEFINE_integer("batches", 8, "Batches per timed window.")
    flags.DEFINE_integer("repeats", 3, "Timed windows (medians are reported).")
    flags.DEFINE_integer("num_images", 256, "Images of the generated dataset.")
    flags.DEFINE_integer("source_width", 640, "Generated image width.")
    flags.DEFINE_integer("source_height", 480, "Generated image height.")
    flags.DEFINE_string("out", "", "JSON output file.")
    run_cli(main, "benchmarks/data.py")
