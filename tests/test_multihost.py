"""Real processes: two hosts on localhost equal one host, kill -9 then resume equals a straight run, SIGTERM
saves and exits 0. Each test launches `python -m semflow_jax.train` (and eval) as a user or launcher would."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from semflow_jax import checkpoint, config_lib, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny config with one UNet level and no attention: these tests start many processes, each compiling.
MICRO = [
    "--config=configs/shapes.py:tiny",
    "--config.model.channel_mults=(1,)",
    "--config.model.attention_resolutions=()",
    "--config.train.sample_every=1000",
]


def env(devices: int) -> dict:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")


def command(module: str, workdir, *args) -> list:
    return [sys.executable, "-m", f"semflow_jax.{module}", *MICRO, f"--workdir={workdir}", *args]


def run(module, workdir, *args, devices=8, timeout=300):
    r = subprocess.run(
        command(module, workdir, *args),
        cwd=ROOT,
        env=env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def start_two_processes(module, workdir, *args, stdout=subprocess.PIPE):
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    return [
        subprocess.Popen(
            command(
                module,
                workdir,
                *args,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={pid}",
                "--expect_processes=2",
                "--expect_devices=8",
            ),
            cwd=ROOT,
            env=env(4),
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]


def run_two_processes(module, workdir, *args, timeout=300):
    procs = start_two_processes(module, workdir, *args)
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


def metrics_by_step(workdir) -> dict:
    """step -> the last record written for it (a resumed run rewrites the steps after its checkpoint)."""
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r for r in records}


def test_two_processes_equal_one_process(tmp_path):
    args = ["--config.train.steps=5", "--config.train.checkpoint_every=5", "--config.eval.num_examples=13"]
    outs = run_two_processes("train", tmp_path / "two", *args)
    assert "process 0/2  devices 4 local / 8 global" in outs[0]
    assert "process 1/2  devices 4 local / 8 global" in outs[1]
    run("train", tmp_path / "one", *args)
    two, one = metrics_by_step(tmp_path / "two"), metrics_by_step(tmp_path / "one")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([two[s]["loss"] for s in one], [one[s]["loss"] for s in one], rtol=1e-5)
    # Each process wrote its own data-iterator position into the checkpoint.
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints" / "5" / "data"))[-2:] == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    # Evaluation on 2 processes: 13 examples in global batches of 8 (4 per process), so process 1 pads
    # more rows than process 0; the metrics must equal those of one process with no padding to speak of.
    run_two_processes("eval", tmp_path / "two", "--config.eval.num_examples=13")
    m2 = json.load(open(tmp_path / "two" / "eval" / "metrics.json"))
    run("eval", tmp_path / "two", "--config.eval.num_examples=13", "--config.eval.batch_size=16")
    m1 = json.load(open(tmp_path / "two" / "eval" / "metrics.json"))
    assert m2["num_examples"] == m1["num_examples"] == 13
    for key in ("segmentation", "synthesis"):
        for name, value in m1[key].items():
            if isinstance(value, float):
                assert m2[key][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, name)
    assert m2["segmentation"]["miou_by_steps"] == pytest.approx(m1["segmentation"]["miou_by_steps"])


def load_state(workdir, step):
    config = config_lib.load(str(workdir))
    mesh = sharding.mesh_from_config((("data", 1), ("fsdp", 1)), jax.devices()[:1])
    _, template, _, _ = train.build_training(config, mesh, init=False)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
    try:
        return jax.device_get(ckpt.restore(template, step))
    finally:
        ckpt.close()


class LineReader:
    """Collects a process's stdout lines on a thread, so the test can poll without blocking."""

    def __init__(self, proc):
        self.lines = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.append(line)

    def join(self):
        self._thread.join(timeout=30)

    def last_step(self) -> int:
        steps = [int(x.split()[1].split("/")[0]) for x in self.lines if x.startswith("step ")]
        return max(steps, default=0)


