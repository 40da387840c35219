"""Plan a run on a TPU slice before renting it: `python -m semflow_jax.plan --config=CONFIG --topology=v5e-8`.

Compiles ahead of time, for exactly the chips of the slice and with libtpu's own compiler, the programs the
run would compile (semflow_jax/aot/programs.py: the train step, the evaluation sampler, the latent mode's
VAE programs and latent encoder, the label-alignment segmenter's step), on this machine, with no TPU and no
weights. For each it reports what the compiler planned, per chip: the state it keeps, its temporaries, its
peak against the chip's HBM and whether it fits; per call: the compiled FLOPs (loops counted per
iteration, rematerialization included), the model's FLOPs without rematerialization, the bytes accessed,
every collective (kind, count, bytes, mesh axes) read from the compiled HLO, the roofline time, and the
images/s per chip and MFU that roofline implies. It prints a table and writes JSON (--out).

This is the compiler's plan, not a measured run: the roofline assumes the chip's published peak and HBM
bandwidth are reached and communication is hidden behind compute. Its compute side counts every loop
iteration (aot/hlo.py); its memory side is the compiler's bytes accessed, which counts a loop body once, so
for programs that loop (micro-batches, the sampler's steps) the roofline time is a lower bound and the
images/s an upper one. Exit codes: 0 every program fits; 1 one
does not (one line names it, the shortfall and the config knobs that trade memory); 2 a bad input (an
unknown slice, no libtpu, a bad config).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import tempfile
import time

GIB = 2**30
NOTE = (
    "the TPU compiler's plan, compiled ahead of time on a host without a TPU; not a measured run: the "
    "roofline assumes the published peak and HBM bandwidth and communication hidden behind compute"
)
# The compiler's refusal of a program larger than a chip's HBM, and the capacity it compares against.
_OOM = re.compile(r"Ran out of memory.*?\(([0-9.]+)([KMGT])\).*?exceeds available HBM \(([0-9.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


_OOM_USED = re.compile(r"Used ([0-9.]+)([KMGT]) of ([0-9.]+)([KMGT]) hbm")


def _amount(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def _needed_bytes(message: str, argument_bytes: float) -> float | None:
    """What a program the compiler refused needs per chip, from its message: the HBM it used when it gave
    up, or its temporaries plus the arguments (`argument_bytes`); None for any other error."""
    used = _OOM_USED.search(message)
    if used:
        return _amount(used.group(1), used.group(2))
    m = _OOM.search(message)
    return None if m is None else _amount(m.group(1), m.group(2)) + argument_bytes


_USABLE_HBM: dict[str, float] = {}


def usable_hbm(device) -> float:
    """The HBM bytes libtpu's compiler lets one program use on this chip (a little under the published
    capacity), read from its refusal of a program that cannot fit; cached per device kind."""
    kind = device.device_kind
    if kind not in _USABLE_HBM:
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        one = NamedSharding(Mesh(np.asarray([device]), ("x",)), PartitionSpec())
        too_big = jax.jit(lambda x: jnp.sort(jnp.broadcast_to(x, (2**17, 2**17))), in_shardings=one)
        try:
            too_big.lower(jax.ShapeDtypeStruct((2**17,), jnp.float32)).compile()
        except Exception as e:  # the refusal is what we want
            m = _OOM.search(str(e))
            _USABLE_HBM[kind] = _amount(m.group(3), m.group(4)) if m else float("nan")
    return _USABLE_HBM[kind]


def _weightless(config) -> tuple[object, str]:
    """config with SD 1.5's published UNet/VAE configs where model.pretrained is needed but not a folder."""
    from semflow_jax.models import published

    needs = config.model.kind == "sd" or config.flow.space == "latent"
    if not needs or os.path.isdir(config.model.pretrained):
        return config, config.model.pretrained or "config.model"
    import ml_collections

    config = ml_collections.ConfigDict(config.to_dict())
    config.model.pretrained = published.weightless_folder(tempfile.mkdtemp(prefix="semflow_plan_"))
    return config, "Stable Diffusion 1.5's published UNet and VAE configs (no weights)"


