"""The launch scripts: --dry-run prints exactly what would run; bad arguments exit 2 with the usage line."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, *args):
    return subprocess.run(
        ["bash", os.path.join(ROOT, "launch", script), *args], capture_output=True, text=True, timeout=60
    )


def test_local_dry_run_prints_train_then_eval():
    r = launch("local.sh", "configs/shapes.py", "runs/x", "--dry-run", "--config.train.steps=5")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].endswith(
        "-m semflow_jax.train --config=configs/shapes.py --workdir=runs/x --config.train.steps=5"
    )
    assert lines[1].endswith(
        "-m semflow_jax.eval --config=configs/shapes.py --workdir=runs/x --config.train.steps=5"
    )


@pytest.mark.parametrize(
    "tpu_type, processes, devices",
    [("v4-32", 4, 16), ("v5litepod-16", 4, 16), ("v5litepod-8", 1, 8), ("v5p-128", 16, 64), ("v3-8", 1, 8)],
)
def test_tpu_pod_dry_run(tpu_type, processes, devices):
    r = launch(
        "tpu_pod.sh",
        "--name=sf",
        "--zone=us-central2-b",
        f"--type={tpu_type}",
        "--spot",
        "--dry-run",
        "configs/shapes.py",
        "/mnt/shared/run",
        "--config.train.steps=7",
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"tpu-vm create sf --zone=us-central2-b --accelerator-type={tpu_type}" in out and "--spot" in out
    ssh = [x for x in out.splitlines() if " ssh sf " in x]
    assert len(ssh) == 2 and all("--worker=all" in x for x in ssh)  # install, then the job, on every worker
    assert "pip install" in ssh[0] and "jax[tpu]" in ssh[0]
    job = ssh[1]
    assert job.count(f"--expect_processes={processes} --expect_devices={devices}") == 2  # train and eval
    assert "-m semflow_jax.train --config=configs/shapes.py --workdir=/mnt/shared/run" in job
    assert ("--distributed" in job) == (processes > 1)
    assert "--config.train.steps=7" in job
    assert not os.path.exists("/mnt/shared/run")  # a dry run touches nothing


def test_gpu_slurm_dry_run_prints_the_batch_script():
    r = launch(
        "gpu_slurm.sh",
        "--nodes=2",
        "--gpus-per-node=8",
        "--requeue",
        "--dry-run",
        "configs/shapes.py",
        "/shared/r",
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --requeue",
    ):
        assert line in out
    assert "--expect_processes=2 --expect_devices=16 --distributed" in out
    assert out.count("srun ") == 2


@pytest.mark.parametrize(
    "script, args",
    [
        ("local.sh", ["configs/shapes.py"]),
        ("tpu_pod.sh", ["--zone=z", "--type=v4-8", "configs/shapes.py", "w"]),
        ("tpu_pod.sh", ["--name=n", "--zone=z", "--type=v4-big", "configs/shapes.py", "w"]),
        ("gpu_slurm.sh", ["--nodes=0", "--gpus-per-node=8", "configs/shapes.py", "w"]),
    ],
)
def test_bad_arguments_exit_2(script, args):
    r = launch(script, *args)
    assert r.returncode == 2 and r.stderr.strip() and len(r.stderr.strip().splitlines()) == 1, r.stderr
