"""The accelerator benchmark, one command: `python benchmarks/accelerator.py` -> results/accelerator.{json,md}.

Issue 8's accelerator targets, on the device jax's default backend gives (written for a CUDA GPU, where the
PyTorch twin runs on the same GPU; on a TPU the JAX parts run and the twin is reported as not measured):

1. `peak`: the chip's matmul rate measured in this run, bfloat16 and float32 products (8192^3, the best of
   several windows), beside the published dense bfloat16 peak where the device kind is known;
2. `sizes`: the `shapes` and mid configs' train step (float32, and bfloat16 compute against the twin under
   autocast) and sampler (N = 1, 5, 25), JAX against the twin (benchmarks/torch_twin.py, eager, cuDNN
   autotuned, in a process of its own) in alternating windows, at GPU-sized batches: exactly the CPU
   suite's measurement (benchmarks/suite.py `measure_size`), on this device;
3. `sd15`: the SD-1.5-sized latent train step (benchmarks/sd_setup.py: configs/coco.py, 512^2 images, SD
   1.5's UNet and VAE from their published configs, random weights) in bfloat16 without rematerialization,
   so every FLOP is the model's: FLOPs from XLA's cost analysis, achieved FLOP/s as a fraction of the
   measured bfloat16 peak and of the published one.

The JSON and the Markdown are rewritten after each part, so a run cut short keeps what it measured; a part
that fails is recorded as one line and the rest still run (exit status 1 if any failed). `--quick` runs every
part on tiny models and small products: seconds on a CPU, which is how the tests keep this script working.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

PARTS = ("peak", "sizes", "sd15")
# Published dense bfloat16 peaks (FLOP/s), by a substring of jax's device_kind; the first match wins.
PUBLISHED_BF16_PEAK = (
    ("H100 PCIe", 756e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def published_bf16_peak(device_kind: str) -> float | None:
    """The vendor's dense bfloat16 FLOP/s for a jax device_kind, or None where this table does not know it."""
    return next((peak for key, peak in PUBLISHED_BF16_PEAK if key in device_kind), None)


def measure_peak(n: int, repeats: int, calls_per_window: int = 10) -> dict:
    """bfloat16 and float32 n^3 matmul FLOP/s on the default device (the best window of `repeats`)."""
    import jax
    import jax.numpy as jnp
    from timing import timed

    out = {"matmul_size": n, "device_kind": jax.devices()[0].device_kind}
    for dtype in ("bfloat16", "float32"):
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
        mm = jax.jit(lambda a, b: a @ b)
        mm(a, a).block_until_ready()

        def window(mm=mm, a=a):
            for _ in range(calls_per_window):
                c = mm(a, a)
            c.block_until_ready()  # the calls queue on the device; the window ends when the last is done

        best = min(timed(window) for _ in range(max(2, repeats)))
        out[f"{dtype}_flops_per_sec"] = 2 * n**3 * calls_per_window / best
    out["published_bf16_flops_per_sec"] = published_bf16_peak(out["device_kind"])
    return out


