"""Users' files in and out for the inference commands: listing inputs, reading pictures and class-id masks
(checked, with one-line errors that name the file), and the batch loop over files that `semflow_jax.segment`
and `semflow_jax.synthesize` share.

A folder is read flat (no recursion), every non-hidden regular file in sorted order: a file that is not what
the command takes is reported, not skipped in silence. Bad files never stop the good ones; each output is
written atomically, so an input either has all of its outputs or none.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from semflow_jax.errors import ArgumentParser, SemFlowError, atomic_write_bytes, first_line
from semflow_jax.flow import IGNORE_LABEL

# Exit codes of the inference commands: everything written, some inputs failed, nothing done.
EXIT_OK, EXIT_SOME_FAILED, EXIT_FAILED = 0, 1, 2


def list_inputs(path: str, what: str) -> list[str]:
    """[path] for a file; a folder's non-hidden regular files, sorted. Refuses a missing path or empty folder."""
    if not os.path.exists(path):
        raise SemFlowError(f"{what} {path} does not exist")
    if not os.path.isdir(path):
        return [path]
    files = sorted(
        os.path.join(path, name)
        for name in os.listdir(path)
        if not name.startswith(".") and os.path.isfile(os.path.join(path, name))
    )
    if not files:
        raise SemFlowError(f"{what} folder {path} holds no files")
    return files


def output_stems(paths: Sequence[str]) -> dict[str, str]:
    """A distinct output name stem per input: the file's stem, or stem_ext where two inputs share a stem."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    counts = {s: stems.count(s) for s in stems}
    return {
        p: (s if counts[s] == 1 else os.path.basename(p).replace(".", "_"))
        for p, s in zip(paths, stems, strict=True)
    }


def _open(path: str) -> tuple[Image.Image, str]:
    """(the decoded picture, fully loaded, its file closed; its format); any decoder failure becomes a
    SemFlowError. JPEG orientation tags are applied (phones store pictures sideways and tag them)."""
    try:
        with Image.open(path) as im:
            im.load()
            return (ImageOps.exif_transpose(im) if im.format == "JPEG" else im.copy()), im.format
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... on malformed files
        raise SemFlowError(f"{path} is not a readable image ({first_line(e)})") from None


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB from any picture PIL reads: grayscale (8 or 16 bit) widened to three channels,
    transparency composited over white (what a viewer shows), JPEG orientation tags applied."""
    im, _ = _open(path)
    if im.mode in ("I;16", "I;16L", "I;16B", "I", "F"):  # 16-bit or float grayscale: to 8 bits
        a = np.asarray(im, np.float64)
        a = a / 257.0 if im.mode.startswith("I;16") or a.max() > 255 else a
        gray = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if "A" in im.mode or (im.mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), np.float32)
        alpha = rgba[..., 3:] / 255.0
        return np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.asarray(im.convert("RGB"))


def read_mask(path: str, num_classes: int, hw: tuple[int, int], resize: bool = False) -> np.ndarray:
    """uint8 [H, W] class ids from a single-channel PNG (or palette PNG, whose indices are the ids).

    Refuses JPEG (lossy: ids do not survive it), pictures with colour channels, ids at or above num_classes
    other than 255 (ignore), and another size than the model's hw unless resize (nearest neighbour).
    """
    im, file_format = _open(path)
    if file_format == "JPEG":
        raise SemFlowError(f"{path} is a JPEG: masks must be lossless (PNG), JPEG changes class ids")
    if im.mode not in ("L", "P", "1", "I;16", "I;16L", "I;16B", "I"):
        bands = len(im.getbands())
        raise SemFlowError(
            f"{path} has {bands} channels ({im.mode}): a mask is a single-channel PNG of class ids"
        )
    ids = np.asarray(im).astype(np.int64)
    h, w = hw
    if ids.shape != (h, w):
        if not resize:
            raise SemFlowError(
                f"{path} is {ids.shape[1]}x{ids.shape[0]} but the model takes {w}x{h} masks "
                "(resize it with nearest neighbour, or pass --resize-masks)"
            )
        ids = np.asarray(Image.fromarray(ids.astype(np.int32)).resize((w, h), Image.NEAREST)).astype(np.int64)
    bad = (ids < 0) | ((ids >= num_classes) & (ids != IGNORE_LABEL))
    if bad.any():
        raise SemFlowError(
            f"{path} has class id {int(ids[bad][0])}, at or above the model's {num_classes} classes "
            f"(ids 0-{num_classes - 1}, and {IGNORE_LABEL} for ignore)"
        )
    return ids.astype(np.uint8)


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 [h, w, 3] -> [H, W, 3], antialiased bilinear as in training's augmentation."""
    if image.shape[:2] == tuple(hw):
        return image
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR))


