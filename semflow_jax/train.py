"""Training: `python -m semflow_jax.train --config=configs/shapes.py --workdir=DIR`.

One flat loop, read top to bottom: config and mesh, input pipeline, model and optimizer, sharded state,
the jitted update step, checkpoint/resume, then the loop with its progress line, metrics and sample grids.
A run restarted with the same workdir resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from semflow_jax import checkpoint, config_lib, flow, sharding
from semflow_jax.data import pipeline
from semflow_jax.errors import SemFlowError
from semflow_jax.metric_writer import MetricWriter
from semflow_jax.models import build_model, velocity_fn
from semflow_jax.visualize import save_png


# ----------------------------------------------------------------------------------------------------------
# Model, optimizer, state.
# ----------------------------------------------------------------------------------------------------------
def make_schedule(tc):
    """Learning rate: linear warm-up from 0 to tc.lr, then constant, linear or cosine decay to 0."""
    warmup = max(int(tc.warmup_steps), 1)
    rest = max(int(tc.steps) - warmup, 1)
    after = {
        "constant": optax.constant_schedule(tc.lr),
        "linear": optax.linear_schedule(tc.lr, 0.0, rest),
        "cosine": optax.cosine_decay_schedule(tc.lr, rest),
    }[tc.lr_schedule]
    return optax.join_schedules([optax.linear_schedule(0.0, tc.lr, warmup), after], [warmup])


def make_optimizer(tc):
    """AdamW with global-norm gradient clipping (the paper: wd 0.01, clip 1.0)."""
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay),
    )


def init_state(config, model, tx, rng):
    """{"params", "opt", "ema", "step"}: plain pytrees, the EMA starting at the initial parameters."""
    s = config.data.image_size
    z = jnp.zeros((1, s, s, 3), jnp.float32)
    params = model.init(rng, z, jnp.zeros((1,), jnp.float32))["params"]
    return {"params": params, "opt": tx.init(params), "ema": params, "step": jnp.zeros((), jnp.int32)}


def make_train_step(config, model, tx):
    """The update: flow endpoints from the uint8 batch, the rectified-flow loss, AdamW, EMA."""
    anchors = jnp.asarray(
        flow.anchors_for(config.data.num_classes, config.anchors.base, config.anchors.spacing)
    )
    beta, ema_decay = float(config.flow.beta), float(config.train.ema_decay)
    schedule = make_schedule(config.train)
    base_rng = jax.random.PRNGKey(config.seed)

    def train_step(state, batch):
        step = state["step"]
        rng_t, rng_eps, rng_drop = jax.random.split(jax.random.fold_in(base_rng, step), 3)
        z0 = flow.image_to_flow(batch["image"])
        z1 = flow.perturb(rng_eps, flow.labels_to_mask(batch["label"], anchors), beta)
        t = flow.sample_time(rng_t, z0.shape[0], config.flow.time_power, config.flow.time_power_fraction)

        def loss_fn(params):
            v = velocity_fn(model, params, train=True, rngs={"dropout": rng_drop})
            return flow.flow_loss(v, z0, z1, t)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # Warm-started EMA: the effective decay ramps up so short runs are not dominated by the init.
        decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        new_state = {"params": params, "opt": opt, "ema": ema, "step": step + 1}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(step)}
        return new_state, metrics

    return train_step


def build_training(config, mesh):
    """(model, state, state sharding, jitted train step) for config on mesh; the state is created sharded.

    The step is jax.jit with explicit in/out shardings (state replicated, batch split over the mesh) and
    donates the old state, so parameters and optimizer state are never held twice.
    """
    model = build_model(config)
    tx = make_optimizer(config.train)
    init_rng = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(lambda r: init_state(config, model, tx, r), init_rng)
    state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
    state = jax.jit(lambda r: init_state(config, model, tx, r), out_shardings=state_sharding)(init_rng)
    train_step = jax.jit(
        make_train_step(config, model, tx),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    return model, state, state_sharding, train_step


# ----------------------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------------------
def _progress(step, total, loss, rate, started):
    eta = (total - step) / rate if rate > 0 else float("inf")
    return (
        f"step {step:>6d}/{total}  loss {loss:.4f}  {rate:5.2f} steps/s  "
        f"elapsed {time.time() - started:5.0f}s  ETA {eta:5.0f}s"
    )


def train_and_checkpoint(config, workdir: str, quiet: bool = False) -> dict:
    """Trains config.train.steps steps in workdir (resuming if it holds a checkpoint); returns last metrics."""
    config = config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.mesh_from_config(config.mesh)
    sharding.check_batch(config.train.batch_size, mesh, "train.batch_size")
    pid, nproc = jax.process_index(), jax.process_count()
    is_main = pid == 0
    say = (lambda *a: None) if quiet or not is_main else (lambda *a: print(*a, flush=True))
    say(
        f"process {pid}/{nproc}  devices {jax.local_device_count()} local / {jax.device_count()} global  "
        f"mesh {dict(mesh.shape)}  batch {config.train.batch_size} global / "
        f"{config.train.batch_size // mesh.size} per device"
    )
    # --- Input pipeline ------------------------------------------------------------------------------------
    data_iter = pipeline.train_iterator(config, pid, nproc)
    data_sharding = sharding.batch_sharding(mesh)

    # --- Model, optimizer, state created already sharded; the jitted update step ----------------------------
    model, state, _, train_step = build_training(config, mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    say(f"model: UNet, {num_params / 1e6:.2f}M parameters")

    # --- Checkpoint: resume if the workdir has one ------------------------------------------------------------
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
    if ckpt.latest_step() is not None:
        if os.path.exists(os.path.join(workdir, "config.json")):
            config_lib.check_compatible(config, config_lib.load(workdir))
        state, extra = ckpt.restore(state)
        data_iter.set_state(extra["data"])
        say(f"resumed from {ckpt.directory}/{int(state['step'])}")
    if is_main:  # only now: a config that does not fit the workdir's checkpoint must not replace its config
        config_lib.save(config, workdir)

    # --- Loop -------------------------------------------------------------------------------------------------
    from semflow_jax.eval import preview_grid  # eval imports train's helpers; import here avoids a cycle

    writer = MetricWriter(workdir, enabled=is_main)
    tc = config.train
    step = int(state["step"])
    started = time.time()
    window_start, window_steps = time.time(), 0
    last = {}
    preview_batch = next(pipeline.eval_batches(config, config.eval.grid_rows, config.eval.grid_rows))
    tty = sys.stdout.isatty()
    while step < tc.steps:
        local = next(data_iter)
        batch = {
            k: jax.make_array_from_process_local_data(data_sharding, local[k]) for k in ("image", "label")
        }
        state, metrics = train_step(state, batch)
        step += 1
        window_steps += 1
        if step % tc.log_every == 0 or step == tc.steps:
            metrics = jax.device_get(metrics)
            if not np.isfinite(metrics["loss"]):
                raise SemFlowError(f"loss became {metrics['loss']} at step {step}; last checkpoint kept")
            rate = window_steps / (time.time() - window_start)
            last = {**{k: float(v) for k, v in metrics.items()}, "steps_per_sec": rate}
            writer.write_scalars(step, last)
            line = _progress(step, tc.steps, last["loss"], rate, started)
            if tty and not quiet and is_main:
                print("\r" + line, end="", flush=True)
            else:
                say(line)
            window_start, window_steps = time.time(), 0
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            ckpt.save(step, state, {"data": data_iter.get_state()}, force=step == tc.steps)
        if is_main and (step % tc.sample_every == 0 or step == tc.steps):
            picture = preview_grid(config, model, state["ema"], preview_batch)
            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            save_png(os.path.join(workdir, "samples", f"step_{step:06d}.png"), picture)
            writer.write_image(step, "samples", picture)
    if tty and not quiet and is_main:
        print()
    ckpt.wait()
    ckpt.close()
    writer.close()
    say(f"trained {step} steps in {time.time() - started:.0f}s; checkpoints in {ckpt.directory}")
    return last


def main(argv):
    """CLI entry: --config and --workdir."""
    del argv
    from absl import flags

    train_and_checkpoint(flags.FLAGS.config, flags.FLAGS.workdir)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/shapes.py[:tiny].", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    from semflow_jax.errors import run_cli

    _define_flags()
    run_cli(main, "semflow_jax.train")
