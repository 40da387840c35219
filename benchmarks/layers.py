"""The UNet's layer formulations against the textbook ones: `python benchmarks/layers.py`.

For each layer the package writes in a form of its own (semflow_jax/models/layers.py and its CPU forms in
semflow_jax/cpu/kernels.py, the UNet's attention),
times the textbook version and ours on the shapes of the mid-size model (`configs/shapes.py:mid`, batch 16)
and of `shapes` (batch 64), forward and forward + backward, jitted, in alternating windows, and checks both
give the same values first:
- nearest x2 upsampling + 3x3 convolution (jnp.repeat, then nn.Conv) vs four 2x2 convolutions at low
  resolution;
- GroupNorm -> SiLU -> 3x3 convolution with flax's nn.GroupNorm vs `layers.GroupNorm(silu=True)`;
- the decoder's ResBlock on [h, skip]: concatenated first (jnp.concatenate) vs read part by part
  (`layers.Conv` / `layers.Dense` of parts);
- GroupNorm-SiLU then a 3x3 convolution of 128 channels: flax's nn.Conv vs `winograd.winograd_conv3x3`
  (semflow_jax/cpu/winograd.py: Winograd F(4, 3) along the width, XLA's gradients);
- flax's nn.MultiHeadDotProductAttention vs the UNet's (`unet.SelfAttention` with jax.nn.dot_product_attention);
- in bfloat16, flax's nn.Conv (XLA's bfloat16 convolution) vs `layers.Conv` and the upsampling, which on a CPU
  with AMX run as `amx.amx_conv` (semflow_jax/cpu/amx.py: products on AMX; elsewhere the same convolution as
  flax's); these agree to bfloat16 rounding, not to 1e-4.
Writes benchmarks/results/layers.json and prints a Markdown table (medians, ms; ratio = textbook / ours).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import suite  # noqa: E402  (also puts the repository root on sys.path)


def cases():
    """[(name, input shape, textbook module, our module, tolerance)] on the shapes the benchmarked UNets run.

    A tuple of shapes is an input of several arrays, passed to the modules as one tuple.
    """
    import flax.linen as nn
    import jax.numpy as jnp

    from semflow_jax.cpu import winograd
    from semflow_jax.models import layers, unet

    class WinogradConv(nn.Module):  # nn.Conv's parameters, computed as winograd_conv3x3 (cpu/winograd.py)
        features: int

        @nn.compact
        def __call__(self, x):
            kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
            return winograd.winograd_conv3x3(x, kernel) + bias

    class Upsample(nn.Module):
        ours: bool
        features: int
        dtype: Any = jnp.float32

        @nn.compact
        def __call__(self, x):
            if self.ours:
                return layers.UpsampleConv(self.features, dtype=self.dtype, name="up")(x)
            x = x.repeat(2, axis=1).repeat(2, axis=2)
            return nn.Conv(self.features, (3, 3), dtype=self.dtype, name="up")(x)

    class NormConv(nn.Module):
        ours: bool
        features: int

        @nn.compact
        def __call__(self, x):
            if self.ours:  # the UNet's form: SiLU inside the GroupNorm (models/layers.py)
                return nn.Conv(self.features, (3, 3), name="conv")(
                    layers.GroupNorm(8, silu=True, name="norm")(x)
                )
            return nn.Conv(self.features, (3, 3), name="conv")(nn.silu(nn.GroupNorm(8, name="norm")(x)))

    class Decoder(nn.Module):  # a decoder ResBlock on [h, skip], the time embedding all ones
        ours: bool
        features: int

        @nn.compact
        def __call__(self, parts):
            temb = jnp.ones((parts[0].shape[0], 4 * self.features))
            block = unet.ResBlock(self.features, 8, name="block")
            return block(parts if self.ours else jnp.concatenate(parts, axis=-1), temb)

    class WideConv(nn.Module):  # the UNet's GroupNorm-SiLU on both sides, then the convolution
        ours: bool
        features: int

        @nn.compact
        def __call__(self, x):
            h = layers.GroupNorm(8, silu=True, name="norm")(x)
            if self.ours:  # Winograd whatever `winograd.use_winograd` would say
                return WinogradConv(self.features, name="conv")(h)
            return nn.Conv(self.features, (3, 3), name="conv")(h)

    def attention(ours):  # the same parameters: flax's module, and the UNet's with jax.nn's lowering
        if ours:
            return unet.SelfAttention(2, attention_fn=unet.dot_product_attention)
        return nn.MultiHeadDotProductAttention(num_heads=2)

    in_float32 = [
        ("upsample + 3x3 conv", (16, 32, 32, 128), Upsample(False, 128), Upsample(True, 128)),
        ("upsample + 3x3 conv", (16, 16, 16, 128), Upsample(False, 128), Upsample(True, 128)),
        ("upsample + 3x3 conv", (64, 16, 16, 64), Upsample(False, 64), Upsample(True, 64)),
        ("GroupNorm-SiLU-conv", (16, 64, 64, 192), NormConv(False, 64), NormConv(True, 64)),
        ("GroupNorm-SiLU-conv", (16, 64, 64, 64), NormConv(False, 64), NormConv(True, 64)),
        ("GroupNorm-SiLU-conv", (16, 32, 32, 256), NormConv(False, 128), NormConv(True, 128)),
        ("GroupNorm-SiLU-conv", (64, 32, 32, 96), NormConv(False, 32), NormConv(True, 32)),
        *[
            ("decoder ResBlock [h, skip]", (h, skip), Decoder(False, f), Decoder(True, f))
            for h, skip, f in (
                ((16, 64, 64, 128), (16, 64, 64, 64), 64),
                ((16, 64, 64, 64), (16, 64, 64, 64), 64),
                ((16, 32, 32, 128), (16, 32, 32, 128), 128),
                ((64, 32, 32, 64), (64, 32, 32, 32), 32),
            )
        ],
        ("GroupNorm-SiLU-conv, Winograd", (16, 32, 32, 128), WideConv(False, 128), WideConv(True, 128)),
        ("GroupNorm-SiLU-conv, Winograd", (16, 16, 16, 128), WideConv(False, 128), WideConv(True, 128)),
        ("self-attention, 2 heads", (16, 256, 128), attention(False), attention(True)),
        ("self-attention, 2 heads", (64, 64, 128), attention(False), attention(True)),
    ]
    bf16 = jnp.bfloat16
    in_bfloat16 = [
        *[
            ("bfloat16 3x3 conv", shape, nn.Conv(f, (3, 3), dtype=bf16), layers.Conv(f, dtype=bf16), 2**-6)
            for shape, f in (((16, 64, 64, 64), 64), ((16, 32, 32, 128), 128), ((16, 16, 16, 128), 128))
        ],
        (
            "bfloat16 upsample + 3x3 conv",
            (16, 32, 32, 128),
            Upsample(False, 128, bf16),
            Upsample(True, 128, bf16),
            2**-6,
        ),
    ]
    return [(*case, 1e-4) for case in in_float32] + in_bfloat16


def measure(repeats: int, batch: int | None = None) -> list[dict]:
    """Times every case; one row each. batch replaces each case's batch size (the tests use 1)."""
    import jax
    import jax.numpy as jnp

    rows = []
    for name, shape, textbook, ours, tolerance in cases():
        several = isinstance(shape[0], tuple)  # an input of several arrays, passed as one tuple
        shapes = [s if batch is None else (batch, *s[1:]) for s in (shape if several else (shape,))]
        xs = tuple(jax.random.normal(jax.random.PRNGKey(i), s) * 2 + 0.5 for i, s in enumerate(shapes))
        x, shape = (xs, [list(s) for s in shapes]) if several else (xs[0], list(shapes[0]))
        params = jax.jit(textbook.init)(jax.random.PRNGKey(1), x)
        fns = {}
        for key, m in (("textbook", textbook), ("ours", ours)):
            fwd = jax.jit(m.apply)
            grad = jax.jit(jax.grad(lambda p, x, m=m: jnp.sum(m.apply(p, x) ** 2), argnums=(0, 1)))
            fns[key] = (fwd, grad)
        want, got = fns["textbook"][0](params, x), fns["ours"][0](params, x)
        got, want = got.astype(jnp.float32), want.astype(jnp.float32)
        rel = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        if not rel < tolerance:
            raise RuntimeError(
                f"{name} {_shape_text(shape)}: ours differs from the textbook by {rel:.1e} (relative)"
            )
        for fwd, grad in fns.values():  # compile
            jax.block_until_ready((fwd(params, x), grad(params, x)))
        pairs = {
            kind: (
                lambda f=fns["textbook"][i], p=params, x=x: jax.block_until_ready(f(p, x)),
                # suite.alternate's second side returns its own timed window
                lambda f=fns["ours"][i], p=params, x=x: suite.window(lambda: jax.block_until_ready(f(p, x))),
                1,
            )
            for i, kind in enumerate(("forward", "forward_backward"))
        }
        windows = suite.alternate(pairs, repeats)
        row = {"layer": name, "shape": shape, "max_rel_diff": rel, "tolerance": tolerance}
        for kind, (textbook_windows, our_windows) in windows.items():
            textbook_sec = statistics.median(w["sec"] for w in textbook_windows)
            our_sec = statistics.median(w["sec"] for w in our_windows)
            row[kind] = {
                "textbook_ms": 1e3 * textbook_sec,
                "ours_ms": 1e3 * our_sec,
                "speedup": textbook_sec / our_sec,
            }
        rows.append(row)
        print(markdown_row(row), flush=True)
    return rows