def measure_sd15(model: str, variant: str, image_size: int, batch: int, steps: int, repeats: int) -> dict:
    """The SD-1.5-sized train step on all default devices (data parallel, the state split over the variant's
    FSDP devices): images/s, FLOPs, FLOP/s, memory."""
    import jax
    import numpy as np
    import sd_setup
    from run import compiled_flops
    from timing import summarize, timed

    from semflow_jax import config_lib, sharding
    from semflow_jax.models import flow_shape

    devices, fsdp = jax.device_count(), sd_setup.VARIANTS[variant][4]
    if devices % fsdp:
        raise ValueError(f"variant {variant} shards its state over {fsdp} devices; there are {devices}")
    with tempfile.TemporaryDirectory() as tmp:  # the model folder is read again while the step is traced
        folder = sd_setup.model_folder(tmp, model)
        config = sd_setup.coco_config(folder, variant, image_size, batch_size=batch * devices)
        config.mesh = (("data", devices // fsdp), ("fsdp", fsdp))
        config = config_lib.validate(config)
        mesh = sharding.mesh_from_config(config.mesh)
        abstract, state_sharding, batch_sharding, step = sd_setup.train_step(config, mesh)
        state = sd_setup.random_state(abstract, state_sharding)
        h, w = config_lib.image_hw(config)
        rng = np.random.default_rng(0)
        host = {
            "image": rng.integers(0, 256, (batch * devices, h, w, 3), dtype=np.uint8),
            "label": rng.integers(0, int(config.data.num_classes), (batch * devices, h, w), dtype=np.uint8),
        }
        data = {k: jax.device_put(v, batch_sharding) for k, v in host.items()}
        start = time.perf_counter()
        compiled = step.lower(state, data).compile()
        compile_sec = time.perf_counter() - start
        latent_hw = list(flow_shape(config)[:2])
    per_device = compiled_flops(compiled)  # XLA's cost analysis counts one device's share
    flops = per_device * devices if per_device else None
    memory = compiled.memory_analysis()

    metrics = {}

    def window():
        nonlocal state, metrics
        for _ in range(steps):
            state, metrics = compiled(state, data)
        jax.block_until_ready((state, metrics))

    window()  # the first steps: autotuning and allocation
    rates = [steps * batch * devices / timed(window) for _ in range(repeats)]
    step_sec = batch * devices / statistics.median(rates)
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # a step that diverged is not the step to time
        raise FloatingPointError(f"the SD-sized step's loss {loss} / gradient norm {grad_norm} is not finite")
    return {
        "model": model,
        "variant": variant,
        "compute_dtype": str(config.model.dtype),
        "remat": bool(config.model.remat),
        "image_size": image_size,
        "latent_size": latent_hw,
        "devices": devices,
        "device_kind": jax.devices()[0].device_kind,
        "batch_per_device": batch,
        "num_params": int(sum(x.size for x in jax.tree.leaves(state["params"]))),
        "compile_sec": compile_sec,
        "images_per_sec": summarize(rates),
        "step_sec": step_sec,
        "flops_per_step": flops,
        "flops_per_sec": flops / step_sec if flops else None,
        "temp_gib_per_device": getattr(memory, "temp_size_in_bytes", 0) / 2**30 if memory else None,
        "last_loss": loss,
        "last_grad_norm": grad_norm,
    }


def environment() -> dict:
    """Versions, the devices, XLA_FLAGS and the date."""
    import jax
    from timing import package_version

    return {
        "jax": jax.__version__,
        "flax": package_version("flax"),
        "torch": package_version("torch"),
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _rate(x: float | None, unit: float = 1e12, name: str = "TFLOP/s") -> str:
    return f"{x / unit:.1f} {name}" if x else "-"


def markdown(result: dict) -> str:
    """The report: the machine and peak, one JAX / twin table per model size, the SD-1.5-sized step."""
    from suite import size_markdown

    env, parts = result["environment"], result["parts"]
    peak = parts.get("peak") if isinstance(parts.get("peak"), dict) else {}
    lines = [
        f"# semflow_jax on an accelerator ({env['date'][:10]})",
        "",
        f"Devices: {len(env['devices'])} x {env['devices'][0]} ({env['backend']}); jax {env['jax']}, "
        f"flax {env['flax']}, torch {env['torch'] or 'not installed'}.",
    ]
    if peak:
        lines.append(
            f"Matmul rate measured here ({peak['matmul_size']}^3): bfloat16 "
            f"{_rate(peak['bfloat16_flops_per_sec'])}, float32 at jax's default precision (TF32 on NVIDIA "
            f"GPUs) {_rate(peak['float32_flops_per_sec'])}; "
            f"published dense bfloat16 peak {_rate(peak['published_bf16_flops_per_sec'])}."
        )
    errors = {k: v for k, v in parts.items() if isinstance(v, str)}
    for name, error in errors.items():
        lines += ["", f"Part `{name}`: {error}"]
    sizes = parts.get("sizes") if isinstance(parts.get("sizes"), dict) else {}
    if sizes:
        lines += [
            "",
            "Rates are medians of alternating windows, JAX in this process and the twin in its own, both on",
            "the same device; ratio = JAX / PyTorch twin (> 1: JAX faster), min-max of the per-window ratios.",
        ]
    for name, s in sizes.items():
        if isinstance(s, str):
            lines += ["", f"## {name}", "", s]
            continue
        lines += size_markdown(
            name, s, peak.get("float32_flops_per_sec") or float("nan"), "the float32 matmul rate"
        )
    sd = parts.get("sd15")
    if isinstance(sd, dict):
        bf16, published = peak.get("bfloat16_flops_per_sec"), peak.get("published_bf16_flops_per_sec")
        f = sd["flops_per_sec"]
        lines += [
            "",
            f"## SD-1.5-sized train step ({sd['model']}, {sd['variant']}: {sd['compute_dtype']}, remat "
            f"{sd['remat']}, {sd['num_params'] / 1e6:.0f}M parameters)",
            "",
            "| images / latents | devices x batch | images/s | step | TFLOP per step | achieved | of the measured "
            "bfloat16 rate | of the published peak |",
            "|---|---|---|---|---|---|---|---|",
            f"| {sd['image_size']}^2 / {sd['latent_size'][0]}^2 | {sd['devices']} x {sd['batch_per_device']} | "
            f"{sd['images_per_sec']['median']:.2f} ({sd['images_per_sec']['min']:.2f}-"
            f"{sd['images_per_sec']['max']:.2f}) | {1000 * sd['step_sec']:.1f} ms | "
            + (f"{sd['flops_per_step'] / 1e12:.2f}" if sd["flops_per_step"] else "-")
            + f" | {_rate(f)} | "
            + (f"**{100 * f / bf16:.0f}%**" if f and bf16 else "-")
            + " | "
            + (f"{100 * f / published:.0f}%" if f and published else "-")
            + " |",
            "",
            f"- Compile {sd['compile_sec']:.1f} s; XLA's temporaries "
            + (
                f"{sd['temp_gib_per_device']:.2f} GiB per device."
                if sd["temp_gib_per_device"]
                else "not reported."
            ),
        ]
    return "\n".join(lines) + "\n"


def write(result: dict, out: str) -> None:
    """OUT.json and OUT.md, each written whole or not at all."""
    from semflow_jax.errors import atomic_write_bytes

    atomic_write_bytes(out + ".json", (json.dumps(result, indent=1) + "\n").encode())
    atomic_write_bytes(out + ".md", markdown(result).encode())


def main(argv=None) -> int:
    """CLI entry (see the module docstring)."""
    p = argparse.ArgumentParser(prog="benchmarks/accelerator.py", description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from: {', '.join(PARTS)}")
    p.add_argument("--sizes", default="shapes,mid", help="comma-separated: shapes, mid, tiny")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per measurement")
    p.add_argument("--train_batch", type=int, default=64, help="train batch of the shapes / mid comparison")
    p.add_argument(
        "--sample_batch", type=int, default=64, help="sampler batch of the shapes / mid comparison"
    )
    p.add_argument("--steps_per_window", type=int, default=10, help="train steps per timed window")
    p.add_argument("--sd_batch", type=int, default=16, help="SD-1.5-sized step: examples per device")
    p.add_argument("--sd_variant", default="bf16_paper", help="see benchmarks/sd_setup.py VARIANTS")
    p.add_argument(
        "--out", default=os.path.join(HERE, "results", "accelerator"), help="writes OUT.json, OUT.md"
    )
    p.add_argument("--quick", action="store_true", help="tiny models and products (seconds on a CPU)")
    p.add_argument("--no-torch", action="store_true", help="JAX only")
    args = p.parse_args(argv)
    from semflow_jax.cpu import tuning

    tuning.tune()  # as the command-line tools do, before jax starts (semflow_jax/cpu/tuning.py)
    parts = [x for x in args.parts.split(",") if x]
    sizes = [x for x in args.sizes.split(",") if x]
    import sd_setup
    from suite import SIZES

    bad = (
        [f"part {x!r}" for x in parts if x not in PARTS]
        + [f"size {x!r}" for x in sizes if x not in SIZES]
        + ([f"SD variant {args.sd_variant!r}"] if args.sd_variant not in sd_setup.VARIANTS else [])
        + [
            f"--{k}={getattr(args, k)}"
            for k in ("repeats", "train_batch", "sample_batch", "steps_per_window", "sd_batch")
            if getattr(args, k) < 1
        ]
    )
    if bad:
        p.error("unknown or bad " + ", ".join(bad))
    if args.quick:
        sizes, args.repeats, args.steps_per_window = ["tiny"], 2, 2
    # The twin's process shares the GPU: JAX's allocator takes this fraction of it, not its default 75%.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # real compile times
    os.environ["SEMFLOW_COMPILATION_CACHE"] = "0"
    import jax
    import suite

    backend = jax.default_backend()
    twin_device = {"gpu": "cuda", "cpu": "cpu"}.get(backend)
    with_torch = not args.no_torch and twin_device is not None and suite.twin_available() is None
    result = {"environment": environment(), "parts": {}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    failed = []

    def part(name, fn):
        started = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001  (recorded as one line; the other parts still run)
            value = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            failed.append(name)
        print(
            f"accelerator.py: {name} done in {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        return value

    if "peak" in parts:
        n = 512 if args.quick else 8192
        result["parts"]["peak"] = part("peak", lambda: measure_peak(n, args.repeats))
        write(result, args.out)
    if "sizes" in parts:
        result["parts"]["sizes"] = {}
        for name in sizes:
            result["parts"]["sizes"][name] = part(
                f"sizes/{name}",
                lambda name=name: suite.measure_size(
                    name,
                    args.repeats,
                    with_torch,
                    device=twin_device or "cpu",
                    train_batch=None if args.quick else args.train_batch,
                    sample_batch=None if args.quick else args.sample_batch,
                    steps_per_window=args.steps_per_window,
                ),
            )
            if isinstance(result["parts"]["sizes"][name], dict) and twin_device is None:
                result["parts"]["sizes"][name]["twin"] = (
                    f"not measured: no torch device for a {backend} backend"
                )
            write(result, args.out)
    if "sd15" in parts:
        model, image_size, batch = ("tiny", 32, 2) if args.quick else ("sd15", 512, args.sd_batch)
        result["parts"]["sd15"] = part(
            "sd15",
            lambda: measure_sd15(
                model, args.sd_variant, image_size, batch, args.steps_per_window, args.repeats
            ),
        )
        write(result, args.out)
    print(markdown(result))
    print(f"wrote {args.out}.json and {args.out}.md", file=sys.stderr)
    if failed:
        print(
            f"accelerator.py: error: parts failed: {', '.join(failed)} (see {args.out}.md)", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
