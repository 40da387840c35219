"""The training state: the optimizer, the initial state {"params", "opt", "ema", "step", "rng"}, its
abstract form (shapes, dtypes, shardings: what a checkpoint is restored into), and the weights sampling uses.
train, eval and the numpy API build it here, the one place that knows its layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from semflow_jax import config_lib, sharding
from semflow_jax.models import build_model, build_vae, flow_shape


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


def global_norm(tree) -> jax.Array:
    """The gradients' global L2 norm, accumulated in float32 whatever their dtype."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm that takes compute-dtype gradients and hands on float32 ones.

    Widening each leaf inside this one elementwise op (instead of as a tree of its own) lets the compiler
    fuse it into the Adam update that reads it: a bfloat16 gradient tree never gets a float32 twin in memory.
    """

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g.astype(jnp.float32) * factor, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(tc):
    """AdamW with global-norm gradient clipping (the paper: wd 0.01, clip 1.0).

    tc.mu_dtype="bfloat16" keeps Adam's first moment in bfloat16 (2 bytes per parameter less); the second
    moment stays float32, where bfloat16's 8-bit mantissa would distort the step size.
    """
    mu_dtype = None if tc.mu_dtype == "float32" else jnp.dtype(tc.mu_dtype)
    return optax.chain(
        clip_by_global_norm(tc.grad_clip),
        optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mu_dtype=mu_dtype),
    )


def sampling_params(state):
    """The weights evaluation and sampling use: the EMA, or the trained parameters when it is off."""
    return state["ema"] if "ema" in state else state["params"]


def init_state(config, model, tx, rng, pretrained=None):
    """{"params", "opt", "ema", "step", "rng"} (+ "vae" in latent mode): plain pytrees, the EMA starting at
    the initial parameters. train.ema_decay = 0 keeps no EMA (one parameter copy less in memory).

    "rng" is the training key, split once per step: it is part of the state so a resumed run draws the
    same times, perturbations and dropout masks as an uninterrupted one. `pretrained` ({"params", "vae"}
    arrays from models.load_pretrained) replaces the random initialization where given; the VAE is frozen
    (no optimizer state) and only passes through the step.
    """
    pretrained = pretrained or {}
    init_rng, train_rng = jax.random.split(rng)
    h, w, c = flow_shape(config)
    params = model.init(init_rng, jnp.zeros((1, h, w, c), jnp.float32), jnp.zeros((1,), jnp.float32))[
        "params"
    ]
    params = pretrained.get("params", params)
    state = {
        "params": params,
        "opt": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": train_rng,
    }
    if float(config.train.ema_decay) > 0:
        state["ema"] = params
    vae = build_vae(config)
    if vae is not None:
        ih, iw = config_lib.image_hw(config)
        x = jnp.zeros((1, ih, iw, 3), jnp.float32)
        vae_params = pretrained.get("vae")
        state["vae"] = vae.init(jax.random.fold_in(rng, 1), x)["params"] if vae_params is None else vae_params
    return state


def abstract_train_state(config, mesh=None, fsdp: bool = False):
    """Shapes, dtypes and shardings of the training state {"params", "opt", "ema", "step", "rng"}.

    Replicated over `mesh` (default: this process's devices), or laid out by the FSDP rule with fsdp=True.
    """
    mesh = sharding.local_mesh() if mesh is None else mesh
    model = build_model(config)
    tx = make_optimizer(config.train)
    shapes = jax.eval_shape(lambda r: init_state(config, model, tx, r), jax.random.PRNGKey(0))
    if fsdp:
        shardings = sharding.state_sharding(shapes, mesh, config.fsdp_min_size)
    else:
        shardings = jax.tree.map(lambda _: sharding.replicated(mesh), shapes)
    return sharding.with_shardings(shapes, shardings)