def parse_mesh(text: str) -> tuple:
    """--mesh=data=1,fsdp=-1 as config.mesh pairs."""
    from semflow_jax.errors import SemFlowError

    pairs = []
    for item in filter(None, text.split(",")):
        name, _, size = item.partition("=")
        if not re.fullmatch(r"-?\d+", size.strip()):
            raise SemFlowError(f"--mesh={text!r}: expected name=size pairs such as data=1,fsdp=-1")
        pairs.append((name.strip(), int(size)))
    return tuple(pairs)


def memory_knobs(config, name: str, mesh) -> list[str]:
    """The config settings that would lower a program's memory per chip, from where config stands now."""
    m, t = config.model, config.train
    knobs = []
    if name in ("train_step", "sampler", "sampler_encode", "sampler_decode"):
        if dict(mesh.shape).get("fsdp", 1) < mesh.size:
            knobs.append('--config.mesh=\'(("data",1),("fsdp",-1))\' (state split over every chip)')
    if name == "train_step":
        if m.kind == "sd" and not m.remat:
            knobs.append("--config.model.remat=True")
        if m.kind == "sd" and not 0 < int(m.attention_chunk) <= 1024:
            knobs.append("--config.model.attention_chunk=1024")
        if m.dtype == "float32":
            knobs.append("--config.model.dtype=bfloat16")
        if t.mu_dtype == "float32":
            knobs.append("--config.train.mu_dtype=bfloat16")
        if float(t.ema_decay) > 0:
            knobs.append("--config.train.ema_decay=0")
        micro = int(t.batch_size) // int(t.grad_accum_steps) // mesh.size
        if micro > 1:
            knobs.append(f"--config.train.grad_accum_steps={2 * int(t.grad_accum_steps)}")
        knobs.append("a smaller --config.train.batch_size_per_device")
    elif name.startswith("sampler"):
        knobs.append("a smaller --config.eval.batch_size")
    elif name == "segmenter_step":
        knobs.append("a smaller --config.segmenter.batch_size")
    elif name == "latent_encoder":
        knobs.append("a smaller --batch_size for semflow_jax.data.latents")
    return knobs


