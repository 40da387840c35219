"""benchmarks/run.py runs end to end on the tiny config and writes every number it promises as JSON."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package_device_env():
    """This process's environment for a benchmark subprocess with the package's own CPU device split (2), as
    a laptop user gets it (the 8 simulated ones only cost compile time there), and this suite's compile
    options (-O0, the elemental emitter)."""
    flags = " ".join(f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f)
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)


def _positive(x):
    return isinstance(x, (int, float)) and x > 0


def test_benchmark_script_writes_positive_numbers(tmp_path):
    out = tmp_path / "results" / "tiny.json"  # a directory that does not exist yet
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable, "benchmarks/run.py", "--config=configs/shapes.py:tiny",
            "--repeats=2", "--warmup=1", "--steps_per_window=3", f"--out={out}",
        ],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train step" in proc.stdout and f"wrote {out}" in proc.stdout

    result = json.loads(out.read_text())
    assert result["config_name"] == "configs/shapes.py:tiny"
    assert result["config"]["data"]["image_size"] == 16
    train = result["train"]
    for key in ("steps_per_sec", "images_per_sec"):
        s = train[key]
        assert all(_positive(s[k]) for k in ("median", "min", "max"))
        assert s["min"] <= s["median"] <= s["max"]
    assert train["images_per_sec"]["median"] == train["steps_per_sec"]["median"] * train["batch_size"]
    assert _positive(train["compile_sec"]) and _positive(train["num_params"])
    for key in ("flops_per_step_per_device", "flops_per_sec"):
        assert train[key] is None or _positive(train[key])
    assert _positive(result["input_pipeline"]["examples_per_sec"]["median"])
    assert set(result["sampler"]) == {"steps_1", "steps_25"}
    for s in result["sampler"].values():
        assert _positive(s["images_per_sec"]["median"]) and _positive(s["compile_sec"])
        assert s["batch_size"] == 8
    assert _positive(result["memory"]["peak_rss_mib"])
    env_info = result["environment"]
    assert env_info["platform"] == "cpu" and _positive(env_info["device_count"])
    for key in ("jax", "jaxlib", "flax", "device_kind", "date"):
        assert env_info[key]


def test_benchmark_script_refuses_bad_settings(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--config=configs/shapes.py:tiny", "--repeats=0"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("benchmarks.run: error:") and "--repeats" in proc.stderr


def test_data_benchmark_measures_both_paths(tmp_path):
    out = tmp_path / "data.json"
    proc = subprocess.run(
        [
            sys.executable, "benchmarks/data.py", "--num_images=16", "--source_width=96", "--source_height=64",
            "--size=32", "--batch_size=4", "--batches=2", "--repeats=2", f"--out={out}",
        ],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for fmt in ("raw", "arrayrecord"):
        for key in ("examples_per_sec_per_core", "examples_per_sec_all_cores"):
            assert _positive(result[fmt][key]["median"])
    assert _positive(result["convert_sec"]) and "generated" in result["dataset"]


def test_suite_quick_measures_every_promised_number(tmp_path):
    """benchmarks/suite.py --quick (JAX alone, as CI has no torch): the JSON and the Markdown report."""
    out = tmp_path / "suite"
    env = _package_device_env()
    proc = subprocess.run(
        [sys.executable, "benchmarks/suite.py", "--quick", "--no-torch", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "suite.json").read_text())
    assert _positive(result["peak"]["xla_flops_per_sec"])
    s = result["sizes"]["tiny"]
    train, sampler = s["train"], s["sampler"]
    assert _positive(train["jax_per_sec"]["median"]) and _positive(train["compile_sec"])
    assert train["flops_per_step"] is None or _positive(train["flops_per_sec"])
    for n in (1, 5, 25):
        e = sampler[f"steps_{n}"]
        assert e["jax_per_sec"]["min"] <= e["jax_per_sec"]["median"] <= e["jax_per_sec"]["max"]
        assert _positive(e["vs_forward_times_n"]) and "ratio" not in e  # no twin without torch
    assert set(sampler["compile_sec"]) == {"1", "5", "25", "100"} and _positive(sampler["compile_100_vs_1"])
    assert _positive(s["train_bf16"]["jax_per_sec"]["median"])
    for e in (train, s["train_bf16"], sampler["forward"], sampler["steps_25"]):
        cpu = e["jax_cpu_sec_per_window"]  # a window's CPU time: at least some user time, never negative
        assert _positive(cpu["user"]) and cpu["system"] >= 0
    assert _positive(s["sampler_bf16"]["steps_25"]["jax_per_sec"]["median"])
    assert _positive(s["input_pipeline"]["vs_train_consumption"]) and _positive(
        s["memory"]["peak_rss_mib_jax"]
    )
    assert s["twin"] == "not measured (--no-torch)"
    assert _positive(sampler["forward"]["jax_per_sec"]["median"]) and "ratio" not in sampler["forward"]
    assert sampler["forward_sec"] == pytest.approx(
        sampler["batch_size"] / sampler["forward"]["jax_per_sec"]["median"]
    )
    (alone,) = result["sampler_by_devices"]  # the tiny sampler alone, in a process of its own with 2 devices
    assert alone["size"] == "tiny" and alone["devices"] == 2
    assert _positive(alone["forward_sec"]) and _positive(alone["vs_forward_times_n"])
    assert set(alone["fresh_mib_per_call"]) == {"forward", "sample_25"}
    assert all(v >= 0 for v in alone["fresh_mib_per_call"].values())
    report = (tmp_path / "suite.md").read_text()
    assert "| sampler N = 25, images/s" in report and "GFLOP/s" in report
    assert "| forward pass (the network once" in report and "| tiny | 2 |" in report
    assert "CPU time per JAX window, user + system" in report


def test_accelerator_benchmark_runs_its_parts_on_any_backend(tmp_path):
    """benchmarks/accelerator.py --quick on this CPU: the measured matmul rates and the SD-sized step (tiny
    SD models here), FLOPs from XLA's cost analysis, the report; the twin comparison is the suite's
    measure_size (tested above), so its part is left out here to keep the suite's time."""
    out = tmp_path / "acc" / "accelerator"  # a folder that does not exist yet
    env = _package_device_env()
    proc = subprocess.run(
        [sys.executable, "benchmarks/accelerator.py", "--quick", "--no-torch", "--parts=peak,sd15", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "acc" / "accelerator.json").read_text())
    assert result["environment"]["backend"] == "cpu" and set(result["parts"]) == {"peak", "sd15"}
    peak, sd = result["parts"]["peak"], result["parts"]["sd15"]
    assert _positive(peak["bfloat16_flops_per_sec"]) and _positive(peak["float32_flops_per_sec"])
    assert peak["published_bf16_flops_per_sec"] is None  # a CPU is not in the table
    assert sd["model"] == "tiny" and sd["compute_dtype"] == "bfloat16" and sd["remat"] is False
    assert sd["latent_size"] == [16, 16]  # the tiny VAE halves the 32^2 images
    r = sd["images_per_sec"]
    assert 0 < r["min"] <= r["median"] <= r["max"]
    assert sd["step_sec"] == pytest.approx(sd["devices"] * sd["batch_per_device"] / r["median"])
    assert _positive(sd["flops_per_step"]) and _positive(sd["last_loss"]) and _positive(sd["last_grad_norm"])
    assert sd["flops_per_sec"] == pytest.approx(sd["flops_per_step"] / sd["step_sec"])
    report = (tmp_path / "acc" / "accelerator.md").read_text()
    assert (
        "## SD-1.5-sized train step (tiny, bf16_paper" in report and "of the measured bfloat16 rate" in report
    )


