"""Pictures from your own masks: `python -m semflow_jax.synthesize --workdir=RUN --mask=PATH --output=OUT`.

PATH is a class-id PNG (one channel, or a palette PNG whose indices are the ids; 255 = ignore) or a folder of
them, at the model's resolution (or any size with --resize-masks, nearest neighbour). Each mask is painted
with the anchors, perturbed (|eps| < beta < s/2, so no pixel changes class) and carried from t = 1 to t = 0
by the flow, --num-samples times. OUT gets STEM_sample{k}.png, STEM_grid.png (mask | samples) and, with
--trajectory, STEM_trajectory.gif (the ODE path, mask to pictures). Sample k of a file depends only on
(--seed, the file's name, k): the same seed gives the same pictures, whatever the batch or the other files.
Exit code 0: all written; 1: some masks were bad (listed, the others written); 2: nothing done.
"""

from __future__ import annotations

import os
import zlib

import jax
import numpy as np

from semflow_jax import file_io, flow
from semflow_jax.errors import SemFlowError
from semflow_jax.visualize import colorize, gif_bytes, grid, png_bytes, upscale, with_time_bar


def file_sample_keys(seed: int, names, num_samples: int) -> np.ndarray:
    """uint32 [len(names) * num_samples, 2]: the key of sample k of file `name` is
    fold_in(fold_in(PRNGKey(seed), crc32(name)), k), rows in (file, sample) order."""
    base = jax.random.PRNGKey(seed)
    ids = np.array([zlib.crc32(n.encode()) for n in names], np.uint32)

    def keys_of(i):
        per_file = jax.random.fold_in(base, i)
        return jax.vmap(lambda k: jax.random.fold_in(per_file, k))(np.arange(num_samples, dtype=np.uint32))

    return np.asarray(jax.vmap(keys_of)(ids)).reshape(len(names) * num_samples, 2)


def synthesize_files(
    model,
    paths,
    output: str,
    num_samples: int = 4,
    steps: int | None = None,
    beta: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    trajectory: bool = False,
    resize_masks: bool = False,
    quiet: bool = False,
) -> file_io.Report:
    """Synthesizes num_samples pictures for every mask file of paths and writes the outputs above."""
    from semflow_jax.data.pipeline import class_names_and_palette

    _, palette = class_names_and_palette(model.config)
    steps = int(steps or model.config.flow.steps)
    beta = float(model.config.flow.beta if beta is None else beta)
    try:  # before any file is read: a bad flag is one error, not one per file
        flow.check_beta(beta, model.config.anchors.spacing)
    except ValueError as e:
        raise SemFlowError(f"--beta: {e}") from None
    stems = file_io.output_stems(paths)
    h, w = model.image_hw

    def read(path):
        return file_io.read_mask(path, model.num_classes, (h, w), resize_masks)

    def process(batch):
        labels = np.repeat(np.stack([m for _, m in batch]), num_samples, axis=0)
        keys = file_sample_keys(seed, [os.path.basename(p) for p, _ in batch], num_samples)
        result = model.synthesize(
            labels, steps=steps, beta=beta, keys=keys, batch_size=batch_size, return_trajectory=trajectory
        )
        images, frames = result if trajectory else (result, None)
        images = images.reshape(len(batch), num_samples, h, w, 3)
        written = []
        for i, (path, mask) in enumerate(batch):
            stem = stems[path]
            for k in range(num_samples):
                written.append(file_io.write(output, f"{stem}_sample{k}.png", png_bytes(images[i, k])))
            row = [colorize(mask, palette), *images[i]]
            picture = grid([row], scale=max(1, -(-128 // min(h, w))))
            written.append(file_io.write(output, f"{stem}_grid.png", png_bytes(picture)))
            if trajectory:
                path_frames = frames[i * num_samples : (i + 1) * num_samples]  # [S, T, H, W, 3]
                tiled = np.stack([grid([list(f)], pad=1) for f in path_frames.transpose(1, 0, 2, 3, 4)])
                times = 1.0 - np.arange(steps + 1) / steps  # backward: t = 1 (mask) ... 0 (picture)
                gif = gif_bytes(with_time_bar(upscale(tiled), times))
                written.append(file_io.write(output, f"{stem}_trajectory.gif", gif))
        return written

    files_per_batch = max(1, batch_size // num_samples)
    return file_io.run_over_files(paths, read, process, files_per_batch, "synthesize", quiet)


def main(args) -> int:
    """CLI entry: list the masks, load the model, synthesize, report."""
    from semflow_jax import SemFlow, cache

    paths = file_io.list_inputs(args.mask, "--mask")
    output = file_io.prepare_output(args.output)
    cache.enable_compilation_cache()
    model = SemFlow.from_workdir(args.workdir)
    report = synthesize_files(
        model,
        paths,
        output,
        args.num_samples,
        args.steps,
        args.beta,
        args.seed,
        args.batch_size,
        args.trajectory,
        args.resize_masks,
    )
    return file_io.summarize("semflow_jax.synthesize", report, output, "masks synthesized")


def build_parser():
    """The command's flags: the common ones, and the number of samples, beta, seed and mask resizing."""
    p = file_io.command_parser(
        "semflow_jax.synthesize", __doc__, "--mask", "a class-id PNG, or a folder of them"
    )
    p.add_argument("--num-samples", "--num_samples", type=file_io.positive_int, default=4)
    p.add_argument("--beta", type=float, default=None, help="perturbation, 0-255 units (default: config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resize-masks", "--resize_masks", action="store_true", help="resize masks (nearest) to the model"
    )
    return p


def cli(argv=None) -> None:
    """Runs the command on argv (default: sys.argv) and exits with its code."""
    from semflow_jax.errors import run_argparse_cli

    run_argparse_cli(build_parser(), main, argv)


if __name__ == "__main__":
    cli()
