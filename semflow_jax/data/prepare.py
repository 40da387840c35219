"""Convert a published dataset to ArrayRecord shards: `python -m semflow_jax.data.prepare --dataset=NAME
--src=DIR --dst=DIR [--splits=train,validation] [--num_shards=N] [--workers=N] [--skip_bad]`.

Every example is decoded, mapped to train ids and checked once here (the same code as the raw reader), then
written as one record; workers convert shards in parallel and a progress bar counts examples. Train with
`--config.data.format=arrayrecord --config.data.root=DST`.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

from semflow_jax.data import folders, records
from semflow_jax.errors import SemFlowError


def _convert_shard(job):
    """Worker: decode, check and write one shard; returns (written, [bad example messages])."""
    name, path, shard, num_classes, skip_bad, progress = job
    lut, resize = folders.LUTS[name], name == "celebamask"
    out, bad = [], []
    for record in shard:
        try:
            example = folders.decode(record, lut, num_classes, resize)
        except folders.BadExample as e:
            if not skip_bad:
                raise SemFlowError(f"{e} (pass --skip_bad to leave bad examples out)") from None
            bad.append(str(e))
            continue
        finally:
            progress.put(1)
        # Keep the original image file's bytes (no re-encoding) unless the image had to be resized.
        same = not resize or example["image"].shape[:2] == example["label"].shape
        if same:
            with open(record.image, "rb") as f:
                image_bytes = f.read()
        out.append(records.encode(example, image_bytes if same else None))
    records.write_shard(path + PARTIAL, out)
    return len(out), bad


PARTIAL = ".partial"  # a split's shards carry this until every shard of the split is written


def num_classes_of(name: str, num_classes: int) -> int:
    """The dataset's class count (fixed for the benchmarks; --num_classes for a folder dataset)."""
    fixed = {"coco_stuff": 171, "cityscapes": 19, "celebamask": 19, "ade20k": 150}
    if name in fixed:
        return fixed[name]
    if num_classes < 1:
        raise SemFlowError("--num_classes is required for a folder dataset")
    return num_classes


def convert(name, src, dst, splits=("train", "validation"), num_shards=8, workers=None, skip_bad=False,
            num_classes=0, quiet=False) -> dict:  # fmt: skip
    """Writes dst/{split}.array_record-*; returns {split: {"examples": n, "skipped": m}}."""
    from tqdm import tqdm

    if name not in folders.LISTERS:
        raise SemFlowError(f"--dataset must be one of {sorted(folders.LISTERS)}, got {name!r}")
    n_classes = num_classes_of(name, num_classes)
    os.makedirs(dst, exist_ok=True)
    if name == "folder" and os.path.exists(os.path.join(src, "classes.json")):
        import shutil

        shutil.copyfile(os.path.join(src, "classes.json"), os.path.join(dst, "classes.json"))
    workers = workers or min(os.cpu_count() or 1, num_shards)
    summary = {}
    ctx = multiprocessing.get_context("spawn")  # no fork after jax/threads
    for split in splits:
        recs = folders.list_examples(name, src, split)
        shards = max(1, min(num_shards, len(recs)))
        paths = records.shard_paths(dst, split, shards)
        with ctx.Manager() as manager, ctx.Pool(workers) as pool:
            progress = manager.Queue()
            jobs = [(name, paths[i], recs[i::shards], n_classes, skip_bad, progress) for i in range(shards)]
            result = pool.map_async(_convert_shard, jobs)
            with tqdm(
                total=len(recs), desc=f"{name} {split}", unit="ex", disable=quiet, file=sys.stderr
            ) as bar:
                done = 0
                while done < len(recs) and not (result.ready() and progress.empty()):
                    try:
                        progress.get(timeout=0.2)
                    except Exception:  # queue.Empty from the manager's proxy
                        continue
                    done += 1
                    bar.update(1)
            try:
                outs = result.get()  # re-raises a worker's SemFlowError
            except BaseException:
                for p in paths:  # never leave a half-converted split behind
                    if os.path.exists(p + PARTIAL):
                        os.remove(p + PARTIAL)
                raise
        for p in paths:
            os.replace(p + PARTIAL, p)
        bad = [m for _, b in outs for m in b]
        for m in bad:
            print(f"skipped bad example: {m}", file=sys.stderr)
        summary[split] = {"examples": sum(n for n, _ in outs), "skipped": len(bad), "shards": shards}
        if not quiet:
            print(f"{split}: wrote {summary[split]['examples']} examples in {shards} shards to {dst}"
                  + (f"; skipped {len(bad)} bad examples" if bad else ""))  # fmt: skip
    return summary


def main(argv):
    """CLI entry."""
    del argv
    from absl import flags

    f = flags.FLAGS
    convert(f.dataset, f.src, f.dst, tuple(f.splits), f.num_shards, f.workers, f.skip_bad, f.num_classes)


if __name__ == "__main__":
    from absl import flags

    from semflow_jax.errors import run_cli

    flags.DEFINE_string("dataset", None, f"One of {sorted(folders.LISTERS)}.")
    flags.DEFINE_string("src", None, "The dataset's folder, as published.")
    flags.DEFINE_string("dst", None, "Where the shards go.")
    flags.DEFINE_list("splits", ["train", "validation"], "Splits to convert.")
    flags.DEFINE_integer("num_shards", 8, "Shards per split (at most one per example).")
    flags.DEFINE_integer("workers", 0, "Parallel processes (0: one per CPU, at most one per shard).")
    flags.DEFINE_integer("num_classes", 0, "Class count of a folder dataset.")
    flags.DEFINE_bool("skip_bad", False, "Leave bad examples out (and list them) instead of stopping.")
    flags.mark_flags_as_required(["dataset", "src", "dst"])
    run_cli(main, "semflow_jax.data.prepare")
