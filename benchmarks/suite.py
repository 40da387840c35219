"""The benchmark suite, one command: `python benchmarks/suite.py` -> benchmarks/results/suite.{json,md}.

For the `shapes` config (32x32, 1.1M parameters) and the mid-size one (`shapes.py:mid`, 64x64, 4.4M):
the jitted train step of semflow_jax/train.py (images/s, compile seconds, FLOPs from XLA's cost analysis,
achieved FLOP/s as a fraction of this machine's matmul peak), the sampler (images/s at N = 1, 5, 25 against
one forward pass times N; compile seconds at N = 1 and N = 100), the input pipeline (examples/s against what
the train step consumes), peak memory, and bfloat16 compute. Beside each, the PyTorch twin of the same model
(benchmarks/torch_twin.py: same blocks, the parameters copied over, the outputs checked equal first), run
in a process of its own (benchmarks/twin_process.py says why) and timed there, in windows alternating with
JAX's, so each ratio (JAX / twin, > 1 means JAX is faster) is a ratio of medians measured under the same
machine load; min and max are those of the per-window ratios. A last table runs
the shapes model under each candidate XLA:CPU option set, to show what the package's defaults buy.

Each measurement runs in its own subprocess (its own XLA options, its own peak memory); the persistent
compilation cache is off, so compile times are real. `--quick` is a smoke run on the tiny config (seconds;
the tests run it). Needs `pip install -r requirements-benchmarks.txt` for the twin (torch, CPU); without
torch the JAX side is measured alone and the report says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from timing import (  # noqa: E402, F401  (suite.window and suite.alternate are the other scripts' too)
    alternate,
    cpu_per_window,
    package_version,
    peak_rss_mib,
    rates,
    ratio_summary,
    summarize,
    timed,
    window,
)

SIZES = {"shapes": "", "mid": "mid", "tiny": "tiny"}  # name -> configs/shapes.py option
SAMPLE_STEPS = (1, 5, 25)
# Candidate XLA:CPU option sets for the last table ("" is XLA's own default).
XLA_CANDIDATES = (
    "",
    "--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce",
    "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,eltwise,reduce",
    "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot,dot,eltwise,reduce",
)


def package_defaults() -> str:
    """The tuning's XLA defaults on this machine (YNN fusions, with bfloat16 dots where the CPU has AMX; the
    CPU split into two devices: semflow_jax/cpu/xla_options.py)."""
    from semflow_jax.cpu import xla_options as x

    return " ".join([*x.cpu_defaults(), f"{x.DEVICE_COUNT_OPTION}={x.DEFAULT_CPU_DEVICES}"])


# ----------------------------------------------------------------------------------------------------------
# Workers: each runs in its own process.
# ----------------------------------------------------------------------------------------------------------
def measure_peak(repeats: int) -> dict:
    """This machine's float32 matmul FLOP/s (2048^3, the best of `repeats`), by XLA and by torch."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, a).block_until_ready()
    best = min(timed(lambda: mm(a, a).block_until_ready()) for _ in range(max(3, repeats)))
    out = {"matmul_size": n, "xla_flops_per_sec": 2 * n**3 / best, "torch_flops_per_sec": None}
    try:
        import torch
    except ImportError:
        return out
    x = torch.ones(n, n)
    x @ x
    best = min(timed(lambda: x @ x) for _ in range(max(3, repeats)))
    out["torch_flops_per_sec"] = 2 * n**3 / best
    return out


