"""CelebAMask-HQ (19 classes), the paper's settings: `--config=configs/celebamask.py:root=DIR,pretrained=SD`.

DIR holds CelebA-HQ-img/, CelebAMask-HQ-mask-anno/ and CelebA-HQ-to-CelebA-mapping.txt as published.
512^2 (images resized to the masks' size), AdamW lr 2e-5 (linear decay after a 500-step warm-up), 80k
steps, batch 32 per device, bfloat16 compute.
"""

from semflow_jax.config_lib import apply_options, paper_config


def get_config(arg=None):
    """The CelebAMask-HQ config; options: root=DIR (the dataset), pretrained=SD (semflow_jax.convert output)."""
    c = paper_config("celebamask", 19, 512, lr=2e-5, schedule="linear", warmup=500, steps=80_000,
                     per_device_batch=32, dtype="bfloat16", grad_accum=4)  # fmt: skip
    return apply_options(c, arg)
