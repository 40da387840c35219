"""Builds notebooks/semflow_quickstart.ipynb from the cells below and runs it, so that its stored outputs are
real results: `python notebooks/build_quickstart.py` (about 4 minutes on a 2-core CPU).

The cells live here, as code, so that a change to the notebook is a readable diff; the tests execute the
written notebook itself (tests/test_notebook.py).
"""

from __future__ import annotations

import os
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "semflow_quickstart.ipynb")

CELLS = [
    (
        "md",
        """# SemFlow quickstart: one model that segments and synthesizes

[SemFlow](https://arxiv.org/abs/2405.20282) learns a single rectified flow between images (t = 0) and their
semantic masks painted in anchor colours (t = 1). Integrating forward segments an image; integrating backward
synthesizes an image from a mask, and a small bounded perturbation of the mask makes the samples diverse.

This notebook trains `semflow_jax` on the embedded `shapes` scenes (under two minutes on a 2-core CPU, seconds
on a GPU or TPU), then segments, synthesizes with and without the perturbation, shows the ODE trajectories,
and runs the two command-line tools on picture files.

**Colab:** Runtime > Change runtime type (GPU or TPU is optional), then Runtime > Run all. Set `REPO` in the
next cell to a git URL of this repository if the notebook is not opened from a checkout.
**Locally:** from a checkout, `pip install -r requirements.txt -e .`, then open this notebook.""",
    ),
    (
        "code",
        """# Install semflow_jax where it is missing (a fresh Colab runtime); in a checkout that has it, nothing.
import importlib.util
import os
import subprocess
import sys

REPO = os.environ.get("SEMFLOW_REPO", "")  # a git URL of semflow_jax, for runtimes without a checkout
IN_COLAB = "google.colab" in sys.modules

here = os.path.abspath(os.getcwd())
candidates = (here, os.path.dirname(here), os.path.join(here, "semflow_jax_src"))
root = next((d for d in candidates if os.path.exists(os.path.join(d, "setup.cfg"))), None)
if importlib.util.find_spec("semflow_jax") is None:
    if root is None:
        if not REPO:
            raise SystemExit("semflow_jax is not installed: set REPO to its git URL and rerun this cell")
        subprocess.run(["git", "clone", "--depth=1", REPO, "semflow_jax_src"], check=True)
        root = os.path.abspath("semflow_jax_src")
    # On Colab keep its accelerator build of jax (setup.cfg takes ranges); elsewhere the tested pins.
    pins = [] if IN_COLAB else ["-r", os.path.join(root, "requirements.txt")]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pins, "-e", root], check=True)
if root is not None and root not in sys.path:
    sys.path.insert(0, root)  # for configs/
print("semflow_jax from", os.path.dirname(importlib.util.find_spec("semflow_jax").origin))""",
    ),
    (
        "code",
        """# On a CPU, before jax starts: the XLA options, device split and malloc settings the command-line tools
# also use (semflow_jax/cpu/tuning.py; importing the package changes nothing by itself).
from semflow_jax.cpu import tuning

print(tuning.tune().summary())

import jax  # noqa: E402
import numpy as np  # noqa: E402
from IPython.display import Image, display  # noqa: E402

from semflow_jax import SemFlow, cache  # noqa: E402
from semflow_jax.data import shapes  # noqa: E402
from semflow_jax.metrics import miou  # noqa: E402
from semflow_jax.visualize import colorize, gif_bytes, grid, png_bytes, upscale, with_time_bar  # noqa: E402

cache.enable_compilation_cache()  # a second run of this notebook skips most compilation
print("jax", jax.__version__, "on", jax.devices())


def show(picture, scale=4):
    \"\"\"Displays a uint8 picture, enlarged by whole pixels (the scenes are 32 x 32).\"\"\"
    display(Image(data=png_bytes(np.repeat(np.repeat(picture, scale, 0), scale, 1))))""",
    ),
    (
        "md",
        """## Train

`configs/shapes.py:quick` is the demo's model and data in 400 steps instead of 3000 (use `""` for the full
run: about 10 minutes on a CPU and 95% mIoU). Rerunning the cell resumes from the workdir's checkpoint.""",
    ),
    (
        "code",
        """from configs import shapes as shapes_config
from semflow_jax.train import train_and_checkpoint

CONFIG_OPTIONS = "quick"
WORKDIR = "runs/notebook_shapes"
config = shapes_config.get_config(CONFIG_OPTIONS)
metrics = train_and_checkpoint(config, WORKDIR)
print(f"final training loss {metrics['loss']:.4f}")""",
    ),
    (
        "md",
        """## Segment: integrate forward from the image (t: 0 -> 1), read each pixel's nearest anchor

Rows: image | ground truth | prediction. The mIoU is over 256 held-out scenes.""",
    ),
    (
        "code",
        """model = SemFlow.from_workdir(WORKDIR)  # EMA weights
val = [shapes.make_example(config.seed, "validation", i) for i in range(256)]
images = np.stack([v["image"] for v in val])
truth = np.stack([v["label"] for v in val])

for steps in (1, 25):
    pred = model.segment(images if steps == 1 else images[:32], steps=steps)
    cm = miou.confusion_matrix(pred, truth[: len(pred)], shapes.NUM_CLASSES)
    print(f"mIoU with {steps:2d} Euler step(s) on {len(pred)} scenes: {miou.mean_iou(cm):.1f}%")

rows = [[images[i], colorize(truth[i], shapes.PALETTE), colorize(pred[i], shapes.PALETTE)] for i in range(6)]
show(grid(rows), scale=3)
names = zip(shapes.CLASS_NAMES, shapes.PALETTE.tolist(), strict=True)
print("classes:", ", ".join(f"{n} {tuple(c)}" for n, c in names))""",
    ),
    (
        "md",
        """## Synthesize: integrate backward from the mask (t: 1 -> 0)

With the perturbation (beta = 32 of the bound s/2 = 127.5, so no pixel changes class) the four samples of a
mask differ; without it (beta = 0) the ODE is deterministic and all four are the same picture.
Rows: mask | four samples.""",
    ),
    (
        "code",
        """masks = truth[:4]
for beta in (config.flow.beta, 0.0):
    samples = model.synthesize(np.repeat(masks, 4, axis=0), beta=beta, seed=0).reshape(4, 4, 32, 32, 3)
    spread = np.sqrt(np.mean((samples[:, :, None] / 255.0 - samples[:, None] / 255.0) ** 2, axis=(3, 4, 5)))
    print(f"beta = {beta:4.1f}: mean RMS distance between samples of a mask {spread.sum() / (4 * 12):.3f}")
    show(grid([[colorize(m, shapes.PALETTE), *s] for m, s in zip(masks, samples, strict=True)]), scale=3)""",
    ),
    (
        "md",
        """## Trajectories: the same ODE, forward and backward

Top: an image carried to its mask (segmentation). Bottom: a mask carried to two pictures (synthesis). The bar
under each frame is t.""",
    ),
    (
        "code",
        """steps = 12
_, forward = model.segment(images[:3], steps=steps, return_trajectory=True)  # [3, 13, 32, 32, 3]
_, backward = model.synthesize(np.repeat(truth[:1], 2, axis=0), steps=steps, return_trajectory=True)
t = np.linspace(0.0, 1.0, steps + 1)
for frames, times in ((forward, t), (backward, t[::-1])):
    tiled = np.stack([grid([list(f)], pad=1) for f in frames.transpose(1, 0, 2, 3, 4)])
    display(Image(data=gif_bytes(with_time_bar(upscale(tiled, 96), times)), format="gif"))""",
    ),
    (
        "md",
        """## Your own files: the command-line tools

`python -m semflow_jax.segment` takes a picture or a folder (any size, PNG/JPEG, grayscale or RGBA) and writes
class ids, colours and an overlay at the picture's own size; `python -m semflow_jax.synthesize` takes class-id
PNGs. Both take `--trajectory` (a GIF of the path), `--batch-size` and `--steps`; bad files are listed, the
good ones still written.""",
    ),
    (
        "code",
        """from PIL import Image as PILImage

os.makedirs("my_pictures", exist_ok=True)
for i in range(2):  # a 96 x 64 JPEG and a PNG, as a user's pictures would come
    big = np.asarray(PILImage.fromarray(images[10 + i]).resize((96, 64), PILImage.BILINEAR))
    PILImage.fromarray(big).save(f"my_pictures/scene{i}." + ("jpg" if i == 0 else "png"))
PILImage.fromarray(truth[12]).save("my_mask.png")


def run(command, *args):  # python -m semflow_jax.COMMAND ARGS, and what it said
    argv = [sys.executable, "-m", f"semflow_jax.{command}", *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    print(done.stdout + done.stderr)


run("segment", "--workdir", WORKDIR, "--input", "my_pictures", "--output", "my_results")
run("synthesize", "--workdir", WORKDIR, "--mask", "my_mask.png", "--output", "my_results", "--trajectory")
print(sorted(os.listdir("my_results")))
display(Image(filename="my_results/scene0_overlay.png", width=288))
display(Image(filename="my_results/my_mask_grid.png"))""",
    ),
]


def build() -> nbformat.NotebookNode:
    """The notebook of CELLS, without outputs."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["accelerator"] = "GPU"  # Colab: offer a GPU runtime; the notebook runs on any
    make = {"md": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    nb.cells = [make[kind](source) for kind, source in CELLS]
    return nb


def execute(nb: nbformat.NotebookNode, cwd: str, timeout: int = 600) -> nbformat.NotebookNode:
    """Runs every cell in a fresh kernel with cwd as its working folder; raises on the first failing cell."""
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": cwd}}
    ).execute()
    return nb


if __name__ == "__main__":
    import tempfile

    # The repository root on the kernel's path for `configs`, run in a scratch folder (runs/, my_*).
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")])
    )
    started = time.time()
    nb = execute(build(), tempfile.mkdtemp(prefix="semflow_notebook_"))
    nbformat.write(nb, OUT)
    print(f"wrote {OUT} ({time.time() - started:.0f} s)", file=sys.stderr)
