"""Training: `python -m semflow_jax.train --config=configs/shapes.py --workdir=DIR`.

One flat loop, read top to bottom: config and mesh, input pipeline, model and optimizer, sharded state,
the jitted update step, checkpoint/resume, then the loop with its progress line, metrics and sample grids.
A run restarted with the same workdir resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from semflow_jax import cache, checkpoint, config_lib, distributed, flow, previews, sharding
from semflow_jax.cpu import malloc_options
from semflow_jax.data import pipeline
from semflow_jax.errors import SemFlowError
from semflow_jax.metric_writer import MetricWriter
from semflow_jax.models import Codec, build_model, build_vae, flow_shape, load_pretrained, velocity_fn
from semflow_jax.models.sd import SDVAE, sample_posterior
from semflow_jax.sampling import make_sampler
from semflow_jax.state import global_norm, init_state, make_optimizer, make_schedule, sampling_params
from semflow_jax.visualize import save_png


def make_train_step(config, model, tx, mesh=None):
    """The update: flow endpoints from the uint8 batch, the rectified-flow loss, AdamW, EMA.

    With train.grad_accum_steps = A the batch's gradient is the mean of A micro-batch gradients, computed
    one after another in a lax.scan (activation memory of B/A examples, the latent mode's VAE encoding
    included). The times, perturbations and posterior noise are drawn for the whole batch first, so the
    update equals the one-pass update up to float rounding.
    """
    anchors = jnp.asarray(
        flow.anchors_for(config.data.num_classes, config.anchors.base, config.anchors.spacing)
    )
    beta, ema_decay = float(config.flow.beta), float(config.train.ema_decay)
    accum = int(config.train.grad_accum_steps)
    schedule = make_schedule(config.train)
    codec = Codec(build_vae(config))

    compute = jnp.dtype(config.model.dtype)

    def endpoints(vae_params, x0, x1, noise):
        """(z0, z1) of one (micro-)batch. Encoding images in latent mode (noise given: the posterior sample's,
        drawn for the whole batch), the image's posterior sample and the painted mask's mode, a micro-batch
        at a time; else x0, x1 as they are."""
        if noise is None:
            return x0, x1
        vae = codec.vae
        mean, logvar = vae.apply({"params": vae_params}, x0, method=SDVAE.encode)
        z0 = (mean + jnp.exp(0.5 * logvar) * noise) * vae.scaling_factor
        return z0, codec.encode(vae_params, x1)

    def loss_and_grad(params, vae_params, x0, x1, noise, t, rng_drop):
        z0, z1 = endpoints(vae_params, x0, x1, noise)

        def loss_fn(p):
            v = velocity_fn(model, p, train=True, rngs={"dropout": rng_drop})
            return flow.flow_loss(v, z0, z1, t)

        if compute == jnp.float32:
            return jax.value_and_grad(loss_fn)(params)
        # Mixed precision the way jmp does it: differentiate with respect to one compute-dtype copy of the
        # float32 master weights. The layers would cast each weight to that dtype anyway, so the values are
        # the same; but the gradient tree now comes out in bfloat16 and is widened leaf by leaf where the
        # optimizer reads it (clip_by_global_norm), instead of a float32 tree (3.2 GiB for SD 1.5) held
        # until the update.
        low = jax.tree.map(
            lambda x: x.astype(compute) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
        )
        return jax.value_and_grad(loss_fn)(low)

    def micro_batches(x):
        # Row j * A + i goes to micro-batch i: each device's contiguous rows stay on that device.
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            spec = P(None, mesh.axis_names, *([None] * (x.ndim - 2)))
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        return x

    def train_step(state, batch):
        step = state["step"]
        rng, step_rng = jax.random.split(state["rng"])
        rng_t, rng_eps, rng_drop = jax.random.split(step_rng, 3)
        noise = vae_params = None
        if "mask_latent" in batch:  # cached latents: a fresh posterior sample, a stored perturbed mask
            scale = codec.vae.scaling_factor
            x0 = sample_posterior(
                batch["latent_mean"], batch["latent_logvar"], jax.random.fold_in(step_rng, 3), scale
            )
            x1 = batch["mask_latent"]
        else:
            x0 = flow.image_to_flow(batch["image"])
            x1 = flow.perturb(rng_eps, flow.labels_to_mask(batch["label"], anchors), beta)
            if codec.vae is not None:  # latent mode: the posterior noise, drawn for the whole batch
                vae_params = jax.lax.stop_gradient(state["vae"])
                noise = jax.random.normal(jax.random.fold_in(step_rng, 3), (x0.shape[0], *flow_shape(config)))
        t = flow.sample_time(rng_t, x0.shape[0], config.flow.time_power, config.flow.time_power_fraction)

        if accum == 1:
            loss, grads = loss_and_grad(state["params"], vae_params, x0, x1, noise, t, rng_drop)
        else:

            def body(carry, xs):
                i, x0_i, x1_i, noise_i, t_i = xs
                loss_i, grads_i = loss_and_grad(
                    state["params"], vae_params, x0_i, x1_i, noise_i, t_i, jax.random.fold_in(rng_drop, i)
                )
                return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), None

            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
            xs = (jnp.arange(accum), *jax.tree.map(micro_batches, (x0, x1, noise, t)))
            (loss, grads), _ = jax.lax.scan(body, zero, xs)
            loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))

        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {**state, "params": params, "opt": opt, "step": step + 1, "rng": rng}
        if "ema" in state:
            # Warm-started EMA: the effective decay ramps up so short runs are not dominated by the init.
            decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
            new_state["ema"] = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        metrics = {"loss": loss, "grad_norm": global_norm(grads), "lr": schedule(step)}
        return new_state, metrics

    return train_step


# What jax warns when the persistent cache cannot store the train step compiled with malloc_options'
# compiler options (several temporary blocks).
_UNCACHEABLE_STEP = (
    r"Error writing persistent compilation cache entry for 'jit_train_step'.*Multiple temp buffer allocations"
)


def build_training(config, mesh, init: bool = True):
    """(model, state, state sharding, jitted train step) for config on mesh; the state is created sharded.

    The state's layout comes from the FSDP rule (`sharding.state_sharding`): large arrays split along
    "fsdp", the rest replicated. The init is jitted with that layout as out_shardings, so no parameter is
    ever whole on one device. The step is jax.jit with explicit in/out shardings (batch split over the
    mesh) and donates the old state, so parameters and optimizer state are never held twice.

    With init=False the state is only its template (ShapeDtypeStructs carrying their shardings), which a
    checkpoint is restored into: a resume neither compiles nor runs the initialization, reads no
    pretrained weights, and never holds a random state beside the restored one.
    """
    model = build_model(config)
    tx = make_optimizer(config.train)
    init_rng = jax.random.PRNGKey(config.seed)

    def init_fn(r, pre=None):
        return init_state(config, model, tx, r, pre)

    abstract = jax.eval_shape(init_fn, init_rng)
    state_sharding = sharding.state_sharding(abstract, mesh, config.fsdp_min_size)
    options = malloc_options.compiler_options(sharding.platform(mesh))
    if options:
        # XLA cannot serialize an executable whose temporaries come in several blocks, so the persistent
        # compilation cache cannot keep this step and jax warns at every start that writing it failed. The
        # step is then compiled at each start, which the faster steps repay within tens of steps
        # (docs/PERFORMANCE.md); the warning is noise to the user, so only this one is silenced.
        warnings.filterwarnings("ignore", message=_UNCACHEABLE_STEP, category=UserWarning)
    train_step = jax.jit(
        make_train_step(config, model, tx, mesh),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
        # On a CPU under the package's malloc settings: the step's temporaries in blocks malloc keeps between
        # steps, not one block mapped and faulted in afresh on every step (semflow_jax/cpu/malloc_options.py).
        compiler_options=options or None,
    )
    if not init:
        return model, sharding.with_shardings(abstract, state_sharding), state_sharding, train_step
    # Pretrained weights go from the host straight to their shards (never whole on one device).
    pretrained = load_pretrained(config)
    for key, tree in pretrained.items():
        want = jax.tree.map(lambda x: (x.shape, x.dtype), abstract[key])
        got = jax.tree.map(lambda x: (tuple(np.shape(x)), np.asarray(x).dtype), tree)
        if want != got:
            raise SemFlowError(
                f"the pretrained {key} in {config.model.pretrained} do not fit model.kind={config.model.kind}"
            )
    pretrained = {k: jax.device_put(v, state_sharding[k]) for k, v in pretrained.items()}
    state = jax.jit(init_fn, out_shardings=state_sharding)(init_rng, pretrained or None)
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


def batch_fingerprint(local_batch: dict) -> int:
    """crc32 of this process's batch bytes: logged so two runs can be shown to read the same batches."""
    crc = 0
    for k in sorted(local_batch):
        crc = zlib.crc32(np.ascontiguousarray(local_batch[k]).tobytes(), crc)
    return crc


