"""Stable Diffusion's UNet2DConditionModel and AutoencoderKL in flax.linen, built from a diffusers config.json.

`SDUNet.from_config(cfg)` and `SDVAE.from_config(cfg)` take the dict of a diffusers `unet/config.json` or
`vae/config.json`, so SD 1.5, SD 2.x-style (linear projections, per-block head counts) and tiny test models
come from the same code. Inputs are NHWC. The VAE's `encode` returns the diagonal Gaussian posterior's
(mean, logvar); `latent_sample`/`latent_mode` apply the scaling factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from semflow_jax.cpu.kernels import chosen_by
from semflow_jax.models.layers import Conv, Dense
from semflow_jax.models.sd_blocks import (
    Downsample,
    ResnetBlock,
    SpatialSelfAttention,
    Transformer2D,
    Upsample,
    conv,
    group_norm,
    timestep_embedding,
)

_UNET_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
_VAE_BLOCKS = {"DownEncoderBlock2D", "UpDecoderBlock2D"}


def _per_block(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def _check(cfg: dict, allowed: set, kind: str) -> None:
    """Refuses configs this implementation does not build (rather than building something else)."""
    from semflow_jax.errors import SemFlowError

    blocks = list(cfg.get("down_block_types", ())) + list(cfg.get("up_block_types", ()))
    unknown = sorted(set(blocks) - allowed)
    if unknown:
        raise SemFlowError(f"{kind} config has block types this port does not build: {unknown}")
    for key, ok in (
        ("transformer_layers_per_block", (1, None)),
        ("class_embed_type", (None,)),
        ("addition_embed_type", (None,)),
        ("time_embedding_type", ("positional", None)),
        ("resnet_time_scale_shift", ("default", None)),
        ("mid_block_type", ("UNetMidBlock2DCrossAttn", None)),
        ("only_cross_attention", (False, None)),
        ("dual_cross_attention", (False, None)),
    ):
        if cfg.get(key) not in ok:
            raise SemFlowError(f"{kind} config sets {key}={cfg.get(key)!r}; this port supports {ok}")


class SDUNet(nn.Module):
    """diffusers UNet2DConditionModel: (z [N, H, W, C], t [N] in 0..1000, context [N, L, D]) -> [N, H, W, C]."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    heads: Sequence[int] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    linear_projection: bool = False
    remat: bool = False  # rematerialize every block in the backward pass (activation memory for FLOPs)
    attention_chunk: int = 0  # > 0: attention queries in chunks of this many (bounded softmax memory)
    dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, cfg: dict, **overrides) -> SDUNet:
        """The UNet a diffusers unet/config.json describes."""
        _check(cfg, _UNET_BLOCKS, "unet")
        channels = tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
        # diffusers reads attention_head_dim as the number of heads when num_attention_heads is unset
        # (a naming slip kept for compatibility): SD 1.5's 8 means 8 heads, SD 2's (5, 10, 20, 20) too.
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_out_channels=channels,
            down_block_types=tuple(cfg["down_block_types"]),
            up_block_types=tuple(cfg["up_block_types"]),
            layers_per_block=int(cfg.get("layers_per_block", 2)),
            heads=_per_block(heads, len(channels)),
            cross_attention_dim=int(cfg.get("cross_attention_dim", 768)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            norm_eps=float(cfg.get("norm_eps", 1e-5)),
            flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
            freq_shift=float(cfg.get("freq_shift", 0)),
            linear_projection=bool(cfg.get("use_linear_projection", False)),
            **overrides,
        )

    def _res(self, ch, name):
        block = nn.remat(ResnetBlock) if self.remat else ResnetBlock
        return block(ch, self.norm_num_groups, self.norm_eps, self.dtype, name=name)

    def _attn(self, ch, heads, name):
        block = nn.remat(Transformer2D) if self.remat else Transformer2D
        return block(
            heads,
            ch // heads,
            self.norm_num_groups,
            self.linear_projection,
            self.dtype,
            self.attention_chunk,
            name=name,
        )

    @nn.compact
    def __call__(self, z, t, context):
        ch0 = self.block_out_channels[0]
        temb = timestep_embedding(t, ch0, self.flip_sin_to_cos, self.freq_shift)
        temb = Dense(4 * ch0, dtype=self.dtype, name="time_embedding_linear_1")(temb)
        temb = Dense(4 * ch0, dtype=self.dtype, name="time_embedding_linear_2")(nn.silu(temb))
        context = context.astype(self.dtype)

        h = conv(ch0, 3, self.dtype, "conv_in")(z.astype(self.dtype))
        skips = [h]
        last = len(self.block_out_channels) - 1
        for i, (kind, ch) in enumerate(zip(self.down_block_types, self.block_out_channels, strict=True)):
            for j in range(self.layers_per_block):
                h = self._res(ch, f"down_blocks_{i}_resnets_{j}")(h, temb)
                if kind.startswith("CrossAttn"):
                    h = self._attn(ch, self.heads[i], f"down_blocks_{i}_attentions_{j}")(h, context)
                skips.append(h)
            if i != last:
                h = Downsample(ch, dtype=self.dtype, name=f"down_blocks_{i}_downsamplers_0")(h)
                skips.append(h)

        ch = self.block_out_channels[-1]
        h = self._res(ch, "mid_block_resnets_0")(h, temb)
        h = self._attn(ch, self.heads[-1], "mid_block_attentions_0")(h, context)
        h = self._res(ch, "mid_block_resnets_1")(h, temb)

        up_channels = list(reversed(self.block_out_channels))
        up_heads = list(reversed(self.heads))
        for i, (kind, ch) in enumerate(zip(self.up_block_types, up_channels, strict=True)):
            for j in range(self.layers_per_block + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = self._res(ch, f"up_blocks_{i}_resnets_{j}")(h, temb)
                if kind.startswith("CrossAttn"):
                    h = self._attn(ch, up_heads[i], f"up_blocks_{i}_attentions_{j}")(h, context)
            if i != last:
                h = Upsample(ch, dtype=self.dtype, name=f"up_blocks_{i}_upsamplers_0")(h)

        h = group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "conv_norm_out", silu=True)(h)
        return conv(self.out_channels, 3, self.dtype, "conv_out")(h).astype(jnp.float32)


