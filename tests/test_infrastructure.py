"""Mesh from config, checkpoints (orbax behind one module), metric files, pictures."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from semflow_jax import checkpoint, sharding, visualize
from semflow_jax.errors import SemFlowError
from semflow_jax.metric_writer import MetricWriter


def test_mesh_from_config_fills_the_free_axis():
    mesh = sharding.mesh_from_config((("data", -1),))
    assert dict(mesh.shape) == {"data": 8}
    mesh = sharding.mesh_from_config((("data", -1), ("fsdp", 2)))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    with pytest.raises(SemFlowError, match="needs 16 devices"):
        sharding.mesh_from_config((("data", 16),))
    with pytest.raises(SemFlowError, match="at most one"):
        sharding.mesh_from_config((("data", -1), ("fsdp", -1)))
    with pytest.raises(SemFlowError, match="divisible by the 8 devices.*SEMFLOW_CPU_DEVICES"):
        sharding.check_batch(12, mesh, "train.batch_size")


def test_training_can_span_fewer_of_the_cpu_split_devices():
    assert len(sharding.train_devices(0)) == 8  # 0: all
    assert sharding.train_devices(1) == jax.devices()[:1]
    assert len(sharding.train_devices(3)) == 3 and len(sharding.train_devices(20)) == 8
    mesh = sharding.mesh_from_config((("data", -1), ("fsdp", 1)), sharding.train_devices(2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1}


def test_batch_is_split_over_devices():
    mesh = sharding.mesh_from_config((("data", -1),))
    x = jax.device_put(jnp.zeros((16, 4)), sharding.batch_sharding(mesh))
    assert len(x.addressable_shards) == 8 and x.addressable_shards[0].data.shape == (2, 4)


def test_checkpoint_round_trip_and_newest_complete(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), keep=2, async_save=False)
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(3)}
    for step in (1, 2, 3):
        ckpt.save(step, jax.tree.map(lambda x, s=step: x * s, state), config_json={"seed": step})
    ckpt.wait()
    assert ckpt.latest_step() == 3
    # A save that never completed (orbax's temporary folder) is never picked up.
    os.makedirs(tmp_path / "ck" / "4.orbax-checkpoint-tmp-123")
    assert checkpoint.Checkpointer(str(tmp_path / "ck"), create=False).latest_step() == 3
    restored = ckpt.restore(state)
    np.testing.assert_array_equal(restored["w"], 3 * state["w"])
    assert ckpt.restore_config() == {"seed": 3} and ckpt.all_steps() == [2, 3]
    assert sorted(os.listdir(tmp_path / "ck"))[:2] == ["2", "3"]  # keep=2
    ckpt.close()
    assert not checkpoint.has_checkpoint(str(tmp_path / "empty"))


def test_saving_a_replicated_state_compiles_nothing(tmp_path):
    """orbax's default cuts each replicated array into one slice per device, each a fresh compilation (seven
    seconds for the tiny state on 8 CPU devices); small arrays are now written whole, large ones still split."""
    from jax import monitoring
    from jax._src import dispatch

    repl = sharding.replicated(sharding.mesh_from_config((("data", -1), ("fsdp", 1))))
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 8, 8), (8,), (16, 16), (5, 8), (32,), (3, 3, 16, 8)]
    state = {f"w{i}": jax.device_put(rng.standard_normal(s, np.float32), repl) for i, s in enumerate(shapes)}
    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: compiles.append(event) if event == dispatch.BACKEND_COMPILE_EVENT else None
    )
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ckpt.save(1, state, force=True)
    ckpt.wait()
    assert compiles == []
    restored = ckpt.restore(state, 1)
    ckpt.close()
    for k in state:
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))


def test_checkpoint_that_does_not_fit_is_one_error(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, {"w": jnp.zeros((2, 3))})
    ckpt.wait()
    with pytest.raises(SemFlowError, match="does not fit"):
        ckpt.restore({"w": jnp.zeros((4, 4))})


def test_metric_writer(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.write_scalars(1, {"loss": np.float32(0.5)})
    w.write_image(1, "grid", np.zeros((4, 4, 3), np.uint8))
    w.close()
    assert json.loads(open(tmp_path / "metrics.jsonl").read()) == {"step": 1, "loss": 0.5}
    assert os.listdir(tmp_path / "tensorboard")


def test_colorize_grid_and_png(tmp_path):
    palette = np.array([[0, 0, 0], [255, 0, 0]], np.uint8)
    pic = visualize.colorize(np.array([[0, 1], [255, 1]]), palette)
    np.testing.assert_array_equal(pic[0, 1], [255, 0, 0])
    np.testing.assert_array_equal(pic[1, 0], [255, 255, 255])  # ignore is white
    g = visualize.grid([[pic, pic], [pic]], pad=1, scale=2)
    assert g.shape == (2 * (2 * 3 + 1), 2 * (2 * 3 + 1), 3)
    visualize.save_png(str(tmp_path / "g.png"), g)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")), g)
    assert os.listdir(tmp_path) == ["g.png"]  # no temporary file left behind
