"""Train a tiny config for 2 steps on 8 simulated devices, resume, evaluate, and use the public API."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import shapes as shapes_config
from semflow_jax import SemFlow
from semflow_jax.data import shapes
from semflow_jax.errors import SemFlowError
from semflow_jax.eval import evaluate
from semflow_jax.train import train_and_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("run"))
    config = shapes_config.get_config("tiny")
    metrics = train_and_checkpoint(config, wd, quiet=True)
    assert np.isfinite(metrics["loss"])
    return wd


def test_training_writes_checkpoint_metrics_and_pictures(workdir):
    assert jax.device_count() == 8  # the train step ran data-parallel over 8 devices
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [1, 2] and all(np.isfinite(x["loss"]) for x in lines)
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert os.path.exists(os.path.join(workdir, "samples", "step_000002.png"))


def test_resume_continues_from_the_checkpoint(workdir, tmp_path, caplog):
    import logging
    import shutil

    wd = str(tmp_path / "resume")
    shutil.copytree(workdir, wd)
    config = shapes_config.get_config("tiny")
    config.train.steps = 4
    caplog.set_level(logging.DEBUG, logger="jax._src.interpreters.pxla")  # "Compiling NAME with ..."
    train_and_checkpoint(config, wd, quiet=True)
    steps = [json.loads(x)["step"] for x in open(os.path.join(wd, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]  # 1-2 from the first run, 3-4 resumed, none repeated
    # The checkpoint is restored into the state's template: no initialization is compiled or run.
    compiled = [r.args[0] for r in caplog.records if r.msg.startswith("Compiling %s")]
    assert any("train_step" in name for name in compiled), compiled
    assert not any("init" in name for name in compiled), compiled


def test_resume_with_another_model_is_refused_and_keeps_the_workdir(workdir, tmp_path):
    import shutil

    wd = str(tmp_path / "other")
    shutil.copytree(workdir, wd)
    before = open(os.path.join(wd, "config.json")).read()
    config = shapes_config.get_config("tiny")
    config.model.channels = 16
    with pytest.raises(SemFlowError, match="model"):
        train_and_checkpoint(config, wd, quiet=True)
    assert open(os.path.join(wd, "config.json")).read() == before


def test_eval_writes_every_metric(workdir):
    from PIL import Image

    config = shapes_config.get_config("tiny")
    config.eval.fid = config.eval.lpips = config.eval.label_alignment = True  # the judges, off in tiny
    metrics = evaluate(config, workdir, quiet=True)
    out = os.path.join(workdir, "eval")
    on_disk = json.load(open(os.path.join(out, "metrics.json")))
    assert on_disk == json.loads(json.dumps(metrics)) and on_disk["schema_version"] == 2
    seg, syn = on_disk["segmentation"], on_disk["synthesis"]
    assert 0 <= seg["miou"] <= 100 and set(seg["miou_by_steps"]) == {"1", "2"}
    assert set(seg["per_class_iou"]) == set(shapes.CLASS_NAMES)
    assert 0 <= syn["round_trip_miou"] <= 100
    assert set(syn["fid"]["by_steps"]) == {"1", "2"} and all(v > 0 for v in syn["fid"]["by_steps"].values())
    assert os.path.exists(syn["fid"]["real_statistics"])  # cached for the next evaluation
    assert syn["lpips_to_ground_truth"] > 0
    align = syn["label_alignment"]
    assert all(
        0 <= align[k] <= 100 for k in ("miou", "miou_without_perturbation", "segmenter_validation_miou")
    )
    div = syn["diversity"]
    # The perturbation is the only source of diversity: without it the ODE maps a mask to one image.
    assert div["lpips"]["with_perturbation"] > 0 and div["lpips"]["without_perturbation"] == 0
    assert div["rms"]["with_perturbation"] > 0 and div["rms"]["without_perturbation"] < 1e-6
    table = open(os.path.join(out, "steps.md")).read()
    assert "| 1 | " in table and "| 2 | " in table and f"{seg['miou_by_steps']['2']:.2f}" in table
    assert f"{syn['fid']['by_steps']['2']:.2f}" in table
    assert "| disk |" in open(os.path.join(out, "per_class_iou.md")).read()
    for picture in ("grid.png", "steps.png"):
        with Image.open(os.path.join(out, picture)) as im:
            assert im.size[0] > 100 and im.size[1] > 50


def test_eval_refuses_a_config_for_another_model(workdir):
    config = shapes_config.get_config("tiny")
    config.model.channels = 16
    with pytest.raises(SemFlowError, match="model"):
        evaluate(config, workdir, quiet=True)


def test_api_segment_and_synthesize(workdir):
    m = SemFlow.from_workdir(workdir)
    assert m.config.data.image_size == 16 and "stem" in m.params
    images = np.stack([shapes.make_example(0, "validation", i, 16)["image"] for i in range(5)])
    labels = m.segment(images)
    assert labels.shape == (5, 16, 16) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < shapes.NUM_CLASSES
    np.testing.assert_array_equal(labels, m.segment(images))  # deterministic, bit for bit
    np.testing.assert_array_equal(labels[:2], m.segment(images[:2], batch_size=2))
    gt = np.stack([shapes.make_example(0, "validation", i, 16)["label"] for i in range(3)])
    a = m.synthesize(gt, steps=2, seed=1)
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, m.synthesize(gt, steps=2, seed=1, batch_size=2))  # same seed, same
    assert not np.array_equal(a, m.synthesize(gt, steps=2, seed=2))  # the perturbation varies
    np.testing.assert_array_equal(
        m.synthesize(gt, steps=2, beta=0, seed=1), m.synthesize(gt, steps=2, beta=0, seed=2)
    )


def test_api_refuses_bad_inputs(workdir):
    m = SemFlow.from_workdir(workdir)
    with pytest.raises(SemFlowError, match="uint8"):
        m.segment(np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(SemFlowError, match=r"\[N, 16, 16, 3\]"):
        m.segment(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(SemFlowError, match="class ids"):
        m.synthesize(np.full((1, 16, 16), 7))
    with pytest.raises(SemFlowError, match="beta"):
        m.synthesize(np.zeros((1, 16, 16), np.int32), beta=200.0)
    with pytest.raises(SemFlowError, match="does not exist"):
        SemFlow.from_workdir(os.path.join(workdir, "nope"))


def test_both_directions_share_one_compilation(workdir):
    m = SemFlow.from_workdir(workdir)
    images = np.stack([shapes.make_example(0, "validation", i, 16)["image"] for i in range(8)])
    m.segment(images, steps=3, batch_size=8)
    m.synthesize(m.segment(images, steps=3, batch_size=8), steps=3, batch_size=8)
    compiled = m.sampler.compiled(3, m.config.flow.solver)
    assert compiled._cache_size() == 1  # image -> mask and mask -> image: one executable


def test_cli_train_then_eval(tmp_path):
    def cli(module):
        args = [
            sys.executable,
            "-m",
            f"semflow_jax.{module}",
            "--config=configs/shapes.py:tiny",
            f"--workdir={tmp_path}",
        ]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert "step      2/2" in cli("train")
    assert "segmentation mIoU" in cli("eval") and os.path.exists(tmp_path / "eval" / "metrics.json")
