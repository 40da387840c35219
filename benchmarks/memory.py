"""Per-device memory of the SD-1.5-sized train step: `python benchmarks/memory.py [--target=cpu|tpu]
[--variants=a,b] [--image_size=512] [--out=F]`.

Nothing is allocated and no weights are needed: the training state is abstract (jax.eval_shape of the real
init), and the real jitted train step of semflow_jax/train.py is lowered and compiled for it. XLA's buffer
assignment then says what one device holds: the arguments (state and batch), the outputs (aliased to the
donated state) and the temporaries (activations, gradients, optimizer scratch). The SD 1.5 UNet and VAE
come from their published configs (tests/fixtures/sd15_keys.json), the data from configs/coco.py (512^2
images, 64^2 latents, batch 1 per device).

--target=tpu compiles ahead of time for TPU v5e chips (16 GiB of HBM each) with libtpu's compiler, on a
machine without any TPU: install `jax[tpu]` at this jax version into a separate venv (libtpu only needs to be
importable; no device is opened). That is the accelerator's own buffer plan. --target=cpu compiles for this
machine's CPU (simulated devices for FSDP); the CPU has no bfloat16 convolutions and widens them to float32,
so its temporaries overstate a bfloat16 step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

N_DEVICES = 8
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}"
    " --xla_backend_optimization_level=0"  # code quality is irrelevant here, buffer assignment is not
)
# XLA's own CPU settings, not the CPU tuning's (semflow_jax/cpu/xla_options.py): those YNNPACK fusions are a
# CPU-speed choice that changes the buffer plan this measures (SD 1.5 bf16_remat_paper on the CPU compiler:
# 12.96 GiB of temporaries with them, 7.37 without), so this script never calls tune().
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import sd_setup  # noqa: E402  (benchmarks/, on sys.path as this script's folder)

from semflow_jax import config_lib  # noqa: E402
from semflow_jax.errors import atomic_write_bytes  # noqa: E402

GIB = 2**30
VARIANTS = sd_setup.VARIANTS


def target_devices(target: str, n: int) -> list:
    """n devices to compile for: this machine's (simulated) CPU devices, or TPU v5e chips of a topology
    description (ahead-of-time compilation, no TPU needed)."""
    if target == "cpu":
        return jax.devices("cpu")[:n]
    from jax.experimental import topologies

    return list(topologies.get_topology_desc("v5e:2x4", "tpu").devices)[:n]


def measure(
    pretrained: str, variant: str, target: str = "cpu", image_size: int = 512, attention_chunk: int = 1024
) -> dict:
    """Compiles the train step of one variant for target; returns its per-device memory in GiB."""
    dtype, remat, ema_decay, mu_dtype, fsdp = VARIANTS[variant]
    config = sd_setup.coco_config(pretrained, variant, image_size, attention_chunk, batch_size=fsdp)
    mesh = jax.sharding.Mesh(
        np.asarray(target_devices(target, fsdp)).reshape(1, fsdp),
        ("data", "fsdp"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )
    shapes, state_sharding, batch_sharding, step = sd_setup.train_step(config, mesh)
    h, w = config_lib.image_hw(config)
    batch = {
        "image": jax.ShapeDtypeStruct((fsdp, h, w, 3), np.uint8, sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((fsdp, h, w), np.uint8, sharding=batch_sharding),
    }
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sharding
    )
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    per_device = {
        part: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes[part]))
        / GIB
        / (fsdp if part != "step" else 1)
        for part in shapes
    }
    arg, out, tmp, alias = (
        m.argument_size_in_bytes,
        m.output_size_in_bytes,
        m.temp_size_in_bytes,
        m.alias_size_in_bytes,
    )
    return {
        "target": target,
        "device_kind": mesh.devices.flat[0].device_kind,
        "compute_dtype": dtype,
        "remat": remat,
        "ema": ema_decay > 0,
        "mu_dtype": mu_dtype,
        "fsdp_devices": fsdp,
        "batch_per_device": 1,
        "image_size": image_size,
        "attention_chunk": attention_chunk,
        "state_gib_per_device_by_part": {k: round(v, 3) for k, v in per_device.items()},
        "arguments_gib": round(arg / GIB, 3),
        "outputs_gib": round(out / GIB, 3),
        "aliased_gib": round(alias / GIB, 3),
        "temporaries_gib": round(tmp / GIB, 3),
        # Donated state: outputs reuse the argument buffers, so the peak is arguments + temporaries +
        # whatever output is not aliased.
        "peak_gib": round((arg + tmp + out - alias) / GIB, 3),
        "compile_sec": round(seconds, 1),
    }


def main() -> int:
    """Measures the chosen variants; prints a table; writes the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS)
    )
    ap.add_argument("--target", default="cpu", choices=("cpu", "tpu"), help="cpu, or tpu (v5e, via libtpu)")
    ap.add_argument("--image_size", type=int, default=512, help="square image side (latents are 1/8 of it)")
    ap.add_argument("--attention_chunk", type=int, default=1024, help="model.attention_chunk (0: none)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/memory_sd15_<target>.json")
    args = ap.parse_args()
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results", f"memory_sd15_{args.target}.json")
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"memory.py: error: unknown variants {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = sd_setup.model_folder(tmp, "sd15")
        for name in names:
            results[name] = r = measure(pretrained, name, args.target, args.image_size, args.attention_chunk)
            print(
                f"{name:>18}: peak {r['peak_gib']:6.2f} GiB/device = arguments {r['arguments_gib']:.2f} "
                f"+ temporaries {r['temporaries_gib']:.2f} (+ unaliased outputs)  compile {r['compile_sec']}s",
                flush=True,
            )
    if os.path.exists(args.out):  # earlier variants of the same target stay; rerun ones are replaced
        results = {**json.load(open(args.out)).get("results", {}), **results}
    doc = {
        "what": f"per-device memory of the SD 1.5 latent train step (XLA buffer assignment, {args.target} compiler)",
        "results": results,
        "environment": {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        },
    }
    atomic_write_bytes(args.out, (json.dumps(doc, indent=2) + "\n").encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
