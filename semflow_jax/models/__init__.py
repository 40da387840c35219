"""Velocity networks and the latent codec, built from config; `velocity_fn` binds a network to parameters as
v(z, t) with t in [0, 1].

model.kind "unet" is our pixel/latent UNet; "sd" is Stable Diffusion's UNet from a folder written by
`semflow_jax.convert` (model.pretrained), conditioned on the fixed empty-prompt embedding as in the paper.
flow.space "latent" runs the flow between VAE latents (the VAE from model.pretrained/vae, frozen).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from semflow_jax import flow
from semflow_jax.cpu.kernels import chosen_by
from semflow_jax.errors import SemFlowError
from semflow_jax.models.sd import SDVAE, SDUNet
from semflow_jax.models.unet import UNet


def _read_json(path: str) -> str:
    try:
        return json.dumps(json.load(open(path)), sort_keys=True)
    except (OSError, ValueError) as e:
        raise SemFlowError(
            f"cannot read {path} ({e}): is model.pretrained a semflow_jax.convert output?"
        ) from None


@functools.lru_cache(maxsize=8)
def _load_prompt(path: str) -> np.ndarray:
    try:
        return np.load(path).astype(np.float32)
    except (OSError, ValueError) as e:
        raise SemFlowError(f"cannot read the empty-prompt embedding {path}: {e}") from None


class SDVelocity(nn.Module):
    """SD's UNet as a velocity network: v(z, t) = unet(z, t, empty-prompt embedding) (a fixed constant)."""

    unet_config: str  # JSON text: hashable, so the module can be a static jit argument
    prompt_path: str
    remat: bool = False
    dtype: str = "float32"
    attention_chunk: int = 0
    kernels: str = "auto"  # config.model.kernels (cpu/kernels.py)

    @chosen_by
    @nn.compact
    def __call__(self, z, t, train: bool = False):
        del train
        cfg = json.loads(self.unet_config)
        unet = SDUNet.from_config(
            cfg,
            remat=self.remat,
            attention_chunk=self.attention_chunk,
            dtype=jnp.dtype(self.dtype),
            name="unet",
        )
        context = jnp.asarray(_load_prompt(self.prompt_path))[None]
        return unet(z, t, jnp.broadcast_to(context, (z.shape[0],) + context.shape[1:]))


def build_model(config) -> nn.Module:
    """The velocity network config.model describes (hashable: a static argument of the jitted samplers)."""
    m = config.model
    if m.kind == "sd":
        unet_config = _read_json(os.path.join(m.pretrained, "unet", "config.json"))
        prompt = os.path.join(m.pretrained, "empty_prompt.npy")
        return SDVelocity(unet_config, prompt, bool(m.remat), m.dtype, int(m.attention_chunk), str(m.kernels))
    return UNet(
        out_channels=flow_shape(config)[-1],
        channels=int(m.channels),
        channel_mults=tuple(int(x) for x in m.channel_mults),
        num_res_blocks=int(m.num_res_blocks),
        attention_resolutions=tuple(int(x) for x in m.attention_resolutions),
        num_heads=int(m.num_heads),
        num_groups=int(m.num_groups),
        dropout=float(m.dropout),
        dtype=jnp.dtype(m.dtype),
        kernels=str(m.kernels),
    )


def build_vae(config) -> SDVAE | None:
    """The frozen VAE of latent mode (None in pixel mode)."""
    if config.flow.space != "latent":
        return None
    cfg = json.loads(_read_json(os.path.join(config.model.pretrained, "vae", "config.json")))
    return SDVAE.from_config(cfg, dtype=jnp.dtype(config.model.dtype), kernels=str(config.model.kernels))


def flow_shape(config) -> tuple[int, int, int]:
    """(height, width, channels) of the flow's state: the image's, or its VAE latent's."""
    from semflow_jax.config_lib import image_hw

    h, w = image_hw(config)
    if config.flow.space != "latent":
        return h, w, 3
    vae = build_vae(config)
    f = 2 ** (len(vae.block_out_channels) - 1)
    return h // f, w // f, vae.latent_channels


def load_pretrained(config) -> dict:
    """Host numpy trees of the pretrained weights: {"params": ...} for an SD UNet, {"vae": ...} in latent mode."""
    from semflow_jax import weights_io

    out = {}

    def read(kind):
        return weights_io.read(os.path.join(config.model.pretrained, kind, "params.msgpack"))

    if config.model.kind == "sd":
        out["params"] = {"unet": read("unet")}
    if config.flow.space == "latent":
        out["vae"] = read("vae")
    return out


@dataclasses.dataclass(frozen=True)
class Codec:
    """Pixels <-> flow state: identity in pixel mode; the frozen VAE (scaled latents) in latent mode."""

    vae: SDVAE | None = None

    def encode(self, vae_params, x, rng=None):
        """[-1, 1] pictures -> flow state: the posterior sample with rng (training images), else the mode."""
        if self.vae is None:
            return x
        from semflow_jax.models.sd import latent_mode, latent_sample

        return (
            latent_sample(self.vae, vae_params, x, rng)
            if rng is not None
            else latent_mode(self.vae, vae_params, x)
        )

    def decode(self, vae_params, z):
        """Flow state -> [-1, 1] pictures."""
        if self.vae is None:
            return z
        from semflow_jax.models.sd import decode_latent

        return decode_latent(self.vae, vae_params, z)


def velocity_fn(model, params, train: bool = False, rngs=None) -> flow.VelocityFn:
    """v(z, t) = model(z, t * TIME_SCALE): the flow's time in [0, 1], the network's in [0, 1000]."""

    def v(z, t):
        return model.apply({"params": params}, z, t * flow.TIME_SCALE, train=train, rngs=rngs)

    return v
