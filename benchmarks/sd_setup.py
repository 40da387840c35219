"""The SD-1.5-sized latent train step as the benchmarks build it: configs/coco.py on a weightless model folder.

benchmarks/memory.py compiles it abstractly (its buffer plan), benchmarks/accelerator.py runs it (its FLOP/s).
The folder holds only the published configs of the SD 1.5 UNet and VAE (tests/fixtures/sd15_keys.json) or of
the tests' tiny SD models (tests/fixtures/sd_tiny.json), and an empty-prompt embedding of zeros: parameters
are initialized at random, which costs the same FLOPs and bytes as the real weights. Importing this module
sets nothing (memory.py sets its own XLA options before jax starts).
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (compute dtype, remat, EMA decay, Adam first-moment dtype, FSDP devices)
VARIANTS = {
    "fp32_paper": ("float32", True, 0.0, "float32", 1),  # COCO's float32, no EMA (as the official code)
    "bf16_remat_paper": ("bfloat16", True, 0.0, "float32", 1),  # the official optimizer state, bf16 compute
    "bf16_remat": ("bfloat16", True, 0.9999, "float32", 1),  # plus an EMA copy
    "bf16_remat_lean": ("bfloat16", True, 0.0, "bfloat16", 1),  # no EMA, Adam's first moment in bf16
    "bf16_remat_fsdp8": ("bfloat16", True, 0.9999, "float32", 8),  # the EMA variant split over 8 devices
    "bf16_paper": ("bfloat16", False, 0.0, "float32", 1),  # no rematerialization: every FLOP is the model's
}
MODELS = ("sd15", "tiny")  # the published SD 1.5 sizes, or the tests' tiny SD models (seconds on a CPU)


def model_folder(dst: str, model: str = "sd15") -> str:
    """A model.pretrained folder at dst with the UNet's and VAE's configs and a zero empty-prompt embedding."""
    if model == "sd15":
        configs = json.load(open(os.path.join(ROOT, "tests", "fixtures", "sd15_keys.json")))["configs"]
    elif model == "tiny":
        tiny = json.load(open(os.path.join(ROOT, "tests", "fixtures", "sd_tiny.json")))
        configs = {"unet": tiny["unet_sd1"]["config"], "vae": tiny["vae"]["config"]}
    else:
        raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
    for kind in ("unet", "vae"):
        os.makedirs(os.path.join(dst, kind), exist_ok=True)
        json.dump(configs[kind], open(os.path.join(dst, kind, "config.json"), "w"))
    context = int(configs["unet"]["cross_attention_dim"])
    np.save(os.path.join(dst, "empty_prompt.npy"), np.zeros((77, context), np.float32))
    return dst


def coco_config(
    pretrained: str, variant: str, image_size: int = 512, attention_chunk: int = 1024, batch_size: int = 1
):
    """configs/coco.py on the folder, set to the variant (see VARIANTS), batch_size examples per step."""
    from semflow_jax import config_lib

    dtype, remat, ema_decay, mu_dtype, fsdp = VARIANTS[variant]
    spec = importlib.util.spec_from_file_location("coco_config", os.path.join(ROOT, "configs", "coco.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"pretrained={pretrained}")
    config.model.dtype, config.model.remat = dtype, remat
    config.data.image_size, config.model.attention_chunk = image_size, attention_chunk
    config.train.ema_decay, config.train.mu_dtype = ema_decay, mu_dtype
    config.mesh = (("data", 1), ("fsdp", fsdp))
    config.train.batch_size_per_device, config.train.batch_size = 0, batch_size
    config.train.grad_accum_steps = 1  # the step over the whole batch: what these benchmarks measure
    return config_lib.validate(config)


def train_step(config, mesh):
    """(abstract state, its shardings, the batch's sharding, the jitted donating train step) on mesh.

    Not `train.build_training(init=False)`: that one adds the CPU's malloc compiler options, which would
    change the buffer plan memory.py reports (for a TPU compiled ahead of time on this CPU too)."""
    import jax

    from semflow_jax import sharding
    from semflow_jax.models import build_model
    from semflow_jax.state import init_state, make_optimizer
    from semflow_jax.train import make_train_step

    model, tx = build_model(config), make_optimizer(config.train)
    shapes = jax.eval_shape(lambda r: init_state(config, model, tx, r), jax.random.PRNGKey(0))
    state_sharding = sharding.state_sharding(shapes, mesh, config.fsdp_min_size)
    batch_sharding = sharding.batch_sharding(mesh)
    step = jax.jit(
        make_train_step(config, model, tx, mesh),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    return shapes, state_sharding, batch_sharding, step


def random_state(abstract, shardings, seed: int = 0):
    """A train state of `abstract`'s shapes and dtypes on `shardings`, without the model's own init (whose
    compile took 16 s of a 33 s run for the tiny models): every floating leaf but the optimizer's is drawn
    from N(0, 0.02^2), the optimizer's moments and the integer leaves are zero, as at step 0. One random
    draw, sliced: a step costs the same FLOPs and bytes on these values as on trained ones."""
    import math

    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)

    def drawn(path, leaf):
        return jnp.issubdtype(leaf.dtype, jnp.floating) and getattr(path[0], "key", None) != "opt"

    sizes = [math.prod(leaf.shape) if drawn(path, leaf) else 0 for path, leaf in leaves]

    def make():
        flat = 0.02 * jax.random.normal(jax.random.PRNGKey(seed), (max(sum(sizes), 1),), jnp.float32)
        out, offset = [], 0
        for (_, leaf), size in zip(leaves, sizes, strict=True):
            if size:
                out.append(flat[offset : offset + size].reshape(leaf.shape).astype(leaf.dtype))
                offset += size
            else:
                out.append(jnp.zeros(leaf.shape, leaf.dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    return jax.jit(make, out_shardings=shardings)()
