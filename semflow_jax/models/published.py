"""Stable Diffusion 1.5's published UNet and VAE configs, and a weightless model folder built from them.

The dicts are the architecture keys of the diffusers `config.json` files of SD 1.5's `unet/` and `vae/` (the
keys `SDUNet.from_config` / `SDVAE.from_config` read; tests/fixtures/sd15_keys.json holds the same, with every
parameter's name and shape). `weightless_folder` writes a `model.pretrained` folder of the two configs and an
all-zero empty-prompt embedding: enough to build the models and their abstract state (the planner,
semflow_jax.plan, and the benchmarks compile SD-1.5-sized programs that way), never enough to sample.
"""

from __future__ import annotations

import json
import os

import numpy as np

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 512,
}
PROMPT_TOKENS = 77  # CLIP's context length: the empty prompt's embedding is [77, cross_attention_dim]


def weightless_folder(dst: str, unet: dict | None = None, vae: dict | None = None) -> str:
    """A model.pretrained folder at dst: unet/ and vae/ config.json (SD 1.5's by default) and a zero
    empty_prompt.npy [77, cross_attention_dim]; no weights. Returns dst."""
    configs = {"unet": SD15_UNET if unet is None else unet, "vae": SD15_VAE if vae is None else vae}
    for kind, config in configs.items():
        os.makedirs(os.path.join(dst, kind), exist_ok=True)
        with open(os.path.join(dst, kind, "config.json"), "w") as f:
            json.dump(config, f)
    context = int(configs["unet"]["cross_attention_dim"])
    np.save(os.path.join(dst, "empty_prompt.npy"), np.zeros((PROMPT_TOKENS, context), np.float32))
    return dst
