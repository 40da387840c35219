"""Where the train step's time goes, JAX against the PyTorch twin: `python benchmarks/attribution.py`.

Reads every convolution of the UNet from the jaxpr of its forward pass (shape, stride, padding, how many
times it occurs; the twin runs the same ones, except that each upsampling step is one 3x3 convolution at
twice the resolution where JAX runs four 2x2 ones at the low resolution, and each decoder block's first
convolution is one over [h, skip] concatenated where JAX runs one per part), then times each distinct one
alone, forward and forward + backward (the input and the weight gradient), under XLA (jitted, the package's
XLA options) and under torch (NCHW, as the twin runs it) in a process of its own (twin_process.py, as in
suite.py), in alternating windows. The whole train step of both is timed the same way; the remainder (step
minus convolutions) is the GroupNorm, SiLU, attention, time-embedding, loss, clipping, AdamW and EMA work.
Writes benchmarks/results/attribution_<size>.json and prints a Markdown table. Needs torch
(requirements-benchmarks.txt).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import suite  # noqa: E402  (also puts the repository root on sys.path)


def conv_calls(model, params, z, t) -> list[tuple[dict, str]]:
    """Every convolution of one forward pass in order: [(spec with the primitive's params, module path)]."""
    import jax

    from semflow_jax.aot import jaxprs

    calls = []

    def walk(jaxpr):  # the CPU program's convolutions: of a platform-dependent choice, the CPU branch
        for eqn, _, scope in jaxprs.scoped_equations(jaxpr, "cpu"):
            if eqn.primitive.name == "conv_general_dilated":
                p = eqn.params
                spec = {
                    "lhs": tuple(eqn.invars[0].aval.shape),
                    "rhs": tuple(eqn.invars[1].aval.shape),
                    "strides": tuple(p["window_strides"]),
                    "padding": tuple(tuple(x) for x in p["padding"]),
                    "params": p,
                }
                calls.append((spec, scope))

    from semflow_jax.cpu import kernels
    from semflow_jax.models import velocity_fn

    # Traced with the plain layers (model.kernels="plain"): on a CPU the wide convolutions run forward as
    # Winograd's six 3x1 convolutions (cpu/winograd.py) but backward as the 3x3 convolution's gradients, and
    # the twin's list pairs each layer with one convolution; the forward rows then time those layers as XLA's
    # convolution, not as JAX's step runs them.
    with kernels.chosen("plain"):
        walk(jax.make_jaxpr(lambda p: velocity_fn(model, p)(z, t))(params).jaxpr)
    return calls


def _count(specs: list[dict]) -> list[tuple[dict, int]]:
    """Distinct convolutions (by shapes, strides and padding) and how often each occurs: [(spec, count)]."""
    counts: collections.Counter = collections.Counter()
    first = {}
    for spec in specs:
        key = json.dumps({k: spec[k] for k in ("lhs", "rhs", "strides", "padding")})
        counts[key] += 1
        first.setdefault(key, spec)
    return [(first[k], n) for k, n in counts.items()]


def conv_sites(calls: list[tuple[dict, str]]) -> list[tuple[dict, int]]:
    """The distinct convolutions of a `conv_calls` list and how often each occurs: [(spec, count)]."""
    return _count([spec for spec, _ in calls])


def jax_convolution(spec: dict):
    """(forward, forward + backward) callables of one convolution under XLA, on random data, each blocking."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(spec["lhs"], np.float32))
    w = jnp.asarray(rng.standard_normal(spec["rhs"], np.float32) * 0.05)

    def conv(x, w):
        return jax.lax.conv_general_dilated_p.bind(x, w, **spec["params"])

    fwd = jax.jit(conv)

    @jax.jit
    def fwd_bwd(x, w):
        y, vjp = jax.vjp(conv, x, w)
        return vjp(y)  # the input and the weight gradient

    fwd(x, w).block_until_ready()
    jax.block_until_ready(fwd_bwd(x, w))
    return lambda: fwd(x, w).block_until_ready(), lambda: jax.block_until_ready(fwd_bwd(x, w))


def textbook_sites(calls: list[tuple[dict, str]]) -> list[tuple[dict, int]]:
    """The twin's convolutions, one per Conv parameter, from JAX's `conv_calls` grouped by module: an
    upsampling step's four 2x2 ones (models/layers.py) become the one 3x3 SAME convolution at twice the
    resolution that the twin runs after F.interpolate; a decoder block's one convolution per part of
    [h, skip] (`layers.Conv` of parts) becomes one over the concatenation; the others stay as they are."""
    modules: dict[str, list[dict]] = {}
    for spec, module in calls:
        modules.setdefault(module, []).append(spec)
    out = []
    for specs in modules.values():
        first = specs[0]
        if len(specs) == 1:
            out.append(first)
            continue
        lhs, rhs = first["lhs"], first["rhs"]
        if rhs[:2] == (2, 2):  # upsampling: 4 parities of one 3x3 kernel
            lhs, rhs = (lhs[0], 2 * lhs[1], 2 * lhs[2], lhs[3]), (3, 3, *rhs[2:])
        else:  # parts of one input: channels side by side
            cin = sum(s["rhs"][2] for s in specs)
            lhs, rhs = (*lhs[:3], cin), (*rhs[:2], cin, rhs[3])
        padding = ((1, 1), (1, 1))
        out.append(
            {
                "lhs": lhs,
                "rhs": rhs,
                "strides": (1, 1),
                "padding": padding,
                "params": first["params"] | {"padding": padding, "window_strides": (1, 1)},
            }
        )
    return _count(out)


def attribute(size: str, repeats: int) -> dict:
    """The step and its convolutions, JAX and twin, in ms per step (medians of alternating windows).

    JAX's convolutions are read from its jaxpr, the twin's are the same but for the upsampling ones
    (`textbook_sites`); every distinct one is timed in both frameworks, each side counts its own.
    """
    import jax.numpy as jnp

    from configs import shapes as shapes_config

    config = shapes_config.get_config(suite.SIZES[size])
    config.train.ema_decay = 0.999
    jax_side = suite.JaxSide(config, int(config.train.batch_size), sample_steps=(1,))
    jax_side.train(2)
    jax_side.sync_sample_params()
    b = jax_side.batch_size
    z = jnp.zeros((b, *jax_side.z.shape[1:]), jnp.float32)
    calls = conv_calls(jax_side.model, jax_side.state["params"], z, jnp.full((b,), 0.5))
    jax_sites, twin_sites = conv_sites(calls), textbook_sites(calls)

    def key(spec):
        return json.dumps({k: spec[k] for k in ("lhs", "rhs", "strides", "padding")})

    specs, counts = {}, collections.defaultdict(lambda: [0, 0])
    for side, sites in enumerate((jax_sites, twin_sites)):
        for spec, n in sites:
            specs[key(spec)] = spec
            counts[key(spec)][side] += n
    distinct = list(specs)
    with contextlib.ExitStack() as stack:
        # The twin in its own process, as in suite.py (twin_process.py says why).
        twin, _ = suite.start_twin(stack, jax_side)
        twin.call("setup_convs", specs=[json.loads(k) for k in distinct])
        pairs = {
            "step": (
                lambda: jax_side.train(1),
                lambda: twin.call("window", key="train", count=1),
                1,
            )
        }
        for i, k in enumerate(distinct):
            jf, jfb = jax_convolution(specs[k])
            pairs[f"conv{i}_fwd"] = (jf, lambda i=i: twin.call("conv_window", index=i, kind="fwd"), 1)
            pairs[f"conv{i}_fwd_bwd"] = (
                jfb,
                lambda i=i: twin.call("conv_window", index=i, kind="fwd_bwd"),
                1,
            )
        windows = suite.alternate(pairs, repeats)

    def ms(key, side):
        return 1000 * statistics.median(w["sec"] for w in windows[key][side])

    convs = []
    for i, k in enumerate(distinct):
        spec = specs[k]
        n, h, w, cin = spec["lhs"]
        kh, kw, _, cout = spec["rhs"]
        convs.append(
            {
                "shape": f"{n}x{h}x{w} {cin}->{cout} {kh}x{kw}/{spec['strides'][0]}",
                "jax_count": counts[k][0],
                "twin_count": counts[k][1],
                **{
                    f"{side_name}_{kind}_ms": counts[k][side] * ms(f"conv{i}_{kind}", side)
                    for side, side_name in ((0, "jax"), (1, "twin"))
                    for kind in ("fwd", "fwd_bwd")
                },
            }
        )
    total = {}
    for side_name in ("jax", "twin"):
        fwd = sum(c[f"{side_name}_fwd_ms"] for c in convs)
        both = sum(c[f"{side_name}_fwd_bwd_ms"] for c in convs)
        side = 0 if side_name == "jax" else 1
        step = ms("step", side)
        total[side_name] = {
            "step_ms": step,
            # the kernel's share of the step (page faults of buffers mapped fresh), part of the remainder
            "step_system_ms": 1000 * statistics.median(w["system"] for w in windows["step"][side]),
            "conv_fwd_ms": fwd,
            "conv_bwd_ms": both - fwd,
            "rest_ms": step - both,
        }
    return {
        "size": size,
        "batch_size": b,
        "num_convs": {"jax": sum(c for _, c in jax_sites), "twin": sum(c for _, c in twin_sites)},
        "total": total,
        "convs": convs,
    }


def markdown(r: dict) -> str:
    """The attribution table of one size."""
    j, t = r["total"]["jax"], r["total"]["twin"]
    rows = [
        ("train step", "step_ms"),
        (
            f"convolutions (JAX {r['num_convs']['jax']}, twin {r['num_convs']['twin']}), forward",
            "conv_fwd_ms",
        ),
        ("the same, backward (input + weight gradients)", "conv_bwd_ms"),
        ("everything else (norms, SiLU, attention, loss, optimizer, EMA)", "rest_ms"),
        ("of the step: kernel (system) CPU time", "step_system_ms"),
    ]
    lines = [
        f"### {r['size']}, batch {r['batch_size']}, ms per train step",
        "",
        "| part | JAX | PyTorch twin | JAX - twin |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        lines.append(f"| {label} | {j[key]:.1f} | {t[key]:.1f} | {j[key] - t[key]:+.1f} |")
    return "\n".join(lines) + "\n"


def main():
    """CLI entry (see the module docstring)."""
    p = argparse.ArgumentParser(prog="benchmarks/attribution.py", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="shapes,mid")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out_dir", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    from semflow_jax.cpu import tuning

    tuning.tune()  # as the command-line tools do, before jax starts (semflow_jax/cpu/tuning.py)
    from semflow_jax.errors import atomic_write_bytes

    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in suite.SIZES]
    if unknown or args.repeats < 1:
        print(
            f"attribution: error: sizes must be among {sorted(suite.SIZES)} and --repeats >= 1",
            file=sys.stderr,
        )
        sys.exit(2)
    os.makedirs(args.out_dir, exist_ok=True)
    for size in sizes:
        try:
            result = attribute(size, args.repeats)
        except RuntimeError as e:  # the twin's process failed, or its output differs from JAX's
            print(f"attribution: error: {e}", file=sys.stderr)
            sys.exit(1)
        result["environment"] = suite.environment()
        path = os.path.join(args.out_dir, f"attribution_{size}.json")
        atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
        print(markdown(result))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