class _Encoder(nn.Module):
    channels: Sequence[int]
    layers: int
    latent_channels: int
    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        h = conv(self.channels[0], 3, self.dtype, "conv_in")(x)
        for i, ch in enumerate(self.channels):
            for j in range(self.layers):
                h = ResnetBlock(ch, self.groups, 1e-6, self.dtype, name=f"down_blocks_{i}_resnets_{j}")(h)
            if i != len(self.channels) - 1:
                h = Downsample(
                    ch, vae_padding=True, dtype=self.dtype, name=f"down_blocks_{i}_downsamplers_0"
                )(h)
        ch = self.channels[-1]
        h = ResnetBlock(ch, self.groups, 1e-6, self.dtype, name="mid_block_resnets_0")(h)
        h = SpatialSelfAttention(self.groups, 1e-6, self.dtype, name="mid_block_attentions_0")(h)
        h = ResnetBlock(ch, self.groups, 1e-6, self.dtype, name="mid_block_resnets_1")(h)
        h = group_norm(self.groups, 1e-6, self.dtype, "conv_norm_out", silu=True)(h)
        return conv(2 * self.latent_channels, 3, self.dtype, "conv_out")(h)


class _Decoder(nn.Module):
    channels: Sequence[int]
    layers: int
    out_channels: int
    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, z):
        ch = self.channels[-1]
        h = conv(ch, 3, self.dtype, "conv_in")(z)
        h = ResnetBlock(ch, self.groups, 1e-6, self.dtype, name="mid_block_resnets_0")(h)
        h = SpatialSelfAttention(self.groups, 1e-6, self.dtype, name="mid_block_attentions_0")(h)
        h = ResnetBlock(ch, self.groups, 1e-6, self.dtype, name="mid_block_resnets_1")(h)
        for i, ch in enumerate(reversed(self.channels)):
            for j in range(self.layers + 1):
                h = ResnetBlock(ch, self.groups, 1e-6, self.dtype, name=f"up_blocks_{i}_resnets_{j}")(h)
            if i != len(self.channels) - 1:
                h = Upsample(ch, self.dtype, name=f"up_blocks_{i}_upsamplers_0")(h)
        h = group_norm(self.groups, 1e-6, self.dtype, "conv_norm_out", silu=True)(h)
        return conv(self.out_channels, 3, self.dtype, "conv_out")(h)


class SDVAE(nn.Module):
    """diffusers AutoencoderKL. encode: image [N, H, W, 3] in [-1, 1] -> (mean, logvar) [N, H/f, W/f, L];
    decode: latent (unscaled) -> image. `__call__` runs both (used to create all parameters)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    dtype: Any = jnp.float32
    kernels: str = "auto"  # config.model.kernels (cpu/kernels.py)

    @classmethod
    def from_config(cls, cfg: dict, **overrides) -> SDVAE:
        """The VAE a diffusers vae/config.json describes."""
        _check(cfg, _VAE_BLOCKS, "vae")
        return cls(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            block_out_channels=tuple(cfg.get("block_out_channels", (128, 256, 512, 512))),
            layers_per_block=int(cfg.get("layers_per_block", 2)),
            latent_channels=int(cfg.get("latent_channels", 4)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
            **overrides,
        )

    def setup(self):
        args = (self.block_out_channels, self.layers_per_block)
        self.encoder = _Encoder(*args, self.latent_channels, self.norm_num_groups, self.dtype)
        self.decoder = _Decoder(*args, self.out_channels, self.norm_num_groups, self.dtype)
        self.quant_conv = Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
        self.post_quant_conv = Conv(self.latent_channels, (1, 1), dtype=self.dtype)

    @chosen_by
    def encode(self, x):
        """(mean, logvar) of the diagonal Gaussian posterior; logvar clipped to [-30, 20] as in diffusers."""
        moments = self.quant_conv(self.encoder(x.astype(self.dtype))).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    @chosen_by
    def decode(self, z):
        """Unscaled latent -> image in about [-1, 1], float32."""
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

    @chosen_by
    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)


def sample_posterior(mean, logvar, rng, scaling_factor):
    """Scaled sample of the diagonal Gaussian posterior (mean, logvar) the VAE encoder gives."""
    return (mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)) * scaling_factor


def latent_sample(vae, params, images, rng):
    """Scaled posterior sample of images in [-1, 1] (the image endpoint in training)."""
    mean, logvar = vae.apply({"params": params}, images, method=SDVAE.encode)
    return sample_posterior(mean, logvar, rng, vae.scaling_factor)


def latent_mode(vae, params, images):
    """Scaled posterior mean (the mask endpoint, and images at test time)."""
    mean, _ = vae.apply({"params": params}, images, method=SDVAE.encode)
    return mean * vae.scaling_factor


def decode_latent(vae, params, z):
    """Image in about [-1, 1] from a scaled latent."""
    return vae.apply({"params": params}, z / vae.scaling_factor, method=SDVAE.decode)