def analyze(program, chip, keep: dict | None = None) -> dict:
    """Lowers and compiles one program for its mesh; returns its plan (see the module docstring). With
    `keep`, the compiled executable is also kept there under the program's name (tests read it)."""
    from semflow_jax.aot import hlo, jaxprs
    from semflow_jax.aot.programs import bytes_per_chip

    device = program.mesh.devices.flat[0]
    hbm = usable_hbm(device)
    per_chip = program.examples / program.devices
    out = {
        "what": program.what,
        "chips": program.devices,
        "mesh": dict(program.mesh.shape),
        "examples_per_call": program.examples,
        "examples_per_chip": per_chip,
        "state_gib_per_chip": bytes_per_chip(program.state) / GIB if program.state is not None else 0.0,
        "hbm_gib_per_chip": hbm / GIB,
    }
    started = time.perf_counter()
    lowered = program.jitted.lower(*program.args)
    out["lower_sec"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:
        need = _needed_bytes(str(e), bytes_per_chip(program.args))
        if need is None:
            raise
        out.update(
            compile_sec=round(time.perf_counter() - started, 1),
            fits=False,
            compiler_says=str(e).splitlines()[0],
            peak_gib=need / GIB,
            short_by_gib=(need - hbm) / GIB,
        )
        return out
    out["compile_sec"] = round(time.perf_counter() - started, 1)
    if keep is not None:
        keep[program.name] = compiled
    mem = compiled.memory_analysis()
    peak = (
        mem.argument_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    text = compiled.as_text()
    cost = compiled.cost_analysis() or {}
    flops = hlo.matmul_flops(text)
    model_flops = jaxprs.matmul_flops(program.model_jaxpr(), device.platform) / program.devices
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    compute_sec = flops / chip.bf16_flops
    memory_sec = bytes_accessed / chip.hbm_bytes_per_sec
    roofline = max(compute_sec, memory_sec)
    optimal = cost.get("optimal_seconds")
    out.update(
        fits=True,
        arguments_gib=mem.argument_size_in_bytes / GIB,
        outputs_gib=mem.output_size_in_bytes / GIB,
        aliased_gib=mem.alias_size_in_bytes / GIB,
        temporaries_gib=mem.temp_size_in_bytes / GIB,
        code_gib=mem.generated_code_size_in_bytes / GIB,
        peak_gib=peak / GIB,
        margin_gib=(hbm - peak) / GIB,
        compiled_flops_per_chip=flops,
        model_flops_per_chip=model_flops,
        cost_analysis_flops_per_chip=float(cost.get("flops", 0.0)),
        bytes_accessed_per_chip=bytes_accessed,
        collectives=hlo.collectives(text, dict(program.mesh.shape)),
        roofline_sec=roofline,
        roofline_bound="compute" if compute_sec >= memory_sec else "memory",
        compiler_optimal_sec=optimal if optimal is not None and optimal > 0 else None,
        images_per_sec_per_chip=per_chip / roofline if roofline > 0 else None,
        mfu_at_roofline=model_flops / (roofline * chip.bf16_flops) if roofline > 0 else None,
    )
    return out


def plan(
    config,
    topology: str,
    mesh: tuple | None = None,
    wanted=None,
    quiet: bool = False,
    keep: dict | None = None,
) -> dict:
    """The plan of config on the TPU slice named `topology` (see the module docstring) as a JSON-able dict;
    `keep` (a dict) receives each program and its compiled executable by name."""
    import jax

    from semflow_jax import config_lib
    from semflow_jax.aot import programs, slices

    s = slices.parse(topology)
    if mesh:
        config.mesh = mesh
    config, model_source = _weightless(config)
    config = config_lib.validate(config)
    devices = slices.compile_only_devices(s)
    config = config_lib.resolve_batch(config, len(devices))  # the global batch, as the run on them has it
    wanted = programs.NAMES if wanted is None else tuple(wanted)
    unknown = sorted(set(wanted) - set(programs.NAMES))
    if unknown:
        from semflow_jax.errors import SemFlowError

        raise SemFlowError(f"--programs: unknown {unknown}; choose from {', '.join(programs.NAMES)}")
    doc = {
        "what": f"ahead-of-time plan of the run's programs on {s.name}",
        "note": NOTE,
        "slice": {
            "name": s.name,
            "chips": s.chips,
            "hosts": s.hosts,
            "layout": s.topology_name,
            "device_kind": devices[0].device_kind,
            "bf16_flops_per_chip": s.chip.bf16_flops,
            "hbm_bytes_per_sec_per_chip": s.chip.hbm_bytes_per_sec,
        },  # fmt: skip
        "model": model_source,
        "config": {
            "mesh": [list(a) for a in config.mesh],
            "model.dtype": config.model.dtype,
            "model.remat": bool(config.model.remat),
            "train.batch_size_per_device": int(config.train.batch_size_per_device),
            "train.batch_size": int(config.train.batch_size),
            "train.grad_accum_steps": int(config.train.grad_accum_steps),
            "train.mu_dtype": config.train.mu_dtype,
            "train.ema_decay": float(config.train.ema_decay),
        },  # fmt: skip
        "programs": {},
        "environment": {
            "jax": jax.__version__,
            "libtpu": _version("libtpu"),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        },  # fmt: skip
    }
    for program in programs.programs(config, devices, wanted):
        if not quiet:
            print(f"compiling {program.name} for {s.name} ...", file=sys.stderr, flush=True)
        result = analyze(program, s.chip, keep)
        if keep is not None:
            keep[program.name] = (program, keep.get(program.name))
        if not result["fits"]:
            result["knobs"] = memory_knobs(config, program.name, program.mesh)
        doc["programs"][program.name] = result
    return doc


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""


def _g(x, digits=2):
    return "" if x is None else f"{x:.{digits}f}"


def table(doc: dict) -> str:
    """The plan as a Markdown table, one row per program."""
    rows = [
        "| program | examples / chip | state GiB | temporaries GiB | peak / HBM GiB | fits | compiled TFLOP "
        "| model TFLOP | collectives: count, GB | roofline ms | images/s / chip | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in doc["programs"].items():
        fits = (
            f"yes, {p['margin_gib']:.2f} GiB to spare"
            if p["fits"]
            else f"**no**, {p['short_by_gib']:.2f} GiB short"
        )
        if not p["fits"]:
            rows.append(f"| {name} | {p['examples_per_chip']:g} | {p['state_gib_per_chip']:.2f} | | "
                        f"{p['peak_gib']:.2f} / {p['hbm_gib_per_chip']:.2f} | {fits} | | | | | | |")  # fmt: skip
            continue
        c = p["collectives"]
        rows.append(
            f"| {name} | {p['examples_per_chip']:g} | {p['state_gib_per_chip']:.2f} | {p['temporaries_gib']:.2f} "
            f"| {p['peak_gib']:.2f} / {p['hbm_gib_per_chip']:.2f} | {fits} | "
            f"{p['compiled_flops_per_chip'] / 1e12:.3g} | {p['model_flops_per_chip'] / 1e12:.3g} | "
            f"{c['count']}, {c['bytes_per_chip'] / 1e9:.3g} | {p['roofline_sec'] * 1e3:.4g} ({p['roofline_bound']}) | "
            f"{_g(p['images_per_sec_per_chip'], 1)} | {_g(100 * (p['mfu_at_roofline'] or 0), 0)}% |"
        )
    return "\n".join(rows)


def shortfall(doc: dict) -> str | None:
    """One line naming the first program that does not fit, by how much, and the knobs; None if all fit."""
    for name, p in doc["programs"].items():
        if not p["fits"]:
            return (
                f"{name} needs {p['peak_gib']:.2f} GiB per chip on {doc['slice']['name']}, "
                f"{p['short_by_gib']:.2f} GiB more than a chip's {p['hbm_gib_per_chip']:.2f} GiB of HBM; "
                f"settings that trade memory: {'; '.join(p['knobs'])}"
            )
    return None


def main(argv) -> int:
    """CLI entry (absl flags: --config, --topology, --mesh, --programs, --out)."""
    del argv
    from absl import flags

    from semflow_jax.errors import atomic_write_bytes

    f = flags.FLAGS
    wanted = [p for p in f.programs.split(",") if p] if f.programs else None
    doc = plan(f.config, f.topology, parse_mesh(f.mesh) if f.mesh else None, wanted)
    out = f.out or f"plan-{doc['slice']['name']}.json"
    atomic_write_bytes(out, (json.dumps(doc, indent=2) + "\n").encode())
    print(f"{doc['what']} (mesh {doc['config']['mesh']}, model: {doc['model']})")
    print(table(doc))
    print(f"({NOTE}; JSON: {out})")
    line = shortfall(doc)
    if line:
        print(f"semflow_jax.plan: {line}", file=sys.stderr)
        return 1
    return 0


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/coco.py.", lock_config=False)
    flags.DEFINE_string(
        "topology", None, "TPU slice as Cloud TPU names it: v5e-8, v5p-64, v4-32, v6e-16, ..."
    )
    flags.DEFINE_string("mesh", "", "Override config.mesh: name=size pairs, e.g. data=1,fsdp=-1.")
    flags.DEFINE_string(
        "programs", "", "Comma-separated subset of the programs (default: every one the run uses)."
    )
    flags.DEFINE_string("out", "", "Where to write the JSON (default: plan-<slice>.json).")
    flags.mark_flags_as_required(["config", "topology"])


def compile_only_environment(topology: str = "") -> None:
    """Process settings for compiling without a TPU: jax computes on the CPU (it would otherwise look for a
    TPU first); libtpu is told what it would ask the TPU VM's metadata server, which is not there, and that
    other processes may load it too (its lock guards a TPU, and none is opened)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology or "v5litepod-8")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


if __name__ == "__main__":
    from semflow_jax.errors import run_cli

    compile_only_environment(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--topology=")), ""))
    _define_flags()
    run_cli(main, "semflow_jax.plan")
