"""Evaluation: `python -m semflow_jax.eval --config=configs/shapes.py --workdir=DIR` -> DIR/eval/metrics.json.

Segmentation mIoU (at config.flow.steps and for every N in eval.steps_list), synthesis label consistency
(synthesize from validation masks with the perturbation, segment the result with the same model, mIoU
against the input mask), diversity (mean pairwise RMS distance between samples of one mask, pixels in
[0, 1]) and a picture: image | ground truth | prediction | synthesized samples.
"""

from __future__ import annotations

import itertools
import json
import os
import time

import numpy as np

from semflow_jax import config_lib
from semflow_jax.api import SemFlow
from semflow_jax.data import pipeline
from semflow_jax.errors import atomic_write_bytes
from semflow_jax.metrics import miou
from semflow_jax.visualize import colorize, grid, save_png


def preview_grid(config, model, params, batch, num_samples: int = 2) -> np.ndarray:
    """Rows of image | ground truth | prediction | num_samples syntheses, for a uint8 batch of a few examples."""
    del model  # SemFlow builds the same network from config
    semflow = SemFlow(config, params)
    _, palette = pipeline.class_names_and_palette(config)
    images, labels = batch["image"], batch["label"]
    pred = semflow.segment(images, batch_size=len(images))
    reps = np.repeat(labels, num_samples, axis=0)
    samples = semflow.synthesize(reps, seed=0, batch_size=len(reps)).reshape(
        (len(labels), num_samples) + images.shape[1:]
    )
    rows = [
        [images[i], colorize(labels[i], palette), colorize(pred[i], palette), *samples[i]]
        for i in range(len(images))
    ]
    return grid(rows, scale=max(1, 128 // images.shape[1]))


def mean_pairwise_distance(samples: np.ndarray) -> float:
    """samples uint8 [M, S, H, W, 3]: mean over masks and sample pairs of the RMS pixel distance in [0, 1]."""
    x = samples.astype(np.float64) / 255.0
    dists = [
        np.sqrt(np.mean((x[:, a] - x[:, b]) ** 2, axis=(1, 2, 3)))
        for a, b in itertools.combinations(range(x.shape[1]), 2)
    ]
    return float(np.mean(dists))


def evaluate(config, workdir: str, quiet: bool = False) -> dict:
    """Runs every metric on config.eval.num_examples validation examples; writes DIR/eval/*; returns metrics."""
    config = config_lib.validate(config)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    started = time.time()
    semflow = SemFlow.from_workdir(workdir)
    config_lib.check_compatible(config, semflow.config)
    semflow.config = config  # evaluation settings (steps, solver, beta, batch) come from --config
    ec, c = config.eval, config.data.num_classes
    names, palette = pipeline.class_names_and_palette(config)

    images, labels = [], []
    for batch in pipeline.eval_batches(config, ec.num_examples, ec.batch_size):
        images.append(batch["image"][batch["valid"]])
        labels.append(batch["label"][batch["valid"]])
    images, labels = np.concatenate(images), np.concatenate(labels)
    say(f"evaluating {len(images)} validation examples from {workdir}")

    # --- Segmentation: image -> mask, for every step count -------------------------------------------------
    steps_list = sorted(set(int(n) for n in ec.steps_list) | {int(config.flow.steps)})
    by_steps, cms, preds = {}, {}, {}
    for n in steps_list:
        preds[n] = semflow.segment(images, steps=n)
        cms[n] = miou.confusion_matrix(preds[n], labels, c)
        by_steps[str(n)] = miou.mean_iou(cms[n])
        say(f"  segmentation, {n:>3d} steps: mIoU {by_steps[str(n)]:.2f}")
    main_steps = int(config.flow.steps)
    per_class = miou.iou_per_class(cms[main_steps])

    # --- Synthesis: mask -> image (perturbed), then back with the same model -------------------------------
    synthesized = semflow.synthesize(labels, seed=config.seed)
    relabelled = semflow.segment(synthesized)
    consistency = miou.mean_iou(miou.confusion_matrix(relabelled, labels, c))
    say(
        f"  synthesis label consistency ({main_steps} steps, beta {config.flow.beta}): mIoU {consistency:.2f}"
    )

    m, s = min(ec.diversity_masks, len(labels)), int(ec.num_samples)
    samples = semflow.synthesize(np.repeat(labels[:m], s, axis=0), seed=config.seed + 1)
    samples = samples.reshape((m, s) + images.shape[1:])
    diversity = mean_pairwise_distance(samples)
    say(f"  synthesis diversity ({m} masks x {s} samples): {diversity:.4f}")

    metrics = {
        "num_examples": int(len(images)),
        "segmentation": {
            "miou": by_steps[str(main_steps)],
            "steps": main_steps,
            "miou_by_steps": {k: by_steps[k] for k in map(str, sorted(int(n) for n in ec.steps_list))},
            "per_class_iou": {
                name: (None if np.isnan(v) else float(100 * v))
                for name, v in zip(names, per_class, strict=True)
            },
        },
        "synthesis": {
            "label_consistency_miou": consistency,
            "diversity": diversity,
            "steps": main_steps,
            "beta": float(config.flow.beta),
        },
        "solver": config.flow.solver,
        "seconds": time.time() - started,
    }

    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    rows = [
        [images[i], colorize(labels[i], palette), colorize(preds[main_steps][i], palette), *samples[i]]
        for i in range(min(ec.grid_rows, m))
    ]
    grid_path = os.path.join(out_dir, "grid.png")
    save_png(grid_path, grid(rows, scale=max(1, 128 // images.shape[1])))
    metrics_path = os.path.join(out_dir, "metrics.json")
    atomic_write_bytes(metrics_path, (json.dumps(metrics, indent=2) + "\n").encode())
    say(
        f"segmentation mIoU {metrics['segmentation']['miou']:.2f} ({main_steps} steps), "
        f"label consistency {consistency:.2f}, diversity {diversity:.4f}  [{metrics['seconds']:.0f}s]"
    )
    say(f"wrote {metrics_path}\nwrote {grid_path}  (image | ground truth | prediction | {s} samples)")
    return metrics


def main(argv):
    """CLI entry: --config and --workdir."""
    del argv
    from absl import flags

    evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from semflow_jax.errors import run_cli

    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/shapes.py.", lock_config=True)
    flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).")
    flags.mark_flags_as_required(["config", "workdir"])
    run_cli(main, "semflow_jax.eval")
