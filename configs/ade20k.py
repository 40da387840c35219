"""ADE20K SceneParsing (150 classes): `--config=configs/ade20k.py:root=DIR,pretrained=SD`.

DIR holds ADEChallengeData2016/ (or is it). The paper has no ADE20K run; these are its COCO-Stuff settings
(AdamW lr 1e-5 constant after 10k warm-up, batch 16 per device) for 160k steps at 512^2.
"""

from semflow_jax.config_lib import apply_options, paper_config


def get_config(arg=None):
    """The ADE20K config; options: root=DIR (the dataset), pretrained=SD (semflow_jax.convert output)."""
    c = paper_config("ade20k", 150, 512, lr=1e-5, schedule="constant", warmup=10_000, steps=160_000,
                     per_device_batch=16, grad_accum=2)  # fmt: skip
    return apply_options(c, arg)
