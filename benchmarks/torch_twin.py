"""The PyTorch twin of semflow_jax's velocity UNet, train step and Euler sampler, for the speed comparison.

Benchmarks only: semflow_jax never imports torch. The twin is the same network block for block (same widths,
levels, attention resolutions, GroupNorm epsilon, "SAME" stride-2 padding, nearest upsampling), loads the
JAX model's parameters by name (`load_flax_params`), and the benchmark checks that both give the same
velocity on the same weights before it times anything. The train step is the one of semflow_jax/train.py
(flow endpoints from uint8 batches, t sampling, the rectified-flow loss, global-norm clipping, AdamW, EMA);
the sampler is the same Euler integration of dz/dt = v(z, t).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TIME_SCALE = 1000.0


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N] -> [N, dim], cos then sin, as semflow_jax.models.unet.timestep_embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)  # flax's GroupNorm epsilon


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice with the time embedding added in between; a linear skip on width change."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(temb_dim, cout)
        self.norm2 = _group_norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class AttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention over all positions, residual (flax MultiHeadDotProductAttention)."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = _group_norm(channels, groups)
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.norm(x).flatten(2).transpose(1, 2)  # [N, HW, C]

        def heads(t):
            return t.view(n, h * w, self.heads, c // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.query(y)), heads(self.key(y)), heads(self.value(y)))
        y = self.out(a.transpose(1, 2).reshape(n, h * w, c))
        return x + y.transpose(1, 2).reshape(n, c, h, w)


class DownConv(nn.Conv2d):
    """3x3 stride-2 convolution with XLA's "SAME" padding (the extra row and column at the end)."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


class UNet(nn.Module):
    """semflow_jax.models.unet.UNet in PyTorch (NCHW inside, NHWC in and out like the JAX model)."""

    def __init__(
        self,
        in_channels=3,
        out_channels=3,
        channels=64,
        channel_mults=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(8,),
        num_heads=4,
        num_groups=32,
        image_size=32,
    ):
        super().__init__()
        temb_dim = 4 * channels
        self.channels, self.mults, self.num_res = channels, tuple(channel_mults), num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.blocks = nn.ModuleDict()
        b = self.blocks
        b["time_in"] = nn.Linear(channels, temb_dim)
        b["time_out"] = nn.Linear(temb_dim, temb_dim)
        b["stem"] = nn.Conv2d(in_channels, channels, 3, padding=1)
        skips, ch, size = [channels], channels, image_size
        for level, mult in enumerate(self.mults):
            for i in range(num_res_blocks):
                b[f"down{level}_res{i}"] = ResBlock(ch, channels * mult, temb_dim, num_groups)
                ch = channels * mult
                if size in self.attention_resolutions:
                    b[f"down{level}_attn{i}"] = AttentionBlock(ch, num_heads, num_groups)
                skips.append(ch)
            if level != len(self.mults) - 1:
                b[f"down{level}"] = DownConv(ch, ch, 3, stride=2)
                skips.append(ch)
                size //= 2
        b["mid_res0"] = ResBlock(ch, ch, temb_dim, num_groups)
        b["mid_attn"] = AttentionBlock(ch, num_heads, num_groups)
        b["mid_res1"] = ResBlock(ch, ch, temb_dim, num_groups)
        for level, mult in reversed(list(enumerate(self.mults))):
            for i in range(num_res_blocks + 1):
                b[f"up{level}_res{i}"] = ResBlock(ch + skips.pop(), channels * mult, temb_dim, num_groups)
                ch = channels * mult
                if size in self.attention_resolutions:
                    b[f"up{level}_attn{i}"] = AttentionBlock(ch, num_heads, num_groups)
            if level != 0:
                b[f"up{level}"] = nn.Conv2d(ch, ch, 3, padding=1)
                size *= 2
        b["out_norm"] = _group_norm(ch, num_groups)
        b["out"] = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z, t):
        """z [N, H, W, C] (NHWC like the JAX model), t [N] in network units -> velocity [N, H, W, out]."""
        b = self.blocks
        temb = b["time_out"](F.silu(b["time_in"](timestep_embedding(t, self.channels))))
        h = b["stem"](z.permute(0, 3, 1, 2))
        skips = [h]
        for level, _ in enumerate(self.mults):
            for i in range(self.num_res):
                h = b[f"down{level}_res{i}"](h, temb)
                if f"down{level}_attn{i}" in b:
                    h = b[f"down{level}_attn{i}"](h)
                skips.append(h)
            if level != len(self.mults) - 1:
                h = b[f"down{level}"](h)
                skips.append(h)
        h = b["mid_res1"](b["mid_attn"](b["mid_res0"](h, temb)), temb)
        for level, _ in reversed(list(enumerate(self.mults))):
            for i in range(self.num_res + 1):
                h = b[f"up{level}_res{i}"](torch.cat([h, skips.pop()], dim=1), temb)
                if f"up{level}_attn{i}" in b:
                    h = b[f"up{level}_attn{i}"](h)
            if level != 0:
                h = b[f"up{level}"](F.interpolate(h, scale_factor=2, mode="nearest"))
        h = b["out"](F.silu(b["out_norm"](h)))
        return h.float().permute(0, 2, 3, 1)