def test_accelerator_benchmark_refuses_bad_settings_in_one_line(tmp_path):
    for bad, named in (("--parts=peak,nope", "part 'nope'"), ("--sd_variant=fp8", "SD variant 'fp8'"),
                       ("--sd_batch=0", "--sd_batch=0")):  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "benchmarks/accelerator.py", bad, f"--out={tmp_path / 'x'}"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2 and named in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("benchmarks/accelerator.py: error:")
        assert not list(tmp_path.iterdir())  # nothing written


def test_a_failing_accelerator_part_is_one_line_in_the_report_and_exit_1(tmp_path):
    out = tmp_path / "accelerator"
    env = _package_device_env()  # 2 devices: too few for the variant's 8
    proc = subprocess.run(
        [sys.executable, "benchmarks/accelerator.py", "--quick", "--parts=sd15", "--sd_variant=bf16_remat_fsdp8",
         f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"accelerator.py: error: parts failed: sd15 (see {out}.md)"
    failure = json.loads((tmp_path / "accelerator.json").read_text())["parts"]["sd15"]
    assert (
        failure == "failed: ValueError: variant bf16_remat_fsdp8 shards its state over 8 devices; there are 2"
    )
    assert f"Part `sd15`: {failure}" in (tmp_path / "accelerator.md").read_text()


def test_published_peaks_match_device_kinds():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import accelerator

    assert accelerator.published_bf16_peak("NVIDIA H200") == 989e12
    assert accelerator.published_bf16_peak("NVIDIA H100 PCIe") == 756e12  # before the SXM part's "H100"
    assert accelerator.published_bf16_peak("TPU v5 lite") == 197e12  # before "TPU v5" (v5p)
    assert accelerator.published_bf16_peak("cpu") is None


def test_with_device_count_replaces_or_adds_the_option():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import suite

    opt = "--xla_force_host_platform_device_count"
    assert suite.with_device_count("", 1) == f"{opt}=1"
    assert suite.with_device_count(f"--a=1 {opt}=8 --b", 2) == f"--a=1 --b {opt}=2"


def test_attribution_finds_every_convolution_of_the_unet():
    """benchmarks/attribution.py times the convolutions it reads from the jaxpr: all of them, with their shapes."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import attribution

    from configs import shapes as shapes_config
    from semflow_jax.models import build_model

    config = shapes_config.get_config("tiny")
    model = build_model(config)
    z, t = jnp.zeros((2, 16, 16, 3)), jnp.full((2,), 0.5)
    params = model.init(jax.random.PRNGKey(0), z, t)["params"]
    calls = attribution.conv_calls(model, params, z, t)
    sites = attribution.conv_sites(calls)
    kernels = sorted(x.shape for x in jax.tree.leaves(params) if x.ndim == 4)
    # Every Conv's HWIO kernel once, but: an upsampling one ("up<level>") runs as four 2x2 convolutions, a
    # decoder block's first one ("up<level>_res<i>/conv1") as one per part of [h, skip] (models/layers.py).
    upsampling = [k for k in params if re.fullmatch(r"up\d+", k)]
    decoder = [k for k in params if re.fullmatch(r"up\d+_res\d+", k)]
    assert upsampling and decoder
    assert sum(n for _, n in sites) == len(kernels) + 3 * len(upsampling) + len(decoder)
    assert sum(n for s, n in sites if s["rhs"][:2] == (2, 2)) == 4 * len(upsampling)
    assert all(s["lhs"][0] == 2 for s, _ in sites)  # the batch the pass was traced with
    # The twin's list: one convolution per Conv parameter, the upsampling ones at twice their input's size.
    twin = attribution.textbook_sites(calls)
    assert sorted(s["rhs"] for s, n in twin for _ in range(n)) == kernels
    assert all(s["lhs"][3] == s["rhs"][2] for s, _ in twin)
    ups = [
        s for s, _ in twin if s["rhs"][:2] == (3, 3) and s["lhs"][1] > 8 and s["padding"] == ((1, 1), (1, 1))
    ]
    assert any(s["lhs"][1:3] == (16, 16) and s["params"]["padding"] == ((1, 1), (1, 1)) for s in ups)


def test_layer_benchmark_cases_share_parameters():
    """benchmarks/layers.py: each textbook layer's parameters fit ours, leaf for leaf (shapes only; that they
    then give the same output is checked by the timing loop below, which refuses a case that differs)."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import layers as layer_bench

    for name, shape, textbook, ours, _tolerance in layer_bench.cases():
        shapes = shape if isinstance(shape[0], tuple) else (shape,)  # several: one tuple of arrays
        xs = tuple(jax.ShapeDtypeStruct((1, *s[1:]), jnp.float32) for s in shapes)
        x = xs if isinstance(shape[0], tuple) else xs[0]
        want, got = (jax.eval_shape(m.init, jax.random.PRNGKey(1), x) for m in (textbook, ours))
        assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, want), name


def test_layer_benchmark_times_both_forms_of_every_case():
    """benchmarks/layers.py's timing loop end to end, at batch 1 and one window."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import layers as layer_bench

    rows = layer_bench.measure(repeats=1, batch=1)
    assert len(rows) == len(layer_bench.cases())
    for row in rows:
        assert row["max_rel_diff"] < row["tolerance"] <= 2**-6
        for kind in ("forward", "forward_backward"):
            r = row[kind]
            assert _positive(r["textbook_ms"]) and _positive(r["ours_ms"])
            assert r["speedup"] == pytest.approx(r["textbook_ms"] / r["ours_ms"])
        assert layer_bench.markdown_row(row).startswith("|")
