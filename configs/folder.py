"""Your own data: `--config=configs/folder.py:root=DIR,num_classes=3,size=64`.

DIR/{train,val}/images/*.{png,jpg} with DIR/{train,val}/masks/<same stem>.png holding one class id per pixel
(0..num_classes-1, 255 = ignore); DIR/classes.json may name the classes and give display colours. The
defaults are CPU-sized like `shapes`: a small UNet, batch 8, 3000 steps; raise them for real data.
"""

from semflow_jax import config_lib
from semflow_jax.config_lib import apply_options


def anchors_for_classes(num_classes: int) -> tuple[int, float]:
    """(k, s): the fewest digits per channel that give every class an anchor, spread over the colour cube.

    s is the largest spacing that keeps every anchor in 0-255 and (when all k^3 anchors are used) keeps white,
    the ignore colour, off the anchor grid.
    """
    k = 2
    while k**3 < num_classes:
        k += 1
    s = 255.0 / (k - 1)
    if num_classes == k**3:
        s = float(int(s) - 1)
    return k, s


def get_config(arg=None):
    """The folder config; options root=DIR (required), num_classes=N, size=S (square side in pixels)."""
    c = config_lib.base_config()
    c.data.name = "folder"
    c.data.num_classes = 2
    c.data.image_size = 64
    opts = dict(item.partition("=")[::2] for item in filter(None, (arg or "").split(",")))
    if "size" in opts:
        opts["image_size"] = opts.pop("size")
    apply_options(c, ",".join(f"{k}={v}" for k, v in opts.items()), known=("num_classes", "image_size"))
    c.anchors.base, c.anchors.spacing = anchors_for_classes(c.data.num_classes)
    c.flow.beta = c.anchors.spacing / 8  # the paper's ratio: a quarter of the bound s/2
    c.flow.time_power, c.flow.time_power_fraction = 3.0, 0.5  # as the shapes demo (see configs/shapes.py)
    c.train.batch_size = 8
    c.train.steps = 3000
    c.train.checkpoint_every = c.train.sample_every = 1000
    c.eval.num_examples = -1
    return c