class JaxSide:
    """The JAX train step and sampler of one config, built as semflow_jax builds them, on this process."""

    def __init__(
        self, config, sampler_batch: int, sample_steps=(*SAMPLE_STEPS, 100), with_train: bool = True
    ):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from run import compiled_flops, timed_compile

        from semflow_jax import flow, sharding
        from semflow_jax.data import pipeline
        from semflow_jax.models import velocity_fn
        from semflow_jax.sampling import make_sampler
        from semflow_jax.train import build_training

        self.config, self.jax = config, jax
        mesh = sharding.train_mesh(config)
        data_sharding = sharding.batch_sharding(mesh)
        self.model, self.state, state_sharding, step = build_training(config, mesh)
        self.iterator = pipeline.train_iterator(config)
        self.host_batches = [next(self.iterator) for _ in range(4)]
        self.batches = [
            {k: jax.make_array_from_process_local_data(data_sharding, b[k]) for k in ("image", "label")}
            for b in self.host_batches
        ]
        self.train_step = self.train_compile_sec = self.train_flops = None
        if with_train:  # without: the sampler alone, on the initial parameters
            self.train_step, self.train_compile_sec = timed_compile(step, self.state, self.batches[0])
            per_device = compiled_flops(self.train_step)  # XLA's cost analysis counts one device's share
            self.train_flops = per_device * mesh.size if per_device else None
        self.batch_size = int(config.train.batch_size)
        self.step_count = 0

        # The sampler on the mesh eval.py builds (all devices; training may span fewer: train.cpu_devices).
        eval_mesh = sharding.mesh_from_config(config.mesh)
        replicated = sharding.replicated(eval_mesh)
        params_sharding = jax.tree.map(lambda _: replicated, state_sharding["params"])
        self.params_sharding = params_sharding
        self.sync_sample_params()
        self.sampler = make_sampler(config, eval_mesh, params_sharding)
        images = np.concatenate([b["image"] for b in self.host_batches])
        reps = -(-sampler_batch // len(images))
        self.sampler_images = np.concatenate([images] * reps)[:sampler_batch]
        z = flow.image_to_flow(jnp.asarray(self.sampler_images))
        self.z = jax.device_put(z, self.sampler.batch_sharding)
        self.direction = jnp.float32(1.0)
        self.sample_fns, self.sample_compile_sec = {}, {}
        for n in sample_steps:
            fn, sec = timed_compile(
                self.sampler.compiled(n, "euler"), self.sample_params, self.z, self.direction
            )
            self.sample_compile_sec[n] = sec
            self.sample_fns[n] = fn
        # One forward pass as one step of the sampler makes it: the same network call (every example at the
        # same t), the same shardings, compiled on its own; against it, images/s at N steps shows what the
        # integrator adds.
        model, batch_sharding = self.model, self.sampler.batch_sharding
        self.forward, _ = timed_compile(
            jax.jit(
                lambda p, z, t: velocity_fn(model, p)(z, jnp.full((z.shape[0],), t)),
                in_shardings=(params_sharding, batch_sharding, replicated),
                out_shardings=batch_sharding,
            ),
            self.sample_params,
            self.z,
            jnp.float32(0.5),
        )
        self.t = jax.device_put(jnp.float32(0.5), replicated)

    def sync_sample_params(self):
        """The sampler's (and forward pass's) copy of the parameters, from the current train state."""
        # A fresh copy first: the train step donates the state's buffers, and device_put onto a larger mesh
        # reuses the source buffer for the device both meshes share (even with may_alias=False, jax 0.10.2).
        fresh = self.jax.tree.map(self.jax.numpy.copy, self.state["params"])
        self.sample_params = self.jax.device_put(fresh, self.params_sharding)

    def train(self, steps: int):
        """Runs `steps` train steps on device batches and waits for them."""
        for _ in range(steps):
            self.state, metrics = self.train_step(
                self.state, self.batches[self.step_count % len(self.batches)]
            )
            self.step_count += 1
        self.jax.block_until_ready((self.state, metrics))
        return metrics

    def sample(self, n: int):
        """Integrates the sampler batch image -> mask in n Euler steps."""
        return self.sample_fns[n](self.sample_params, self.z, self.direction).block_until_ready()

    def forward_once(self):
        """One forward pass of the velocity network on the sampler batch."""
        return self.forward(self.sample_params, self.z, self.t).block_until_ready()

    def pipeline_rate(self, repeats: int, batches_per_window: int) -> list[float]:
        """Examples/s of the input pipeline alone (its prefetch buffer drained first)."""
        for _ in range(int(self.config.data.prefetch) + 2):
            next(self.iterator)
        rates = []
        for _ in range(repeats):
            sec = timed(lambda: [next(self.iterator) for _ in range(batches_per_window)])
            rates.append(batches_per_window * self.batch_size / sec)
        return rates


PARITY_TOLERANCE = 1e-4  # float32 twins agree to about 1e-6 relative; a wrong port is off by far more
TF32_PARITY_TOLERANCE = 2e-2  # TF32 products round to about 5e-4 relative each; a wrong port is off by O(1)


def check_parity(max_rel_diff: float, tolerance: float = PARITY_TOLERANCE) -> None:
    """Refuses to time a twin whose velocity differs from JAX's on the same weights (a different model)."""
    if not max_rel_diff <= tolerance:  # NaN fails too
        raise RuntimeError(
            f"the twin's output differs from JAX's by {max_rel_diff:.1e} relative (tolerance "
            f"{tolerance:.0e}): benchmarks/torch_twin.py no longer matches the JAX UNet"
        )


def start_twin(stack: contextlib.ExitStack, jax_side: JaxSide, params_bf16=None, device: str = "cpu"):
    """The twin of jax_side in its own process (closed with `stack`), built on torch's `device` and checked
    equal to JAX.

    Returns (TwinProcess, the setup reply: torch version, threads, device, size, parity). With params_bf16,
    a bfloat16 (autocast) twin on those weights is built too.
    """
    from twin_process import TwinProcess, write_setup

    from semflow_jax import flow

    config = jax_side.config
    twin = stack.enter_context(TwinProcess())
    setup = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "twin.pkl")
    write_setup(
        setup,
        config,
        jax_side.jax.device_get(jax_side.state["params"]),
        params_bf16,
        jax_side.host_batches,
        jax_side.z,
        flow.anchors_for(config.data.num_classes, config.anchors.base, config.anchors.spacing),
        jax_side.forward_once(),
    )
    info = twin.call("setup", path=setup, device=device)
    # On a GPU both sides may run float32 convolutions in TF32 (10-bit mantissas): the port itself is held
    # to PARITY_TOLERANCE on the CPU, where both compute in full float32.
    check_parity(info["parity_max_rel_diff"], PARITY_TOLERANCE if device == "cpu" else TF32_PARITY_TOLERANCE)
    return twin, info