def load_flax_params(model: UNet, params: dict) -> None:
    """Copies the JAX UNet's parameters (the "params" tree of its variables) into the twin, by name.

    Convolutions HWIO -> OIHW, dense kernels [in, out] -> [out, in] (a 1x1 skip becomes a 1x1 convolution),
    attention's per-head kernels [C, heads, head_dim] flattened. Every tensor of the twin must be filled.
    """
    filled = set()

    def put(name, value):
        tensor = dict(model.named_parameters())[name]
        value = torch.from_numpy(np.array(value, np.float32))
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: flax {tuple(value.shape)} vs torch {tuple(tensor.shape)}")
        with torch.no_grad():
            tensor.copy_(value)
        filled.add(name)

    def walk(tree, prefix):
        for key, sub in tree.items():
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(sub, dict) and "kernel" not in sub and "scale" not in sub:
                walk(sub, path)
                continue
            target = "blocks." + path.replace(".attention.", ".")  # flax nests q, k, v, out one deeper
            if "scale" in sub:  # GroupNorm
                put(f"{target}.weight", sub["scale"])
                put(f"{target}.bias", sub["bias"])
                continue
            kernel, bias = np.asarray(sub["kernel"]), np.asarray(sub["bias"])
            if key in ("query", "key", "value"):  # [C, heads, head_dim]
                kernel, bias = kernel.reshape(kernel.shape[0], -1).T, bias.reshape(-1)
            elif key == "out" and kernel.ndim == 3:  # attention output [heads, head_dim, C]
                kernel = kernel.reshape(-1, kernel.shape[-1]).T
            elif kernel.ndim == 4:  # convolution HWIO
                kernel = kernel.transpose(3, 2, 0, 1)
            elif key == "skip":  # Dense [in, out] as a 1x1 convolution
                kernel = kernel.T[:, :, None, None]
            else:  # Dense
                kernel = kernel.T
            put(f"{target}.weight", kernel)
            put(f"{target}.bias", bias)

    walk(params, "")
    missing = set(dict(model.named_parameters())) - filled
    if missing:
        raise ValueError(f"twin parameters not filled from flax: {sorted(missing)[:5]}")


def num_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters())


class TrainStep:
    """semflow_jax/train.py's update in PyTorch: endpoints, t sampling, flow loss, clip, AdamW, EMA."""

    def __init__(self, model: UNet, config, anchors: np.ndarray, autocast_dtype=None):
        tc = config.train
        self.model = model
        self.device = next(model.parameters()).device  # the twin's device: its random draws are made there
        self.anchors = torch.as_tensor(np.asarray(anchors, np.float32), device=self.device)
        self.beta = float(config.flow.beta)
        self.power, self.fraction = float(config.flow.time_power), float(config.flow.time_power_fraction)
        self.clip = float(tc.grad_clip)
        self.ema_decay = float(tc.ema_decay)
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=float(tc.lr), betas=(tc.b1, tc.b2), weight_decay=float(tc.weight_decay)
        )
        self.ema = [p.detach().clone() for p in model.parameters()]
        self.autocast_dtype = autocast_dtype
        self.step = 0

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """One update on uint8 images [N, H, W, 3] and int64 labels [N, H, W]; returns the loss."""
        n, device = image.shape[0], self.device
        z0 = image.float() / 127.5 - 1.0
        z1 = self.anchors[label] + (torch.rand(z0.shape, device=device) * 2 - 1) * (self.beta / 127.5)
        u = torch.rand(n, device=device)
        t = torch.where(torch.rand(n, device=device) < self.fraction, u**self.power, u)
        zt = (1 - t)[:, None, None, None] * z0 + t[:, None, None, None] * z1
        autocast = self.autocast_dtype is not None
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=autocast):
            v = self.model(zt, t * TIME_SCALE)
        loss = torch.mean((v.float() - (z1 - z0)) ** 2)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        decay = min(self.ema_decay, (1.0 + self.step) / (10.0 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()], 1.0 - decay)
        self.step += 1
        return loss.detach()


@torch.inference_mode()
def integrate(model: UNet, z: torch.Tensor, direction: float, num_steps: int, autocast_dtype=None):
    """Euler integration of dz/dt = v(z, t) over [0, 1] in num_steps steps, as semflow_jax.flow.integrate."""
    t_start = (1.0 - direction) / 2.0
    h = 1.0 / num_steps
    n = z.shape[0]
    for i in range(num_steps):
        t = torch.full((n,), t_start + direction * i * h, device=z.device)
        with torch.autocast(z.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            v = model(z, t * TIME_SCALE)
        z = z + direction * h * v.float()
    return z
