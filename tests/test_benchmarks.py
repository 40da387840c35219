"""benchmarks/run.py runs end to end on the tiny config and writes every number it promises as JSON."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