def _first_non_finite(pending):
    """(step, name, value) of the first non-finite loss or gradient norm among (step, metrics) pairs."""
    for step, metrics in zip([s for s, _ in pending], jax.device_get([m for _, m in pending]), strict=True):
        for name in ("loss", "grad_norm"):
            if not np.isfinite(metrics[name]):
                return step, name, float(metrics[name])
    return None


def train_and_checkpoint(config, workdir: str, quiet: bool = False) -> dict:
    """Trains config.train.steps steps in workdir (resuming if it holds a checkpoint); returns last metrics.

    Every process runs this with the same config. Stops early, after saving, when the run is preempted
    (SIGTERM); the returned dict then has "preempted_at". A non-finite loss raises SemFlowError naming the
    step, and no checkpoint is written after it.
    """
    config = config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.train_mesh(config)
    config = config_lib.resolve_batch(config, mesh.size)
    tc = config.train
    sharding.check_batch(tc.batch_size, mesh, "train.batch_size")
    sharding.check_batch(tc.batch_size // tc.grad_accum_steps, mesh, "train.batch_size / grad_accum_steps")
    pid, nproc = jax.process_index(), jax.process_count()
    is_main = pid == 0
    say = (lambda *a: None) if quiet or not is_main else (lambda *a: print(*a, flush=True))
    if not quiet:  # every process: a pod's logs show at once which worker sees what
        print(distributed.startup_line(mesh, tc.batch_size), flush=True)

    # --- Input pipeline: this process's rows of every global batch -----------------------------------------
    data_iter = pipeline.train_iterator(config, pid, nproc)

    # --- Model, optimizer, state created already sharded (or, to resume, its template); the update step -----
    ckpt_dir = os.path.join(workdir, "checkpoints")
    resume = checkpoint.has_checkpoint(ckpt_dir)
    model, state, state_sharding, train_step = build_training(config, mesh, init=not resume)
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    split = sum(1 for sh in jax.tree.leaves(state_sharding["params"]) if sh.spec != P())
    say(
        f"model: UNet, {num_params / 1e6:.2f}M parameters ({split} arrays split over fsdp), "
        f"compute {config.model.dtype}, {tc.grad_accum_steps} micro-batch(es) per step"
    )

    # --- Checkpoint: resume from the newest complete one ---------------------------------------------------
    ckpt = checkpoint.Checkpointer(ckpt_dir, keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
    if resume:
        saved = ckpt.restore_config()
        if saved is not None:
            config_lib.check_compatible(config, config_lib.from_dict(saved), resume=True)
        elif os.path.exists(os.path.join(workdir, "config.json")):
            config_lib.check_compatible(config, config_lib.load(workdir), resume=True)
        state = ckpt.restore(state, data_iterator=data_iter)
        say(f"resumed from {ckpt.directory}/{int(state['step'])}")
    if is_main:  # only now: a config that does not fit the workdir's checkpoint must not replace its config
        config_lib.save(config, workdir)
    config_json = json.loads(config.to_json())

    # --- Loop -------------------------------------------------------------------------------------------------
    sampler = make_sampler(config, mesh, sampling_params(state_sharding))
    preview_rows = min(int(config.eval.grid_rows), pipeline.split_size(config))
    preview_size = -(-preview_rows // mesh.size) * mesh.size
    preview_batch = next(previews.global_batches(config, mesh, preview_rows, preview_size))
    writer = MetricWriter(workdir, enabled=is_main)
    batch_keys = (
        ("latent_mean", "latent_logvar", "mask_latent") if config.data.latents else ("image", "label")
    )
    preemption = distributed.Preemption()
    step = int(state["step"])
    started = time.time()
    window_start, window_steps = time.time(), 0
    last, pending = {}, []
    tty = sys.stdout.isatty() and not quiet and is_main
    try:
        while step < tc.steps:
            local = next(data_iter)
            batch = {k: sharding.to_global(local[k], mesh) for k in batch_keys}
            state, metrics = train_step(state, batch)
            step += 1
            window_steps += 1
            # Checked on the host only at log/save points, never a sync per step; the copy to the host starts
            # now, behind the next steps, so that check finds the values already there.
            for x in jax.tree.leaves(metrics):
                x.copy_to_host_async()
            pending.append((step, metrics))
            preempted = preemption.reached(step)
            log_now = step % tc.log_every == 0 or step == tc.steps
            save_now = step % tc.checkpoint_every == 0 or step == tc.steps or preempted
            if log_now or save_now:
                bad = _first_non_finite(pending)
                if bad is not None:
                    kept = ckpt.latest_step()
                    raise SemFlowError(
                        f"{bad[1]} became {bad[2]} at step {bad[0]}; stopped without saving "
                        f"(newest checkpoint: {'none' if kept is None else kept})"
                    )
                pending = []
            if log_now:
                rate = window_steps / (time.time() - window_start)
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last.update(steps_per_sec=rate, data_crc32=batch_fingerprint(local))
                writer.write_scalars(step, last)
                line = _progress(step, tc.steps, last["loss"], rate, started)
                print("\r" + line, end="", flush=True) if tty else say(line)
                window_start, window_steps = time.time(), 0
            if save_now:
                ckpt.save(step, state, data_iter, config_json, force=True)
            if step % tc.sample_every == 0 or step == tc.steps:
                picture = previews.preview_grid(  # all processes take part
                    config, sampler, sampling_params(state), preview_batch, vae_params=state.get("vae")
                )
                if is_main:
                    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
                    save_png(os.path.join(workdir, "samples", f"step_{step:06d}.png"), picture)
                    writer.write_image(step, "samples", picture)
            if preempted:
                break
    finally:
        if tty:
            print()
        preemption.close()
        ckpt.wait()  # an interrupted run still commits the save it started
        ckpt.close()
        writer.close()
    if step < tc.steps:
        say(f"preempted: saved checkpoint {step}, exiting; rerun the same command to resume")
        return {**last, "preempted_at": step}
    say(f"trained {step} steps in {time.time() - started:.0f}s; checkpoints in {ckpt.directory}")
    return last


def main(argv):
    """CLI entry: --config and --workdir, and the multi-process flags of semflow_jax.distributed."""
    del argv
    from absl import flags

    distributed.initialize_from_flags()
    # A rerun or resume skips compiling what it compiled before (on the CPU, not the train step: build_training).
    cache.enable_compilation_cache()
    train_and_checkpoint(flags.FLAGS.config, flags.FLAGS.workdir)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/shapes.py[:tiny].", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
    flags.mark_flags_as_required(["config", "workdir"])
    distributed.define_flags()


if __name__ == "__main__":
    from semflow_jax.errors import run_cli

    _define_flags()
    run_cli(main, "semflow_jax.train")
