"""Benchmark: `python benchmarks/run.py --config=configs/shapes.py[:tiny] [--out=benchmarks/results/NAME.json]`.

Measures the jitted train step (built as semflow_jax/train.py builds it), the input pipeline, the sampler at
1 and 25 steps, compile times and peak memory for one config; prints a table and writes the numbers as JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import statistics
import sys
import time

# `python benchmarks/run.py` puts benchmarks/ on sys.path, not the repository root that holds semflow_jax.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from semflow_jax import config_lib, flow, sharding  # noqa: E402
from semflow_jax.data import pipeline  # noqa: E402
from semflow_jax.errors import SemFlowError, atomic_write_bytes  # noqa: E402
from semflow_jax.sampling import make_sampler  # noqa: E402
from semflow_jax.train import build_training  # noqa: E402

SAMPLE_STEPS = (1, 25)
PREFETCHED_BATCHES = 4


def summarize(values) -> dict:
    """{"median", "min", "max"} of a list of rates."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def timed_compile(jitted, *args, **static) -> tuple:
    """(compiled executable, seconds spent lowering and compiling it)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **static).compile()
    return compiled, time.perf_counter() - start


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call (per device) from XLA's cost analysis, or None where the backend reports none."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends raise instead of returning None
        return None
    # Older jax returns one dict per computation in a list; newer jax returns the dict itself.
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not isinstance(analysis, dict) or analysis.get("flops") is None:
        return None
    flops = float(analysis["flops"])
    return flops if flops > 0 else None


def bench_train(config, repeats: int, warmup: int, steps_per_window: int) -> tuple[dict, dict]:
    """(train and input-pipeline results, trained EMA params): the sharded, donating step on device batches."""
    mesh = sharding.train_mesh(config)
    sharding.check_batch(config.train.batch_size, mesh, "train.batch_size")
    data_sharding = sharding.batch_sharding(mesh)
    _, state, state_sharding, train_step = build_training(config, mesh)
    num_params = int(sum(x.size for x in jax.tree.leaves(state["params"])))

    it = pipeline.train_iterator(config, jax.process_index(), jax.process_count())
    # Batches already on the devices, so the timed loop measures the step and not the input pipeline.
    batches = []
    for _ in range(PREFETCHED_BATCHES):
        local = next(it)
        batches.append(
            {k: jax.make_array_from_process_local_data(data_sharding, local[k]) for k in ("image", "label")}
        )
    jax.block_until_ready(batches)

    compiled, compile_sec = timed_compile(train_step, state, batches[0])
    flops = compiled_flops(compiled)

    last = {}

    def window():
        nonlocal state
        start = time.perf_counter()
        for i in range(steps_per_window):
            state, last["metrics"] = compiled(state, batches[i % len(batches)])
        jax.block_until_ready((state, last["metrics"]))
        return steps_per_window / (time.perf_counter() - start)

    for _ in range(warmup):
        window()
    steps_per_sec = [window() for _ in range(repeats)]
    # A fast step that computes garbage is no benchmark.
    loss = float(jax.device_get(last["metrics"]["loss"]))
    if not np.isfinite(loss):
        raise SemFlowError(f"the benchmarked train step produced loss {loss}")

    # The input pipeline alone. grain's buffer refilled while the steps ran: drain it (and warm up) untimed,
    # or the first window would time a few already-made batches.
    for _ in range(int(config.data.prefetch) + warmup * steps_per_window):
        next(it)
    per_process = config.train.batch_size // jax.process_count()  # each process reads only its own share
    pipeline_rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps_per_window):
            next(it)
        pipeline_rates.append(steps_per_window * per_process / (time.perf_counter() - start))

    batch = config.train.batch_size
    steps = summarize(steps_per_sec)
    measured = {
        "train": {
            "batch_size": batch,
            "num_params": num_params,
            "steps_per_sec": steps,
            "images_per_sec": {k: v * batch for k, v in steps.items()},
            "compile_sec": compile_sec,
            # XLA counts the FLOPs of one device's share of the partitioned program; all devices together do
            # mesh.size times that. Times the median rate: the FLOP/s the step achieves, not the hardware peak.
            "flops_per_step_per_device": flops,
            "flops_per_sec": flops * mesh.size * steps["median"] if flops else None,
        },
        "input_pipeline": {"examples_per_sec": summarize(pipeline_rates)},
    }
    return measured, (state["ema"], state_sharding["ema"], mesh)


def bench_sampler(config, trained, repeats: int, warmup: int) -> dict:
    """Images/s and compile seconds of the eval sampler (image -> mask) at each of SAMPLE_STEPS.

    The sampler eval uses: jitted over the training mesh, parameters laid out as trained, batch split.
    """
    params, param_sharding, mesh = trained
    sampler = make_sampler(config, mesh, param_sharding)
    b = int(config.eval.batch_size)
    sharding.check_batch(b, mesh, "eval.batch_size")
    images = next(pipeline.eval_batches(config, min(b, int(config.data.num_val)), b))["image"]
    z = jax.device_put(flow.image_to_flow(jnp.asarray(images)), sampler.batch_sharding)
    direction = jnp.float32(1.0)
    out = {}
    for n in SAMPLE_STEPS:
        compiled, compile_sec = timed_compile(sampler.compiled(n, config.flow.solver), params, z, direction)
        rates = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, z, direction))
            if i >= warmup:
                rates.append(b / (time.perf_counter() - start))
        out[f"steps_{n}"] = {
            "num_steps": n,
            "batch_size": b,
            "images_per_sec": summarize(rates),
            "compile_sec": compile_sec,
        }
    return out


def peak_memory() -> dict:
    """Process peak RSS in MiB, and the first local device's peak bytes in use in MiB (None if not reported)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"peak_rss_mib": rss_mib, "device_peak_mib": peak / 2**20 if peak is not None else None}