def test_kill_9_then_resume_equals_a_straight_run(tmp_path):
    # Batch 64 makes a step slow enough (~0.1 s) that the kill lands well before the run's end.
    args = ["--config.train.steps=20", "--config.train.checkpoint_every=10", "--config.train.batch_size=64"]
    run("train", tmp_path / "straight", *args)

    crashed = tmp_path / "crashed"
    # This run saves synchronously, so "step 11" on its stdout means checkpoint 10 is complete: the kill
    # then lands mid-way between two saves. (An async commit can take longer than the 10 steps after it;
    # the straight run, the resume and the other tests save asynchronously.)
    proc = subprocess.Popen(
        command("train", crashed, *args, "--config.train.async_checkpoint=False"),
        cwd=ROOT,
        env=env(8),
        stdout=subprocess.PIPE,
        text=True,
    )
    reader = LineReader(proc)
    deadline = time.time() + 240
    while reader.last_step() < 11:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join()
    assert proc.returncode == -signal.SIGKILL
    killed_at = reader.last_step()
    assert 11 <= killed_at < 20, killed_at
    assert checkpoint.Checkpointer(str(crashed / "checkpoints"), create=False).all_steps() == [10]

    out = run("train", crashed, *args)
    assert "resumed from" in out and out.split("resumed from")[1].split()[0].endswith("/10")

    straight_state, resumed_state = load_state(tmp_path / "straight", 20), load_state(crashed, 20)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(straight_state), jax.tree.leaves(resumed_state), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))  # bitwise
    straight, resumed = metrics_by_step(tmp_path / "straight"), metrics_by_step(crashed)
    assert sorted(straight) == sorted(resumed) == list(range(1, 21))
    # The same batches in the same order (fingerprints of the bytes), and the same losses.
    assert [resumed[s]["data_crc32"] for s in straight] == [straight[s]["data_crc32"] for s in straight]
    assert len({straight[s]["data_crc32"] for s in straight}) == 20
    assert [resumed[s]["loss"] for s in straight] == [straight[s]["loss"] for s in straight]


def test_sigterm_saves_the_current_step_and_exits_0(tmp_path):
    args = ["--config.train.steps=100000", "--config.train.checkpoint_every=100000"]
    stderr = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen(
        command("train", tmp_path / "run", *args),
        cwd=ROOT,
        env=env(8),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    reader = LineReader(proc)
    deadline = time.time() + 240
    while reader.last_step() < 5:
        assert proc.poll() is None and time.time() < deadline, open(tmp_path / "stderr.txt").read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    reader.join()
    assert proc.returncode == 0, open(tmp_path / "stderr.txt").read()[-3000:]
    tmp_path = tmp_path / "run"
    line = next(x for x in reader.lines if x.startswith("preempted"))
    step = int(line.split("saved checkpoint ")[1].split(",")[0])
    assert step >= 5 and step == reader.last_step()
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints"), create=False).all_steps() == [step]
    assert int(load_state(tmp_path, step)["step"]) == step  # loadable, and it is the step reported

    out = run("train", tmp_path, f"--config.train.steps={step + 2}", "--config.train.checkpoint_every=100000")
    assert f"checkpoints/{step}" in out.split("resumed from")[1].split()[0]
    assert f"step {step + 2:>6d}/{step + 2}" in out
    assert sorted(metrics_by_step(tmp_path))[-3:] == [step, step + 1, step + 2]


def test_startup_fails_fast_when_the_topology_disagrees(tmp_path):
    r = subprocess.run(
        command("train", tmp_path, "--expect_devices=16"),
        cwd=ROOT,
        env=env(8),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "semflow_jax.train: error: expected 16 devices, jax sees 8 (8 on process 0)"
    )
    assert not os.path.exists(tmp_path / "checkpoints")


def test_sigterm_on_one_host_saves_the_same_step_on_both(tmp_path):
    args = ["--config.train.steps=100000", "--config.train.checkpoint_every=100000"]
    procs = start_two_processes("train", tmp_path, *args)
    reader = LineReader(procs[0])
    deadline = time.time() + 240
    while reader.last_step() < 3:
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)  # only one host is told; JAX's sync point tells the other
    err1 = procs[1].communicate(timeout=120)[1]
    procs[0].wait(timeout=120)  # its stdout belongs to the reader thread: no communicate() here
    reader.join()
    err0 = procs[0].stderr.read()
    assert [p.returncode for p in procs] == [0, 0], (err0[-2000:], err1[-2000:])
    line = next(x for x in reader.lines if x.startswith("preempted"))
    step = int(line.split("saved checkpoint ")[1].split(",")[0])
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints"), create=False).all_steps() == [step]
    data = sorted(os.listdir(tmp_path / "checkpoints" / str(step) / "data"))
    assert "process_0-of-2.json" in data and "process_1-of-2.json" in data
    assert int(load_state(tmp_path, step)["step"]) == step