def twin_available() -> str | None:
    """None when the twin can run here, else why not (torch is looked up, never imported in this process)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "not measured: torch is not installed (pip install -r requirements-benchmarks.txt)"
    return None


def measure_size(
    name: str,
    repeats: int,
    with_torch: bool,
    device: str = "cpu",
    train_batch: int | None = None,
    sample_batch: int | None = None,
    steps_per_window: int | None = None,
) -> dict:
    """Every measurement of one model size: JAX float32 and bfloat16, the twin (own process) beside each.

    device is the twin's torch device (JAX's is its default backend's); the batch sizes default to the
    config's, train steps per window to what takes about a second on this CPU.
    """
    import ml_collections

    from configs import shapes as shapes_config

    config = shapes_config.get_config(SIZES[name])
    config.train.ema_decay = 0.999  # both sides keep an EMA, as the demo does
    if train_batch:
        config.train.batch_size = int(train_batch)
    if sample_batch:
        config.eval.batch_size = int(sample_batch)
    sampler_batch = int(config.eval.batch_size)
    steps_per_window = steps_per_window or {"shapes": 5, "mid": 1, "tiny": 3}[name]
    out = {"config": f"configs/shapes.py{':' + SIZES[name] if SIZES[name] else ''}"}

    jax_f32 = JaxSide(config, sampler_batch)
    jax_f32.train(2)  # off the zero-initialized output layers, so the parity check sees every path
    jax_f32.sync_sample_params()
    num_params = sum(x.size for x in jax_f32.jax.tree.leaves(jax_f32.state["params"]))
    pipe = jax_f32.pipeline_rate(repeats, steps_per_window * 2)
    bf16_config = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
    bf16_config.model.dtype = "bfloat16"
    jax_bf16 = JaxSide(bf16_config, sampler_batch, sample_steps=(25,))

    why_not = "not measured (--no-torch)" if not with_torch else twin_available()
    with contextlib.ExitStack() as stack:
        twin = None
        if why_not:
            out["twin"] = why_not
        else:
            bf16_params = jax_bf16.jax.device_get(jax_bf16.state["params"])
            twin, out["twin"] = start_twin(stack, jax_f32, bf16_params, device)

        def pair(jax_fn, twin_key, count, items):
            twin_fn = twin and (lambda: twin.call("window", key=twin_key, count=count))
            return (jax_fn, twin_fn, items)

        b, sb, k = jax_f32.batch_size, sampler_batch, steps_per_window
        pairs = {
            "forward": pair(jax_f32.forward_once, "forward", 1, sb),
            "train": pair(lambda: jax_f32.train(k), "train", k, b * k),
            **{f"sample_{n}": pair(lambda n=n: jax_f32.sample(n), "sample", n, sb) for n in SAMPLE_STEPS},
            "train_bf16": pair(lambda: jax_bf16.train(k), "train_bf16", k, b * k),
            "sample_25_bf16": pair(lambda: jax_bf16.sample(25), "sample_bf16", 25, sb),
        }
        windows = alternate(pairs, repeats)
        out["memory"] = {"peak_rss_mib_jax": peak_rss_mib()}
        if twin:
            out["memory"]["peak_rss_mib_twin"] = twin.call("peak_rss_mib")

    def entry(key):
        items = pairs[key][2]
        jax_windows, twin_windows = windows[key]
        jax_rates = rates(jax_windows, items)
        e = {"jax_per_sec": summarize(jax_rates), "jax_cpu_sec_per_window": cpu_per_window(jax_windows)}
        if twin_windows:
            twin_rates = rates(twin_windows, items)
            e["twin_per_sec"] = summarize(twin_rates)
            e["twin_cpu_sec_per_window"] = cpu_per_window(twin_windows)
            e["ratio"] = ratio_summary(jax_rates, twin_rates)
        return e

    train = entry("train")
    train.update(
        batch_size=b,
        steps_per_window=steps_per_window,
        num_params=num_params,
        compile_sec=jax_f32.train_compile_sec,
        flops_per_step=jax_f32.train_flops,
        flops_per_sec=(jax_f32.train_flops or 0) * train["jax_per_sec"]["median"] / b or None,
    )
    forward = entry("forward")
    forward_sec = sb / forward["jax_per_sec"]["median"]
    sampler = {"batch_size": sb, "forward": forward, "forward_sec": forward_sec}
    for n in SAMPLE_STEPS:
        e = entry(f"sample_{n}")
        # Against one forward pass times N: what the integrator adds beyond the network (1.0 = nothing).
        e["vs_forward_times_n"] = e["jax_per_sec"]["median"] / (sb / (forward_sec * n))
        sampler[f"steps_{n}"] = e
    sampler["compile_sec"] = {str(n): s for n, s in jax_f32.sample_compile_sec.items()}
    sampler["compile_100_vs_1"] = jax_f32.sample_compile_sec[100] / jax_f32.sample_compile_sec[1]
    out.update(
        train=train,
        sampler=sampler,
        train_bf16={**entry("train_bf16"), "compile_sec": jax_bf16.train_compile_sec},
        sampler_bf16={"steps_25": entry("sample_25_bf16")},
        input_pipeline={
            "examples_per_sec": summarize(pipe),
            "vs_train_consumption": statistics.median(pipe) / train["jax_per_sec"]["median"],
        },
    )
    return out


def measure_xla_option(repeats: int) -> dict:
    """The shapes model's train step and 25-step sampler under this process's XLA_FLAGS (JAX only)."""
    from configs import shapes as shapes_config

    config = shapes_config.get_config()
    side = JaxSide(config, int(config.eval.batch_size), sample_steps=(25,))
    train, sample = [], []
    side.train(5)
    side.sample(25)
    for _ in range(repeats):
        train.append(5 * side.batch_size / timed(lambda: side.train(5)))
        sample.append(int(config.eval.batch_size) / timed(lambda: side.sample(25)))
    return {
        "train_images_per_sec": summarize(train),
        "sample_25_images_per_sec": summarize(sample),
        "train_compile_sec": side.train_compile_sec,
    }


def measure_sampler_alone(name: str, repeats: int) -> dict:
    """JAX alone on this process's devices: one forward pass and the 25-step sampler, alternating windows.

    Also counts the memory each call touches fresh (minor page faults): XLA:CPU allocates a call's
    temporary buffer anew on every call, and glibc maps one that large fresh from the OS each time (it is
    above glibc's mmap threshold, at most 32 MiB), so a lone forward pass pays that once per step where the
    sampler pays it once per N steps.
    """
    import resource

    from configs import shapes as shapes_config

    config = shapes_config.get_config(SIZES[name])
    sb = int(config.eval.batch_size)
    side = JaxSide(config, sb, sample_steps=(25,), with_train=False)
    faults = {"forward": [], "sample_25": []}

    def counting(key, fn):
        def run():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            faults[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

        return run

    windows = alternate(
        {
            "forward": (counting("forward", side.forward_once), None, sb),
            "sample_25": (counting("sample_25", lambda: side.sample(25)), None, sb),
        },
        repeats,
    )
    forward, sample = (rates(windows[k][0], sb) for k in ("forward", "sample_25"))
    page_mib = resource.getpagesize() / 2**20
    return {
        "devices": int(side.z.sharding.mesh.size),
        "forward_sec": sb / statistics.median(forward),
        "sample_25_images_per_sec": summarize(sample),
        "vs_forward_times_n": statistics.median(sample) / (statistics.median(forward) / 25),
        "fresh_mib_per_call": {k: statistics.median(v) * page_mib for k, v in faults.items()},
    }


def with_device_count(xla_flags: str, count: int) -> str:
    """xla_flags with the CPU device count option set to count (replacing one already there)."""
    from semflow_jax.cpu.xla_options import DEVICE_COUNT_OPTION

    kept = [f for f in xla_flags.split() if not f.startswith(DEVICE_COUNT_OPTION + "=")]
    return " ".join([*kept, f"{DEVICE_COUNT_OPTION}={count}"])


def worker(task: str, repeats: int, with_torch: bool, out_path: str) -> None:
    """Runs one task in this process and writes its JSON to out_path."""
    if task == "peak":
        result = measure_peak(repeats)
    elif task == "xla":
        result = measure_xla_option(repeats)
    elif task.startswith("sampler-"):
        result = measure_sampler_alone(task.removeprefix("sampler-"), repeats)
    else:
        result = measure_size(task, repeats, with_torch)
    with open(out_path, "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------------------------------------
# Orchestrator.
# ----------------------------------------------------------------------------------------------------------
def run_worker(task: str, repeats: int, with_torch: bool, env_update: dict | None = None) -> dict:
    """Runs a worker subprocess; its JSON, or a RuntimeError with the last line it printed."""
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # real compile times
    env["SEMFLOW_COMPILATION_CACHE"] = "0"
    env.update(env_update or {})
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        argv = [
            sys.executable,
            os.path.abspath(__file__),
            f"--worker={task}",
            f"--repeats={repeats}",
            f"--json={out}",
        ]
        if not with_torch:
            argv.append("--no-torch")
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [x for x in proc.stderr.strip().splitlines() if x.strip()] or ["(nothing printed)"]
            raise RuntimeError(f"benchmark worker {task!r} failed: {lines[-1]}")
        with open(out) as f:
            return json.load(f)


def environment() -> dict:
    """Versions, the CPU, XLA_FLAGS as the CPU tuning set them (main's first step), and the date."""
    import platform

    from semflow_jax.cpu import malloc_options

    v = package_version
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "jax": v("jax"),
        "jaxlib": v("jaxlib"),
        "flax": v("flax"),
        "torch": v("torch"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # The workers and the twin's process make the same tuning call, so JAX and the twin run under these alike.
        "mallopt": dict(malloc_options.APPLIED),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _r(e, key="ratio"):
    r = e.get(key)
    return f"**{r['median']:.2f}x** ({r['min']:.2f}-{r['max']:.2f})" if r else "-"


def _v(e, key):
    """A rate to three significant digits (1.34, 33.0, 446): one decimal hides the mid sampler's differences."""
    s = e.get(key)
    if not s:
        return "-"
    x = s["median"]
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _mallopt_text(applied: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (applied or {}).items()) or "(glibc defaults)"


def size_markdown(name: str, s: dict, peak_flops: float, peak_name: str = "the matmul peak") -> list[str]:
    """The report's lines for one model size: the JAX / twin table, then compile, FLOP/s, CPU time, memory."""
    lines = []
    twin = s.get("twin")
    lines += ["", f"## {name} (`{s['config']}`, {s['train']['num_params'] / 1e6:.2f}M parameters)", ""]
    if isinstance(twin, dict):
        where = f"{twin['threads']} threads"
        if twin.get("device", "cpu") != "cpu":  # a GPU: which, and whether float32 meant TF32 there
            tf32 = twin.get("tf32") or {}
            where = f"{twin['device']} ({twin.get('device_name')}), TF32 convolutions {tf32.get('cudnn')}, "
            where += f"TF32 matmuls {tf32.get('matmul')}, cuDNN autotuned"
        lines.append(
            f"Twin: torch {twin['torch']}, {where}, {twin['num_params'] / 1e6:.2f}M "
            f"parameters, outputs equal to {twin['parity_max_rel_diff']:.1e} relative."
        )
    elif twin:
        lines.append(f"Twin: {twin}")
    tr, sa = s["train"], s["sampler"]
    lines += [
        "",
        "| measurement | JAX | PyTorch twin | JAX / twin |",
        "|---|---|---|---|",
        f"| train step, float32, images/s (batch {tr['batch_size']}) | {_v(tr, 'jax_per_sec')} | "
        f"{_v(tr, 'twin_per_sec')} | {_r(tr)} |",
        f"| train step, bfloat16 compute, images/s | {_v(s['train_bf16'], 'jax_per_sec')} | "
        f"{_v(s['train_bf16'], 'twin_per_sec')} (autocast) | {_r(s['train_bf16'])} |",
    ]
    e = sa["forward"]
    lines.append(
        f"| forward pass (the network once, as one sampler step), images/s | {_v(e, 'jax_per_sec')} | "
        f"{_v(e, 'twin_per_sec')} | {_r(e)} |"
    )
    for n in SAMPLE_STEPS:
        e = sa[f"steps_{n}"]
        lines.append(
            f"| sampler N = {n}, images/s (batch {sa['batch_size']}) | {_v(e, 'jax_per_sec')} | "
            f"{_v(e, 'twin_per_sec')} | {_r(e)} |"
        )
    e = s["sampler_bf16"]["steps_25"]
    lines.append(
        f"| sampler N = 25, bfloat16, images/s | {_v(e, 'jax_per_sec')} | {_v(e, 'twin_per_sec')} | {_r(e)} |"
    )
    flops = tr["flops_per_sec"]
    pipe = s["input_pipeline"]
    lines += [
        "",
        f"- Train step: compile {tr['compile_sec']:.1f} s; "
        + (
            f"{tr['flops_per_step'] / 1e9:.2f} GFLOP per step, {flops / 1e9:.0f} GFLOP/s achieved = "
            f"{100 * flops / peak_flops:.0f}% of {peak_name}."
            if flops
            else "FLOPs not reported."
        ),
        *(
            f"- CPU time per {side} window, user + system (the kernel's: page faults of memory mapped fresh): "
            + ", ".join(
                f"{label} {e[key]['user']:.2f} + {e[key]['system']:.2f} s"
                for label, e in (
                    (f"train float32 ({tr['steps_per_window']} step(s))", tr),
                    ("bfloat16", s["train_bf16"]),
                    ("forward pass", sa["forward"]),
                    ("sampler N = 25", sa["steps_25"]),
                )
            )
            + "."
            for side, key in (("JAX", "jax_cpu_sec_per_window"), ("twin", "twin_cpu_sec_per_window"))
            if key in tr
        ),
        f"- Sampler: one forward pass {1000 * sa['forward_sec']:.1f} ms; images/s at N steps / (one pass x N): "
        + ", ".join(f"N = {n}: {sa[f'steps_{n}']['vs_forward_times_n']:.2f}" for n in SAMPLE_STEPS)
        + f". Compile {sa['compile_sec']['1']:.2f} s at N = 1, {sa['compile_sec']['100']:.2f} s at N = 100 "
        f"({sa['compile_100_vs_1']:.2f}x).",
        f"- Input pipeline {pipe['examples_per_sec']['median']:.0f} examples/s = "
        f"{pipe['vs_train_consumption']:.1f}x what the float32 train step consumes.",
        f"- Peak memory (RSS): JAX process {s['memory']['peak_rss_mib_jax']:.0f} MiB"
        + (
            f", twin process {s['memory']['peak_rss_mib_twin']:.0f} MiB."
            if "peak_rss_mib_twin" in s["memory"]
            else "."
        ),
    ]
    return lines


def markdown(result: dict) -> str:
    """The report: one table per model size, the machine, the XLA option sets."""
    env, peak = result["environment"], result["peak"]
    lines = [
        f"# semflow_jax benchmarks ({env['date'][:10]})",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores; jax {env['jax']}, flax {env['flax']}, "
        f"torch {env['torch'] or 'not installed'}. XLA_FLAGS: `{env['xla_flags'] or '(none)'}`. "
        f"mallopt (both sides): `{_mallopt_text(env.get('mallopt'))}`. "
        f"Matmul peak (float32, 2048^3): XLA {peak['xla_flops_per_sec'] / 1e9:.0f} GFLOP/s"
        + (
            f", torch {peak['torch_flops_per_sec'] / 1e9:.0f} GFLOP/s."
            if peak.get("torch_flops_per_sec")
            else "."
        ),
        "",
        "Rates are medians of alternating windows, JAX in the worker's process and the twin in a process of its",
        "own; ratio = JAX / PyTorch twin (> 1: JAX faster), with the min-max of the per-window ratios.",
    ]
    for name, s in result["sizes"].items():
        lines += size_markdown(name, s, peak["xla_flops_per_sec"])
    if result.get("sampler_by_devices"):
        lines += [
            "",
            "## The sampler against one forward pass, by CPU device count (JAX alone, one process per row)",
            "",
            "| size | CPU devices | one forward pass, ms | sampler N = 25, images/s "
            "| images/s at N = 25 / (one pass x 25) | memory paged in per call: one pass / N = 25 |",
            "|---|---|---|---|---|---|",
        ]
        for row in result["sampler_by_devices"]:
            lines.append(
                f"| {row['size']} | {row['devices']} | {1000 * row['forward_sec']:.1f} | "
                f"{row['sample_25_images_per_sec']['median']:.2f} | {row['vs_forward_times_n']:.3f} | "
                f"{row['fresh_mib_per_call']['forward']:.0f} MiB / {row['fresh_mib_per_call']['sample_25']:.0f} MiB |"
            )
    if result.get("xla_options"):
        lines += [
            "",
            "## XLA:CPU options (shapes model, JAX alone, one process per row, run one after another)",
            "",
            "| XLA_FLAGS | train images/s | sampler N = 25 images/s | train compile s |",
            "|---|---|---|---|",
        ]
        for row in result["xla_options"]:
            lines.append(
                f"| `{row['xla_flags'] or '(XLA default)'}` | {row['train_images_per_sec']['median']:.1f} | "
                f"{row['sample_25_images_per_sec']['median']:.1f} | {row['train_compile_sec']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main():
    """CLI entry (see the module docstring)."""
    p = argparse.ArgumentParser(prog="benchmarks/suite.py", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="shapes,mid", help="comma-separated: shapes, mid, tiny")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per measurement")
    p.add_argument("--out", default=os.path.join(HERE, "results", "suite"), help="writes OUT.json and OUT.md")
    p.add_argument("--quick", action="store_true", help="the tiny config, 2 repeats, no XLA option table")
    p.add_argument("--no-torch", action="store_true", help="JAX only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args()
    # As the command-line tools do, before jax starts: the orchestrator's XLA options reach every worker
    # through the environment; each worker's own call sets its malloc options (a candidate's
    # SEMFLOW_XLA_DEFAULTS=0 keeps its XLA_FLAGS as given).
    from semflow_jax.cpu import tuning

    tuning.tune()
    with_torch = not args.no_torch
    if args.worker:
        worker(args.worker, args.repeats, with_torch, args.json)
        return
    sizes = ["tiny"] if args.quick else [s for s in args.sizes.split(",") if s]
    repeats = 2 if args.quick else args.repeats
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or repeats < 1:
        print(f"suite: error: sizes must be among {sorted(SIZES)} and --repeats >= 1", file=sys.stderr)
        sys.exit(2)
    try:
        result = {"environment": environment(), "settings": {"sizes": sizes, "repeats": repeats}}
        print("measuring the matmul peak", flush=True)
        result["peak"] = run_worker("peak", repeats, with_torch)
        result["sizes"] = {}
        for name in sizes:
            print(f"measuring {name}", flush=True)
            result["sizes"][name] = run_worker(name, repeats, with_torch)
        result["sampler_by_devices"] = []
        for name in sizes:
            for count in (1, 2) if not args.quick else (2,):
                print(f"measuring the {name} sampler alone on {count} CPU device(s)", flush=True)
                flags = with_device_count(result["environment"]["xla_flags"], count)
                row = run_worker(f"sampler-{name}", repeats, False, {"XLA_FLAGS": flags})
                result["sampler_by_devices"].append({"size": name, **row})
        result["xla_options"] = []
        if not args.quick:
            for flags in (*XLA_CANDIDATES, package_defaults()):
                print(f"measuring XLA_FLAGS={flags or '(XLA default)'}", flush=True)
                row = run_worker("xla", repeats, False, {"XLA_FLAGS": flags, "SEMFLOW_XLA_DEFAULTS": "0"})
                result["xla_options"].append({"xla_flags": flags, **row})
    except RuntimeError as e:
        print(f"suite: error: {e}", file=sys.stderr)
        sys.exit(1)
    from semflow_jax.errors import atomic_write_bytes

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_bytes(args.out + ".json", (json.dumps(result, indent=2) + "\n").encode())
    report = markdown(result)
    atomic_write_bytes(args.out + ".md", report.encode())
    print(report)
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
