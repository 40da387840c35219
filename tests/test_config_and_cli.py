"""Configs are validated at the edge; CLIs turn bad input into one line on stderr and exit code 2."""

import os
import subprocess
import sys

import pytest

from configs import shapes as shapes_config
from semflow_jax import config_lib
from semflow_jax.errors import SemFlowError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shapes_config_is_valid():
    config_lib.validate(shapes_config.get_config())
    config_lib.validate(shapes_config.get_config("tiny"))
    with pytest.raises(ValueError, match="unknown option"):
        shapes_config.get_config("huge")


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.flow.update(beta=127.5), "flow.beta"),
        (lambda c: c.flow.update(beta=-1.0), "flow.beta"),
        (
            lambda c: c.anchors.update(base=6, spacing=50.0) or c.data.update(num_classes=217),
            "num_classes=217",
        ),
        (lambda c: c.flow.update(solver="rk4"), "flow.solver"),
        (lambda c: c.flow.update(time_power=0.0), "flow.time_power"),
        (lambda c: c.data.update(image_size=15), "image_size"),
        (lambda c: c.model.update(num_groups=5), "num_groups"),
        (lambda c: c.train.update(steps=0), "train.steps"),
        (lambda c: c.train.update(cpu_devices=-1), "train.cpu_devices"),
        (lambda c: c.eval.update(num_samples=1), "num_samples"),
        (lambda c: c.data.update(name="imagenet"), "data.name"),
        (lambda c: c.train.update(stepz=3), "unknown config key"),
        (lambda c: c.data.update(num_classes=8), "ignore colour"),  # k=2, s=255: white is class 7
    ],
)
def test_bad_configs_are_refused_by_name(edit, message):
    config = shapes_config.get_config("tiny")
    edit(config)
    with pytest.raises(SemFlowError, match=message):
        config_lib.validate(config)


def test_config_round_trips_through_the_workdir(tmp_path):
    config = shapes_config.get_config("tiny")
    config_lib.save(config, str(tmp_path))
    back = config_lib.load(str(tmp_path))
    assert back.model.channel_mults == config.model.channel_mults
    assert back.to_dict() == config.to_dict()


def _cli(module, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", f"semflow_jax.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_cli_unknown_override_key(tmp_path):
    r = _cli("train", "--config=configs/shapes.py:tiny", f"--workdir={tmp_path}", "--config.train.stepz=3")
    _one_line_error(r, "stepz")


def test_cli_invalid_beta(tmp_path):
    r = _cli("train", "--config=configs/shapes.py:tiny", f"--workdir={tmp_path}", "--config.flow.beta=130")
    _one_line_error(r, "flow.beta")
    assert not os.path.exists(tmp_path / "checkpoints")


def test_cli_too_many_classes(tmp_path):
    r = _cli(
        "train", "--config=configs/shapes.py:tiny", f"--workdir={tmp_path}", "--config.data.num_classes=300"
    )
    _one_line_error(r, "num_classes")


def test_cli_missing_config_file(tmp_path):
    r = _cli("train", "--config=configs/nope.py", f"--workdir={tmp_path}")
    _one_line_error(r, "nope.py")


def test_cli_eval_without_checkpoint(tmp_path):
    r = _cli("eval", "--config=configs/shapes.py:tiny", f"--workdir={tmp_path}")
    _one_line_error(r, str(tmp_path))
    assert not os.path.exists(tmp_path / "eval")
