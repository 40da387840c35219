"""COCO-Stuff-164k (171 classes) with the paper's training settings: `--config=configs/coco.py:root=DIR,pretrained=SD`.

DIR holds train2017/, val2017/ and stuffthingmaps_trainval2017/ as published. AdamW lr 1e-5 (constant after
a 10k-step warm-up), weight decay 0.01, clip 1.0, 320k steps, batch 16 per device, float32, 512^2.
"""

from semflow_jax.config_lib import apply_options, paper_config


def get_config(arg=None):
    """The COCO-Stuff config; options: root=DIR (the dataset), pretrained=SD (semflow_jax.convert output)."""
    c = paper_config("coco_stuff", 171, 512, lr=1e-5, schedule="constant", warmup=10_000, steps=320_000,
                     per_device_batch=16, dtype="float32", grad_accum=2)  # fmt: skip
    return apply_options(c, arg)