def resize_labels(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 class ids [h, w] -> [H, W], nearest neighbour: every pixel keeps an id the model produced."""
    if labels.shape == tuple(hw):
        return labels
    return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((hw[1], hw[0]), Image.NEAREST))


@dataclasses.dataclass
class Report:
    """What a run over files did: inputs done, inputs refused (path, reason) and the files written."""

    done: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    written: list[str] = dataclasses.field(default_factory=list)

    def exit_code(self) -> int:
        """0: every input done; 1: some inputs failed, the rest written; 2: nothing done."""
        if not self.failed:
            return EXIT_OK
        return EXIT_SOME_FAILED if self.done else EXIT_FAILED


def run_over_files(
    paths: Sequence[str],
    read: Callable[[str], object],
    process: Callable[[list[tuple[str, object]]], list[str]],
    files_per_batch: int,
    desc: str,
    quiet: bool = False,
) -> Report:
    """Reads files_per_batch inputs at a time (a bad one is recorded and left out), hands the good ones to
    process (which returns the files it wrote), with a progress bar over the files."""
    from tqdm import tqdm

    report = Report()
    # The bar only where someone watches (a terminal), and only for more than one file.
    bar = tqdm(total=len(paths), desc=desc, unit="file", disable=quiet or len(paths) < 2 or None)
    n = max(1, files_per_batch)
    try:
        for chunk in (paths[i : i + n] for i in range(0, len(paths), n)):
            good = []
            for path in chunk:
                try:
                    good.append((path, read(path)))
                except SemFlowError as e:
                    report.failed.append((path, str(e)))
            if good:
                report.written += process(good)
                report.done += [p for p, _ in good]
            bar.update(len(chunk))
    finally:
        bar.close()
    return report


def command_parser(prog: str, doc: str, input_flag: str, input_help: str):
    """The flags both inference commands take (multi-word flags accept - or _); each adds its own."""
    p = ArgumentParser(prog=prog, description=doc.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training workdir (config.json + checkpoints/)")
    p.add_argument(input_flag, required=True, help=input_help)
    p.add_argument("--output", required=True, help="the folder for the results (created if missing)")
    p.add_argument("--steps", type=positive_int, default=None, help="Euler steps (default: the config's)")
    p.add_argument("--batch-size", "--batch_size", type=positive_int, default=16, help="pictures per pass")
    p.add_argument("--trajectory", action="store_true", help="also write the ODE path as an animated GIF")
    return p


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def prepare_output(output: str) -> str:
    """The output folder, which may exist (files in it are replaced) but must not be a file."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise SemFlowError(f"--output {output} is a file, not a folder")
    return output


def write(output: str, name: str, data: bytes) -> str:
    """Writes output/name atomically (creating the folder on first use); returns the path."""
    path = os.path.join(output, name)
    try:
        os.makedirs(output, exist_ok=True)
        atomic_write_bytes(path, data)
    except OSError as e:
        raise SemFlowError(f"cannot write {path}: {first_line(e)}") from None
    return path


def summarize(prog: str, report: Report, output: str, what: str) -> int:
    """Prints each failed input on its own line (stderr) and where the results are (stdout); the exit code."""
    for _, reason in report.failed:
        print(f"{prog}: error: {reason}", file=sys.stderr)
    if report.done:
        print(
            f"{prog}: {len(report.done)} {what} -> {len(report.written)} files in {os.path.abspath(output)}"
        )
    if report.failed and report.done:
        print(
            f"{prog}: {len(report.failed)} of {len(report.failed) + len(report.done)} inputs failed "
            "(listed above); the others were written",
            file=sys.stderr,
        )
    return report.exit_code()
