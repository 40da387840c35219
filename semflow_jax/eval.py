"""Evaluation: `python -m semflow_jax.eval --config=configs/shapes.py --workdir=DIR` -> DIR/eval/metrics.json.

Segmentation mIoU at config.flow.steps and for every N in eval.steps_list (the paper's steps ablation), with
the per-class table; synthesis FID (standard Inception pool3) for every N in eval.fid_steps, LPIPS (AlexNet)
to the ground-truth image, label alignment (an independent segmenter labels the synthesized images; mIoU
against the input masks, with and without the perturbation), the same model's round trip, and diversity
(mean pairwise LPIPS and RMS distance between samples of one mask, with and without the perturbation).
Writes metrics.json (schema: docs/METRICS.md), steps.md and steps.png (the ablation), per_class_iou.md and
grid.png (image | ground truth | prediction | synthesized samples).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from semflow_jax import cache, checkpoint, config_lib, distributed, segmenter, sharding
from semflow_jax.data import pipeline
from semflow_jax.errors import SemFlowError, atomic_write_bytes
from semflow_jax.metrics import fid, judges, miou, report
from semflow_jax.previews import example_keys, global_batches, host_rows
from semflow_jax.sampling import make_sampler
from semflow_jax.state import abstract_train_state, sampling_params
from semflow_jax.visualize import colorize, grid, save_png


def pairwise_distance_sum(samples, valid):
    """(sum over valid rows of the row's mean pairwise RMS pixel distance in [0, 1], number of valid rows);
    samples is a sequence of S uint8 [B, H, W, 3] arrays, row b of each a sample of the same mask."""
    x = [s.astype(jnp.float32) / 255.0 for s in samples]
    per_pair = [
        jnp.sqrt(jnp.mean((x[a] - x[b]) ** 2, axis=(1, 2, 3)))
        for a, b in itertools.combinations(range(len(x)), 2)
    ]
    per_row = jnp.mean(jnp.stack(per_pair), axis=0)
    return jnp.sum(jnp.where(valid, per_row, 0.0)), jnp.sum(valid.astype(jnp.int32))


def restore_for_eval(workdir: str, mesh):
    """(trained config, EMA (or, without one, trained) parameters laid out by the FSDP rule on mesh, their
    sharding, VAE parameters or None) of a workdir."""
    trained = config_lib.load(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not checkpoint.has_checkpoint(ckpt_dir):
        raise SemFlowError(f"no checkpoint in {ckpt_dir}: train first (python -m semflow_jax.train)")
    template = abstract_train_state(trained, mesh, fsdp=True)
    ckpt = checkpoint.Checkpointer(ckpt_dir, create=False, async_save=False)
    try:
        state = ckpt.restore(template)
    finally:
        ckpt.close()
    shardings = jax.tree.map(lambda s: s.sharding, sampling_params(template))
    return trained, sampling_params(state), shardings, state.get("vae")


def evaluate(config, workdir: str, quiet: bool = False) -> dict:
    """Runs every metric on config.eval.num_examples validation examples; writes DIR/eval/*; returns metrics.

    Runs on the config's mesh, on one process or many: each process reads its share of every global batch,
    padded so all processes run the same batches; padding rows are masked out of every sum. Confusion
    matrices and distances are reduced on the devices; process 0 writes the files (schema: docs/METRICS.md).
    """
    config = config_lib.validate(config)
    is_main = jax.process_index() == 0
    say = (lambda *a: None) if quiet or not is_main else (lambda *a: print(*a, flush=True))
    started = time.time()
    if not os.path.isdir(workdir):
        raise SemFlowError(f"workdir {workdir!r} does not exist")
    mesh = sharding.mesh_from_config(config.mesh)
    ec, c = config.eval, config.data.num_classes
    sharding.check_batch(ec.batch_size, mesh, "eval.batch_size")
    trained, params, param_sharding, vae_params = restore_for_eval(workdir, mesh)
    config_lib.check_compatible(config, trained)
    sampler = make_sampler(config, mesh, param_sharding)
    names, palette = pipeline.class_names_and_palette(config)
    main_steps, solver, beta = int(config.flow.steps), config.flow.solver, float(config.flow.beta)
    repl = sharding.replicated(mesh)
    confusion = jax.jit(functools.partial(miou.confusion_matrix_device, num_classes=c), out_shardings=repl)
    distances = jax.jit(pairwise_distance_sum, out_shardings=repl)
    masked_sum = jax.jit(lambda x, valid: jnp.sum(jnp.where(valid, x, 0.0)), out_shardings=repl)
    num_examples = pipeline.split_size(config) if ec.num_examples < 0 else int(ec.num_examples)

    def host_value(x):
        return np.asarray(x.addressable_data(0))

    def synthesize(labels, keys, steps, b=beta):
        return sampler.synthesize(params, labels, keys, b, steps, solver, vae_params)

    # --- The judges: Inception (FID), LPIPS, the independent segmenter (label alignment) -------------------
    features = lpips_fn = judge = None
    if ec.fid:
        features, inception_path = judges.inception_features(mesh)
        stats_path = judges.real_stats_path(config, num_examples, inception_path)
        real_stats = judges.load_real_stats(stats_path)
        fid_steps = sorted({int(n) for n in ec.fid_steps})
        fake_sums = {n: fid.empty_sums() for n in fid_steps}
        real_sums = fid.empty_sums()
    if ec.lpips:
        lpips_fn = judges.lpips_distance(mesh)
    if ec.label_alignment:
        seg_params, seg_meta = segmenter.load(config, mesh, ec.segmenter_dir or None, quiet=quiet)
        judge_predict = segmenter.make_predict(config, mesh)

        def judge(images):
            return judge_predict(seg_params, images)

    def add_rows(sums, x, b):
        rows = host_rows({"x": x, "index": b["index"], "valid": b["valid"]})
        return fid.add_features(sums, rows["x"])

    # --- One pass over the data: segmentation at every step count; synthesis from the (perturbed) mask,
    # judged by FID, LPIPS to the ground truth, the segmenter, and the same model's round trip ---------------
    steps_list = sorted(set(int(n) for n in ec.steps_list) | {main_steps})
    cms = {n: np.zeros((c, c), np.int64) for n in steps_list}
    cm_round = np.zeros((c, c), np.int64)
    cm_align = {True: np.zeros((c, c), np.int64), False: np.zeros((c, c), np.int64)}
    lpips_gt = 0.0
    num_batches = -(-num_examples // ec.batch_size)
    say(
        f"evaluating {num_examples} validation examples from {workdir} on mesh {dict(mesh.shape)}: "
        f"{num_batches} batches of {ec.batch_size}, segmentation at {steps_list} steps, synthesis at {main_steps}"
        + (f", FID at {fid_steps}" if ec.fid else "")
    )
    for i, b in enumerate(global_batches(config, mesh, num_examples, ec.batch_size)):
        for n in steps_list:
            pred = sampler.segment(params, b["image"], n, solver, vae_params)
            cms[n] += host_value(confusion(pred, b["label"], valid=b["valid"]))
        keys = example_keys(config.seed, b["index"])
        synthesized = synthesize(b["label"], keys, main_steps)
        relabelled = sampler.segment(params, synthesized, main_steps, solver, vae_params)
        cm_round += host_value(confusion(relabelled, b["label"], valid=b["valid"]))
        if judge is not None:
            cm_align[True] += host_value(confusion(judge(synthesized), b["label"], valid=b["valid"]))
            plain = synthesize(b["label"], keys, main_steps, 0.0)
            cm_align[False] += host_value(confusion(judge(plain), b["label"], valid=b["valid"]))
        if lpips_fn is not None:
            lpips_gt += float(host_value(masked_sum(lpips_fn(synthesized, b["image"]), b["valid"])))
        if features is not None:
            if real_stats is None:
                real_sums = add_rows(real_sums, features(b["image"]), b)
            for n in fid_steps:
                fake = synthesized if n == main_steps else synthesize(b["label"], keys, n)
                fake_sums[n] = add_rows(fake_sums[n], features(fake), b)
        say(f"  batch {i + 1}/{num_batches}  [{time.time() - started:.0f}s]")
    by_steps = {str(n): miou.mean_iou(cms[n]) for n in steps_list}
    for n in steps_list:
        say(f"  segmentation, {n:>3d} steps: mIoU {by_steps[str(n)]:.2f}")
    per_class = miou.iou_per_class(cms[main_steps])
    round_trip = miou.mean_iou(cm_round)
    say(f"  same-model round trip ({main_steps} steps, beta {beta}): mIoU {round_trip:.2f}")

    synthesis = {"steps": main_steps, "beta": beta, "round_trip_miou": round_trip}
    if features is not None:
        if real_stats is None:
            real_stats = fid.mean_and_covariance(real_sums)
            if is_main:
                fid.save_stats(stats_path, *real_stats, count=real_sums.count)
        by_n = {
            str(n): fid.frechet_distance(*real_stats, *fid.mean_and_covariance(fake_sums[n]))
            for n in fid_steps
        }
        synthesis["fid"] = {"by_steps": by_n, "real_statistics": stats_path, "examples": num_examples}
        for n in fid_steps:
            say(f"  synthesis FID, {n:>3d} steps: {by_n[str(n)]:.2f}")
    if lpips_fn is not None:
        synthesis["lpips_to_ground_truth"] = lpips_gt / num_examples
        say(f"  synthesis LPIPS to the ground-truth image: {synthesis['lpips_to_ground_truth']:.4f}")
    if judge is not None:
        synthesis["label_alignment"] = {
            "miou": miou.mean_iou(cm_align[True]),
            "miou_without_perturbation": miou.mean_iou(cm_align[False]),
            "segmenter_validation_miou": seg_meta["validation_miou"],
            "segmenter": ec.segmenter_dir or segmenter.cache_dir(config),
        }
        la = synthesis["label_alignment"]
        say(
            f"  label alignment (independent segmenter): mIoU {la['miou']:.2f} with the perturbation, "
            f"{la['miou_without_perturbation']:.2f} without; the segmenter scores "
            f"{la['segmenter_validation_miou']:.2f} on real images"
        )

    # --- Diversity: num_samples syntheses of each of the first diversity_masks masks, with and without the
    # perturbation: mean pairwise LPIPS (and RMS pixel distance) between samples of one mask ---------------
    m, s = min(ec.diversity_masks, num_examples), int(ec.num_samples)
    sums = {(p, k): 0.0 for p in (True, False) for k in ("rms", "lpips")}
    count, first = 0, None
    for b in global_batches(config, mesh, m, ec.batch_size):
        keys = [example_keys(config.seed + 1, b["index"], j) for j in range(s)]
        for perturbed in (True, False):
            samples = [synthesize(b["label"], k, main_steps, beta if perturbed else 0.0) for k in keys]
            d, n = distances(samples, b["valid"])
            sums[perturbed, "rms"] += float(host_value(d))
            if lpips_fn is not None:
                for a, z in itertools.combinations(range(s), 2):
                    pair = masked_sum(lpips_fn(samples[a], samples[z]), b["valid"])
                    sums[perturbed, "lpips"] += float(host_value(pair)) / (s * (s - 1) // 2)
            if perturbed and first is None:  # the picture's rows
                pred = sampler.segment(params, b["image"], main_steps, solver, vae_params)
                keep = {
                    "image": b["image"],
                    "label": b["label"],
                    "pred": pred,
                    "index": b["index"],
                    "valid": b["valid"],
                }
                first = host_rows({**keep, **{f"sample{j}": x for j, x in enumerate(samples)}})
        count += int(host_value(n))
    count = max(count, 1)
    diversity = {"masks": m, "samples_per_mask": s}
    for kind in ("lpips", "rms") if lpips_fn is not None else ("rms",):
        diversity[kind] = {
            "with_perturbation": sums[True, kind] / count,
            "without_perturbation": sums[False, kind] / count,
        }
        say(
            f"  diversity ({kind}, {m} masks x {s} samples): {diversity[kind]['with_perturbation']:.4f} with the "
            f"perturbation, {diversity[kind]['without_perturbation']:.4f} without"
        )
    synthesis["diversity"] = diversity

    metrics = {
        "schema_version": 2,
        "dataset": config.data.name,
        "split": "validation",
        "num_examples": num_examples,
        "solver": solver,
        "segmentation": {
            "miou": by_steps[str(main_steps)],
            "steps": main_steps,
            "miou_by_steps": {k: by_steps[k] for k in map(str, sorted(int(n) for n in ec.steps_list))},
            "per_class_iou": {
                name: (None if np.isnan(v) else float(100 * v))
                for name, v in zip(names, per_class, strict=True)
            },
        },
        "synthesis": synthesis,
        "seconds": time.time() - started,
    }
    if not is_main:
        return metrics

    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    rows = [
        [
            first["image"][i],
            colorize(first["label"][i], palette),
            colorize(first["pred"][i], palette),
            *(first[f"sample{j}"][i] for j in range(s)),
        ]
        for i in range(min(ec.grid_rows, len(first["index"])))
    ]
    written = {
        "grid.png": "image | ground truth | prediction | samples",
        "steps.md": "the steps ablation",
        "steps.png": "its plot",
        "per_class_iou.md": f"IoU of every class at {main_steps} steps",
        "metrics.json": "every number (schema: docs/METRICS.md)",
    }
    save_png(os.path.join(out_dir, "grid.png"), grid(rows, scale=max(1, 128 // first["image"].shape[1])))
    atomic_write_bytes(os.path.join(out_dir, "steps.md"), report.steps_table(metrics).encode())
    report.plot_steps(metrics, os.path.join(out_dir, "steps.png"))
    table = report.per_class_table(metrics["segmentation"]["per_class_iou"])
    atomic_write_bytes(os.path.join(out_dir, "per_class_iou.md"), table.encode())
    # metrics.json last: its presence means the rest of eval/ is complete.
    metrics_path = os.path.join(out_dir, "metrics.json")
    atomic_write_bytes(metrics_path, (json.dumps(metrics, indent=2) + "\n").encode())
    summary = [f"segmentation mIoU {metrics['segmentation']['miou']:.2f} ({main_steps} steps)"]
    if "fid" in synthesis:
        fids = synthesis["fid"]["by_steps"]
        n = str(main_steps) if str(main_steps) in fids else max(fids, key=int)
        summary.append(f"FID {fids[n]:.2f} ({n} steps)")
    if "label_alignment" in synthesis:
        summary.append(f"label alignment {synthesis['label_alignment']['miou']:.2f}")
    say(", ".join(summary) + f"  [{metrics['seconds']:.0f}s]")
    for name, what in written.items():
        say(f"wrote {os.path.join(out_dir, name)}  ({what})")
    return metrics


def main(argv):
    """CLI entry: --config and --workdir, and the multi-process flags of semflow_jax.distributed."""
    del argv
    from absl import flags

    distributed.initialize_from_flags()
    cache.enable_compilation_cache()  # a rerun or resume skips compiling what it compiled before
    evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from semflow_jax.errors import run_cli

    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/shapes.py.", lock_config=True)
    flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).")
    flags.mark_flags_as_required(["config", "workdir"])
    distributed.define_flags()
    run_cli(main, "semflow_jax.eval")
