"""The programs a run compiles, built for any mesh from the config alone: what `semflow_jax.plan` compiles.

Each `Program` is the very jitted function the run calls (its shardings, donation and compiler options come
from the module that runs it), with abstract arguments (shapes, dtypes, shardings; nothing allocated):
- train_step: `train.build_training(init=False)`'s step, on the train mesh, over one global batch;
- sampler: `Sampler.compiled(flow.steps, flow.solver)`, the one integrator both directions call, over one
  evaluation batch, parameters laid out as evaluation restores them;
- sampler_encode / sampler_decode (latent mode): the sampler's VAE encoding of images and decoding of the
  final state, around the integrator;
- latent_encoder (latent mode): `data.latents`' encoder of a dataset's latents, on one host's chips;
- segmenter_step (when the evaluation scores label alignment): the judge's train step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from semflow_jax import config_lib, sharding

NAMES = ("train_step", "sampler", "sampler_encode", "sampler_decode", "latent_encoder", "segmenter_step")


@dataclasses.dataclass
class Program:
    """One jitted function of a run with abstract arguments, ready to lower and compile."""

    name: str
    what: str
    jitted: Any
    args: tuple
    mesh: Mesh
    examples: int  # global examples per call
    state: Any = (
        None  # abstract tree of what the program keeps between calls (its per-chip bytes are reported)
    )
    model_jaxpr: Callable[[], Any] | None = (
        None  # the program as the model runs it, without rematerialization
    )

    @property
    def devices(self) -> int:
        return self.mesh.size


def bytes_per_chip(tree) -> float:
    """Bytes of one device's shard of every leaf (ShapeDtypeStructs carrying shardings), the largest device's."""
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += float(np.prod(shape, dtype=np.float64)) * jnp.dtype(leaf.dtype).itemsize
    return total


def _abstract(shape, dtype, shard):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=shard)


def train_batch(config, mesh) -> dict:
    """The abstract global batch the train step reads: uint8 images and labels, or cached latents."""
    bs, b = sharding.batch_sharding(mesh), int(config.train.batch_size)
    if config.data.latents:
        from semflow_jax.models import flow_shape

        latent = flow_shape(config)
        return {
            k: _abstract((b, *latent), jnp.float32, bs)
            for k in ("latent_mean", "latent_logvar", "mask_latent")
        }
    h, w = config_lib.image_hw(config)
    return {"image": _abstract((b, h, w, 3), jnp.uint8, bs), "label": _abstract((b, h, w), jnp.uint8, bs)}


def train_step(config, mesh) -> Program:
    """The train step of config on mesh (config already batch-resolved for the mesh)."""
    from semflow_jax import train
    from semflow_jax.state import make_optimizer

    sharding.check_batch(config.train.batch_size, mesh, "train.batch_size")
    sharding.check_batch(
        config.train.batch_size // config.train.grad_accum_steps, mesh, "train.batch_size / grad_accum_steps"
    )
    _, state, _, step = train.build_training(config, mesh, init=False)
    batch = train_batch(config, mesh)

    def model_jaxpr():
        plain = ml_collections.ConfigDict(config.to_dict())
        plain.model.remat = False
        model, tx = train.build_model(plain), make_optimizer(plain.train)
        return jax.make_jaxpr(train.make_train_step(plain, model, tx, mesh))(state, batch)

    what = (
        f"train step: {config.train.batch_size} examples, {config.train.grad_accum_steps} micro-batch(es), "
        f"{config.model.dtype} compute, remat {bool(config.model.remat)}"
    )
    return Program(
        "train_step", what, step, (state, batch), mesh, int(config.train.batch_size), state, model_jaxpr
    )


def _eval_state(config, mesh):
    from semflow_jax.state import abstract_train_state, sampling_params

    template = abstract_train_state(config, mesh, fsdp=True)
    return sampling_params(template), template.get("vae")


def sampler_programs(config, mesh) -> list[Program]:
    """The evaluation's integrator (one executable, the direction an argument) and, in latent mode, the VAE
    encoding and decoding around it, over one evaluation batch."""
    from semflow_jax.models import flow_shape
    from semflow_jax.sampling import make_sampler

    b = int(config.eval.batch_size)
    sharding.check_batch(b, mesh, "eval.batch_size")
    params, vae = _eval_state(config, mesh)
    sampler = make_sampler(config, mesh, jax.tree.map(lambda x: x.sharding, params))
    steps, solver = int(config.flow.steps), config.flow.solver
    bs = sharding.batch_sharding(mesh)
    z = _abstract((b, *flow_shape(config)), jnp.float32, bs)
    direction = _abstract((), jnp.float32, sharding.replicated(mesh))
    integrate = sampler.compiled(steps, solver)
    out = [
        Program(
            "sampler",
            f"sampler: {steps} {solver} steps over {b} examples, one executable for both directions",
            integrate,
            (params, z, direction),
            mesh,
            b,
            params,
            lambda: jax.make_jaxpr(integrate)(params, z, direction),
        )
    ]
    if vae is not None:
        h, w = config_lib.image_hw(config)
        images = _abstract((b, h, w, 3), jnp.uint8, bs)
        encode, decode = sampler.image_in, sampler.image_out
        out.append(Program("sampler_encode", f"sampler: VAE encoding of {b} images", encode, (images, vae),
                           mesh, b, vae, lambda: jax.make_jaxpr(encode)(images, vae)))  # fmt: skip
        out.append(Program("sampler_decode", f"sampler: VAE decoding of {b} final states", decode, (z, vae),
                           mesh, b, vae, lambda: jax.make_jaxpr(decode)(z, vae)))  # fmt: skip
    return out


def latent_encoder(config, mesh, mask_samples: int = 4) -> Program:
    """`python -m semflow_jax.data.latents`' encoder on process 0's devices of mesh, its default batch."""
    from semflow_jax.data import latents
    from semflow_jax.models import build_vae

    local = [d for d in mesh.devices.flat if d.process_index == mesh.devices.flat[0].process_index]
    enc_mesh = latents.encoder_mesh(local)
    encode = latents._encoder(config, mask_samples, enc_mesh)
    b = latents.BATCH_PER_DEVICE * len(local)
    h, w = config_lib.image_hw(config)
    vae = build_vae(config)
    repl, bs = sharding.replicated(enc_mesh), sharding.batch_sharding(enc_mesh)
    shapes = jax.eval_shape(lambda r: vae.init(r, jnp.zeros((1, h, w, 3)))["params"], jax.random.PRNGKey(0))
    params = jax.tree.map(lambda s: _abstract(s.shape, s.dtype, repl), shapes)
    args = (
        params,
        _abstract((b, h, w, 3), jnp.uint8, bs),
        _abstract((b, h, w), jnp.uint8, bs),
        _abstract((b,), jnp.int32, bs),
        _abstract((), jnp.int32, repl),
    )
    what = (
        f"latent encoder: {b} examples, {mask_samples} perturbed masks each, on one host's {len(local)} chips"
    )
    return Program(
        "latent_encoder", what, encode, args, enc_mesh, b, params, lambda: jax.make_jaxpr(encode)(*args)
    )


def segmenter_step(config, mesh) -> Program:
    """The label-alignment segmenter's train step, as semflow_jax.segmenter trains it on the eval mesh."""
    from semflow_jax import segmenter

    init, step = segmenter.make_training(config, mesh)
    b = segmenter.batch_size(config, mesh)
    h, w = config_lib.image_hw(config)
    bs, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    state = jax.tree.map(
        lambda s: _abstract(s.shape, s.dtype, repl), jax.eval_shape(init, jax.random.PRNGKey(0))
    )
    args = (state, _abstract((b, h, w, 3), jnp.uint8, bs), _abstract((b, h, w), jnp.uint8, bs))
    return Program("segmenter_step", f"segmenter train step: {b} examples", step, args, mesh, b, state,
                   lambda: jax.make_jaxpr(step)(*args))  # fmt: skip


def programs(config, devices, wanted=NAMES) -> list[Program]:
    """Every program of NAMES in `wanted` that a run of config uses, for `devices` (the slice's chips):
    training on config.mesh over them, evaluation on the same mesh."""
    train_mesh = sharding.mesh_from_config(config.mesh, devices)
    config = config_lib.resolve_batch(config, train_mesh.size)
    out = []
    if "train_step" in wanted:
        out.append(train_step(config, train_mesh))
    if {"sampler", "sampler_encode", "sampler_decode"} & set(wanted):
        out += [p for p in sampler_programs(config, train_mesh) if p.name in wanted]
    if "latent_encoder" in wanted and config.flow.space == "latent":
        out.append(latent_encoder(config, train_mesh))
    if "segmenter_step" in wanted and config.eval.label_alignment:
        out.append(segmenter_step(config, train_mesh))
    return out
