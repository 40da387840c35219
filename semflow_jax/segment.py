"""Segment your own pictures: `python -m semflow_jax.segment --workdir=RUN --input=PATH --output=OUT`.

PATH is one picture or a folder of them (PNG, JPEG, anything PIL reads; grayscale, 16-bit and transparent
pictures converted; any size). Each is resized to the model's resolution, carried from t = 0 to t = 1 by the
flow, read out as the nearest anchor per pixel, and the class map resized back to the picture's own size
(nearest neighbour). For each input OUT gets STEM_labels.png (uint8 class ids, one channel), STEM_color.png
(the dataset's palette), STEM_overlay.png (the colours over the picture) and, with --trajectory,
STEM_trajectory.gif (the ODE path, picture to mask). Exit code 0: all written; 1: some inputs were bad (listed,
the others written); 2: nothing done.
"""

from __future__ import annotations

import numpy as np

from semflow_jax import file_io
from semflow_jax.visualize import colorize, gif_bytes, overlay, png_bytes, upscale, with_time_bar


def segment_files(
    model,
    paths,
    output: str,
    steps: int | None = None,
    batch_size: int = 16,
    trajectory: bool = False,
    quiet: bool = False,
) -> file_io.Report:
    """Segments every file of paths with a SemFlow model and writes the outputs above into output."""
    from semflow_jax.data.pipeline import class_names_and_palette

    _, palette = class_names_and_palette(model.config)
    steps = int(steps or model.config.flow.steps)
    stems = file_io.output_stems(paths)
    hw = model.image_hw

    def process(batch):
        images = np.stack([file_io.resize_image(image, hw) for _, image in batch])
        result = model.segment(images, steps=steps, batch_size=batch_size, return_trajectory=trajectory)
        labels, frames = result if trajectory else (result, None)
        written = []
        for i, (path, image) in enumerate(batch):
            ids = file_io.resize_labels(labels[i], image.shape[:2])
            colors = colorize(ids, palette)
            stem = stems[path]
            written.append(file_io.write(output, f"{stem}_labels.png", png_bytes(ids)))
            written.append(file_io.write(output, f"{stem}_color.png", png_bytes(colors)))
            written.append(file_io.write(output, f"{stem}_overlay.png", png_bytes(overlay(image, colors))))
            if trajectory:
                times = np.arange(steps + 1) / steps  # forward: t = 0 (picture) ... 1 (mask)
                gif = gif_bytes(with_time_bar(upscale(frames[i]), times))
                written.append(file_io.write(output, f"{stem}_trajectory.gif", gif))
        return written

    return file_io.run_over_files(paths, file_io.read_image, process, batch_size, "segment", quiet)


def main(args) -> int:
    """CLI entry: list the inputs, load the model, segment, report."""
    from semflow_jax import SemFlow, cache

    paths = file_io.list_inputs(args.input, "--input")
    output = file_io.prepare_output(args.output)
    cache.enable_compilation_cache()
    model = SemFlow.from_workdir(args.workdir)
    report = segment_files(model, paths, output, args.steps, args.batch_size, args.trajectory)
    return file_io.summarize("semflow_jax.segment", report, output, "pictures segmented")


def build_parser():
    """The command's flags."""
    return file_io.command_parser(
        "semflow_jax.segment", __doc__, "--input", "a picture, or a folder of pictures"
    )


def cli(argv=None) -> None:
    """Runs the command on argv (default: sys.argv) and exits with its code."""
    from semflow_jax.errors import run_argparse_cli

    run_argparse_cli(build_parser(), main, argv)


if __name__ == "__main__":
    cli()
