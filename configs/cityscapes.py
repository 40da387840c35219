"""Cityscapes (19 train ids), the paper's settings: `--config=configs/cityscapes.py:root=DIR,pretrained=SD`.

DIR holds leftImg8bit/ and gtFine/ as published. 512x1024, AdamW lr 5e-5 (linear decay after a 500-step
warm-up), 8k steps, batch 32 per device, bfloat16 compute.
"""

from semflow_jax.config_lib import apply_options, paper_config


def get_config(arg=None):
    """The Cityscapes config; options: root=DIR (the dataset), pretrained=SD (semflow_jax.convert output)."""
    c = paper_config("cityscapes", 19, (512, 1024), lr=5e-5, schedule="linear", warmup=500, steps=8_000,
                     per_device_batch=32, dtype="bfloat16", grad_accum=8)  # fmt: skip
    c.train.checkpoint_every = c.train.sample_every = 1000
    return apply_options(c, arg)
