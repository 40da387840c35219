"""Pod-scale training in one process on 8 simulated devices: FSDP layouts, sharded = single-device,
gradient accumulation, mixed precision, a non-finite loss stopping the run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import shapes as shapes_config
from semflow_jax import checkpoint, sharding, train
from semflow_jax.data import pipeline
from semflow_jax.errors import SemFlowError
from semflow_jax.state import make_optimizer


def tiny(**overrides):
    """The tiny shapes config with one UNet level and no attention (compiles in half the time)."""
    config = shapes_config.get_config("tiny")
    config.model.channel_mults, config.model.attention_resolutions = (1,), ()
    config.fsdp_min_size = 256  # the tiny UNet's arrays are small; split everything of 256+ elements
    for key, value in overrides.items():
        section, name = key.split("__") if "__" in key else (None, key)
        (config[section] if section else config)[name] = value
    return config


def batches(config, n):
    it = pipeline.train_iterator(config)
    return [next(it) for _ in range(n)]


def run_steps(config, mesh, host_batches):
    """Losses of len(host_batches) steps and the final state, on mesh."""
    _, state, _, step = train.build_training(config, mesh)
    losses = []
    for b in host_batches:
        state, metrics = step(state, {k: sharding.to_global(b[k], mesh) for k in ("image", "label")})
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state)


def test_fsdp_spec_rule():
    assert sharding.fsdp_spec((3, 3, 64, 128), 8, 1024) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((3, 3, 128, 64), 8, 1024) == P(None, None, "fsdp")
    assert sharding.fsdp_spec((64,), 8, 1024) == P()  # small: replicated
    assert sharding.fsdp_spec((3, 3, 12, 20), 8, 16) == P()  # nothing divisible by 8
    assert sharding.fsdp_spec((3, 3, 12, 20), 4, 16) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((4096, 4096), 1, 1) == P()


def test_sharded_step_equals_single_device_step():
    config = tiny()
    host = batches(config, 3)
    single = sharding.mesh_from_config((("data", 1), ("fsdp", 1)), jax.devices()[:1])
    pod = sharding.mesh_from_config((("data", 2), ("fsdp", 4)))
    losses_1, state_1 = run_steps(config, single, host)
    losses_8, state_8 = run_steps(config, pod, host)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_8), jax.tree.leaves(state_1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(state_8["rng"], state_1["rng"])
    assert int(state_8["step"]) == 3


def test_fsdp_8_splits_every_large_array():
    config = tiny(mesh=(("data", 1), ("fsdp", 8)))
    mesh = sharding.mesh_from_config(config.mesh)
    _, state, state_sharding, step = train.build_training(config, mesh)
    split = 0
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        spec = sharding.fsdp_spec(x.shape, 8, config.fsdp_min_size)
        shard_shapes = {s.data.shape for s in x.addressable_shards}
        if spec == P():
            assert shard_shapes == {x.shape}, path
            continue
        split += 1
        dim = len(spec) - 1
        want = x.shape[:dim] + (x.shape[dim] // 8,) + x.shape[dim + 1 :]
        assert shard_shapes == {want}, (jax.tree_util.keystr(path), shard_shapes)
        assert len({s.device for s in x.addressable_shards}) == 8
    # params, both Adam moments and the EMA: every large parameter is split four times over.
    large = [x for x in jax.tree.leaves(state["params"]) if x.size >= config.fsdp_min_size]
    assert split == 4 * len(large) and len(large) >= 8
    # The step keeps the layout (out_shardings = in_shardings) and runs.
    host = batches(config, 1)[0]
    new, metrics = step(state, {k: sharding.to_global(host[k], mesh) for k in ("image", "label")})
    assert np.isfinite(float(metrics["loss"]))
    kernel = new["params"]["down0_res0"]["conv1"]["kernel"]
    assert (
        kernel.sharding.spec
        == state_sharding["params"]["down0_res0"]["conv1"]["kernel"].spec
        == P(None, None, None, "fsdp")
    )
    assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 8


def test_gradient_accumulation_equals_one_pass():
    config = tiny()
    config.train.batch_size = 16
    host = batches(config, 2)
    mesh = sharding.mesh_from_config((("data", 4), ("fsdp", 2)))
    losses_1, state_1 = run_steps(config, mesh, host)
    config.train.grad_accum_steps = 2  # 2 micro-batches of 8: one example per device per pass
    model, tx = train.build_model(config), make_optimizer(config.train)
    jaxpr = str(jax.make_jaxpr(train.make_train_step(config, model, tx, mesh))(state_1, host[0]))
    assert "scan" in jaxpr  # the accumulation loop is really there
    losses_2, state_2 = run_steps(config, mesh, host)
    np.testing.assert_allclose(losses_2, losses_1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_2), jax.tree.leaves(state_1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters():
    config = tiny()
    host = batches(config, 3)  # the first update has lr 0 (warm-up) and the UNet's output starts at 0
    mesh = sharding.mesh_from_config(config.mesh)
    losses_32, _ = run_steps(config, mesh, host)
    config.model.dtype = "bfloat16"
    losses_16, state = run_steps(config, mesh, host)
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state["opt"]) if x.ndim} == {np.dtype("float32")}
    np.testing.assert_allclose(losses_16, losses_32, rtol=3e-2)
    assert losses_16 != losses_32  # bfloat16 really was used


def test_lean_state_without_ema_and_with_a_bfloat16_first_moment(tmp_path):
    from semflow_jax import SemFlow, config_lib
    from semflow_jax.eval import restore_for_eval

    config = tiny()
    host = batches(config, 3)
    mesh = sharding.mesh_from_config(config.mesh)
    losses, _ = run_steps(config, mesh, host)
    lean = tiny(train__ema_decay=0.0, train__mu_dtype="bfloat16")
    losses_lean, state = run_steps(lean, mesh, host)
    assert "ema" not in state
    mu, nu = state["opt"][1][0].mu, state["opt"][1][0].nu  # chain(clip, adamw): adamw's scale_by_adam
    assert {x.dtype for x in jax.tree.leaves(mu)} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(nu)} == {np.dtype("float32")}
    np.testing.assert_allclose(losses_lean, losses, rtol=1e-3)  # the EMA never feeds back into training
    # Trained, evaluated and loaded without an EMA: the trained weights are what samples.
    lean.train.steps = 2
    train.train_and_checkpoint(lean, str(tmp_path), quiet=True)
    _, params, _, _ = restore_for_eval(str(tmp_path), mesh)
    model = SemFlow.from_workdir(str(tmp_path))
    assert model.segment(np.zeros((2, 16, 16, 3), np.uint8)).shape == (2, 16, 16)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(a, b)
    # Resuming that workdir with an EMA would need another state: one line, before anything is touched.
    with pytest.raises(SemFlowError, match=r"train.ema_decay > 0 = True but the workdir's checkpoint"):
        config_lib.check_compatible(
            tiny(train__mu_dtype="bfloat16"), config_lib.load(str(tmp_path)), resume=True
        )


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    config = tiny()
    config.train.steps, config.train.checkpoint_every, config.train.log_every = 8, 2, 4
    make = train.make_train_step

    def poisoned(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def step(state, batch):
            new, metrics = step_fn(state, batch)
            loss = jnp.where(state["step"] >= 2, jnp.nan, metrics["loss"])  # step 3 (1-based) goes bad
            return new, {**metrics, "loss": loss}

        return step

    monkeypatch.setattr(train, "make_train_step", poisoned)
    with pytest.raises(SemFlowError, match=r"loss became nan at step 3.*newest checkpoint: 2"):
        train.train_and_checkpoint(config, str(tmp_path), quiet=True)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), create=False)
    assert ckpt.all_steps() == [2]
    mesh = sharding.mesh_from_config(config.mesh)
    _, template, _, _ = train.build_training(config, mesh, init=False)
    restored = ckpt.restore(template)
    assert int(restored["step"]) == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(restored["params"])))
    ckpt.close()