def _shape_text(shape: list) -> str:
    """16x64x64x128, or 16x64x64x128 + 16x64x64x64 for an input of several arrays."""
    shapes = shape if isinstance(shape[0], list) else [shape]
    return " + ".join("x".join(map(str, s)) for s in shapes)


def markdown_row(r: dict) -> str:
    """One table row."""
    f, b = r["forward"], r["forward_backward"]
    return (
        f"| {r['layer']} | {_shape_text(r['shape'])} | {f['textbook_ms']:.1f} | {f['ours_ms']:.1f} | "
        f"**{f['speedup']:.2f}x** | {b['textbook_ms']:.1f} | {b['ours_ms']:.1f} | **{b['speedup']:.2f}x** |"
    )


HEADER = (
    "| layer | input | forward ms, textbook | ours | speed-up | fwd+bwd ms, textbook | ours | speed-up |\n"
    "|---|---|---|---|---|---|---|---|"
)


def main():
    """CLI entry (see the module docstring)."""
    p = argparse.ArgumentParser(prog="benchmarks/layers.py", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7, help="timed windows per measurement")
    p.add_argument("--out", default=os.path.join(HERE, "results", "layers.json"))
    args = p.parse_args()
    from semflow_jax.cpu import tuning

    tuning.tune()  # as the command-line tools do, before jax starts (semflow_jax/cpu/tuning.py)
    if args.repeats < 1:
        print("layers: error: --repeats must be >= 1", file=sys.stderr)
        sys.exit(2)
    print(HEADER, flush=True)
    try:
        rows = measure(args.repeats)
    except RuntimeError as e:
        print(f"layers: error: {e}", file=sys.stderr)
        sys.exit(1)
    from semflow_jax.errors import atomic_write_bytes

    result = {"environment": suite.environment(), "repeats": args.repeats, "rows": rows}
    atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