def environment() -> dict:
    """Library versions, devices, CPU count, XLA_FLAGS and the time of the run."""
    import flax
    import jaxlib

    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _rate(summary: dict, unit: str) -> str:
    return f"{summary['median']:10.2f} {unit:<11} (min {summary['min']:.2f}, max {summary['max']:.2f})"


def format_table(result: dict) -> str:
    """The human-readable summary printed after a run."""
    env, train, mem = result["environment"], result["train"], result["memory"]
    flops = train["flops_per_sec"]
    lines = [
        f"benchmark {result['config_name']}  {env['device_kind']} x{env['device_count']}  "
        f"jax {env['jax']}  cpus {env['cpu_count']}",
        f"train step       {_rate(train['steps_per_sec'], 'steps/s')}",
        f"                 {_rate(train['images_per_sec'], 'images/s')}  batch {train['batch_size']}",
        f"                 compile {train['compile_sec']:.2f} s  "
        + (f"{flops / 1e9:.2f} GFLOP/s achieved" if flops else "FLOPs not reported"),
        f"input pipeline   {_rate(result['input_pipeline']['examples_per_sec'], 'examples/s')}",
    ]
    for s in result["sampler"].values():
        lines.append(
            f"sample N={s['num_steps']:<8d}{_rate(s['images_per_sec'], 'images/s')}  "
            f"batch {s['batch_size']}  compile {s['compile_sec']:.2f} s"
        )
    device_peak = mem["device_peak_mib"]
    lines.append(
        f"peak memory      RSS {mem['peak_rss_mib']:.0f} MiB  device "
        + (f"{device_peak:.0f} MiB" if device_peak is not None else "not reported")
    )
    return "\n".join(lines)


def run_benchmark(config, config_name: str, repeats: int, warmup: int, steps_per_window: int) -> dict:
    """Runs every measurement for a validated config and returns the JSON-ready result."""
    if repeats < 1 or warmup < 0 or steps_per_window < 1:
        raise SemFlowError(
            f"need --repeats >= 1, --warmup >= 0, --steps_per_window >= 1; "
            f"got {repeats}, {warmup}, {steps_per_window}"
        )
    config = config_lib.validate(config)
    measured, trained = bench_train(config, repeats, warmup, steps_per_window)
    return {
        "config_name": config_name,
        "config": json.loads(config.to_json()),
        "settings": {"repeats": repeats, "warmup": warmup, "steps_per_window": steps_per_window},
        "environment": environment(),
        **measured,
        "sampler": bench_sampler(config, trained, repeats, warmup),
        "memory": peak_memory(),
    }


def default_out(config_name: str) -> str:
    """benchmarks/results/<config file stem>[_<options>].json, e.g. shapes_tiny.json for shapes.py:tiny."""
    path, _, options = config_name.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = "_".join([stem, *filter(None, options.split(","))])
    return os.path.join(ROOT, "benchmarks", "results", f"{name}.json")


def main(argv):
    """CLI entry: --config, --out, --repeats, --warmup, --steps_per_window."""
    del argv
    from absl import flags
    from ml_collections import config_flags

    f = flags.FLAGS
    config_name = config_flags.get_config_filename(f["config"])
    result = run_benchmark(f.config, config_name, f.repeats, f.warmup, f.steps_per_window)
    out = f.out or default_out(config_name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    print(format_table(result))
    print(f"wrote {out}")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/shapes.py[:tiny].", lock_config=True
    )
    flags.DEFINE_string("out", None, "JSON output path (default benchmarks/results/<config>.json).")
    flags.DEFINE_integer("repeats", 5, "Timed windows (train, pipeline) and timed runs (sampler).")
    flags.DEFINE_integer("warmup", 2, "Untimed windows / runs before timing, after compilation.")
    flags.DEFINE_integer("steps_per_window", 10, "Train steps (and pipeline batches) per timed window.")
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    from semflow_jax.errors import run_cli

    _define_flags()
    run_cli(main, "benchmarks.run")
