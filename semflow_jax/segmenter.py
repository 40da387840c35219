"""The label-alignment judge: a plain supervised segmentation network, trained with cross-entropy on the
same training split, that labels synthesized images so their alignment with the input masks can be scored
the way SPADE and OASIS do. `python -m semflow_jax.segmenter --config=configs/shapes.py [--workdir=DIR]`.

Its settings are the config's `segmenter` block; the network is our UNet with one output per class (and the
time input held at 0). It shares no weights with the SemFlow model, which is the point: the same-model round
trip (mask -> image -> mask) nearly undoes itself whatever the images look like. Without --workdir it goes
to the cache, one folder per dataset and segmenter setting (`cache_dir(config)`), where evaluation looks
for it and, when it is missing, trains it first.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from semflow_jax import checkpoint, config_lib, flow, sharding
from semflow_jax.cache import cache_root
from semflow_jax.data import pipeline
from semflow_jax.errors import SemFlowError, atomic_write_bytes
from semflow_jax.metrics import miou
from semflow_jax.models.unet import UNet

META = "segmenter.json"


def identity(config) -> dict:
    """What a segmenter depends on: the training data (dataset, folder, size, classes; shapes' seed) and
    its own settings."""
    d = config.data
    ident = {
        "dataset": d.name,
        "root": os.path.abspath(d.root) if d.root else "",
        "format": d.format,
        "image_hw": list(config_lib.image_hw(config)),
        "num_classes": int(d.num_classes),
        "segmenter": json.loads(ml_collections.ConfigDict(config.segmenter).to_json()),
    }
    if d.name == "shapes":  # procedural: the scenes are a function of the seed
        ident["seed"] = int(config.seed)
    return ident


def cache_dir(config) -> str:
    """The cache folder of config's segmenter."""
    ident = identity(config)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_root(), "segmenters", f"{config.data.name}-{digest}")


def build(config) -> UNet:
    """The segmentation network of config.segmenter: our UNet with num_classes logits per pixel."""
    s = config.segmenter
    return UNet(
        out_channels=int(config.data.num_classes),
        channels=int(s.channels),
        channel_mults=tuple(int(x) for x in s.channel_mults),
        num_res_blocks=int(s.num_res_blocks),
        attention_resolutions=(),
        num_groups=int(s.num_groups),
    )


def logits_fn(model, params, images):
    """Per-pixel class logits [N, H, W, C] of uint8 images [N, H, W, 3]."""
    x = flow.image_to_flow(images)
    return model.apply({"params": params}, x, jnp.zeros((x.shape[0],), jnp.float32)).astype(jnp.float32)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy over the pixels that are not ignore (255)."""
    valid = labels != flow.IGNORE_LABEL
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    return jnp.sum(jnp.where(valid, per_pixel, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def make_predict(config, mesh):
    """jitted (params, uint8 images [B, H, W, 3] split over mesh) -> uint8 class ids [B, H, W]."""
    model = build(config)
    batch = sharding.batch_sharding(mesh)

    def predict(params, images):
        return jnp.argmax(logits_fn(model, params, images), axis=-1).astype(jnp.uint8)

    return jax.jit(predict, in_shardings=(sharding.replicated(mesh), batch), out_shardings=batch)


def _abstract_params(config):
    model = build(config)
    h, w = config_lib.image_hw(config)
    return jax.eval_shape(
        lambda r: model.init(r, jnp.zeros((1, h, w, 3)), jnp.zeros((1,)))["params"], jax.random.PRNGKey(0)
    )


def batch_size(config, mesh) -> int:
    """The segmenter's global batch on mesh: segmenter.batch_size, rounded up to a multiple of the device
    count so that a slice with more devices than the configured batch still trains it."""
    return -(-int(config.segmenter.batch_size) // mesh.size) * mesh.size


def make_training(config, mesh):
    """(init: key -> state, the jitted donating train step (state, uint8 images, uint8 labels) -> (state,
    loss)) of config's segmenter on mesh: parameters and AdamW state replicated, the batch split."""
    s = config.segmenter
    model = build(config)
    warmup = min(int(s.warmup_steps), int(s.steps) // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, float(s.lr), warmup, max(int(s.steps), warmup + 1))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    repl = sharding.replicated(mesh)
    h, w = config_lib.image_hw(config)

    def init(rng):
        params = model.init(rng, jnp.zeros((1, h, w, 3)), jnp.zeros((1,)))["params"]
        return {"params": params, "opt": tx.init(params)}

    def step(state, images, labels):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(logits_fn(model, p, images), labels))(
            state["params"]
        )
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

    batch = sharding.batch_sharding(mesh)
    step = jax.jit(step, in_shardings=(repl, batch, batch), out_shardings=(repl, repl), donate_argnums=(0,))
    return jax.jit(init, out_shardings=repl), step


def train(config, workdir: str | None = None, quiet: bool = False) -> dict:
    """Trains config's segmenter into workdir (default: its cache folder); returns its meta, which holds
    its own validation mIoU on real images (the ceiling of the alignment score)."""
    config = config_lib.validate(config)
    workdir = workdir or cache_dir(config)
    s = config.segmenter
    mesh = sharding.mesh_from_config(config.mesh)
    is_main = jax.process_index() == 0
    say = (lambda *a: None) if quiet or not is_main else (lambda *a: print(*a, flush=True))
    data_config = ml_collections.ConfigDict(config.to_dict())
    data_config.train.batch_size = batch_size(config, mesh)
    data_config.seed = int(config.seed) + 7  # not the same shuffle as SemFlow's own run
    data = pipeline.train_iterator(data_config, jax.process_index(), jax.process_count())
    init, step = make_training(config, mesh)
    repl = sharding.replicated(mesh)
    state = init(jax.random.PRNGKey(config.seed + 7))
    say(
        f"training the label-alignment segmenter ({int(s.steps)} steps, batch {data_config.train.batch_size}) "
        f"into {workdir}"
    )
    started = time.time()
    for i in range(int(s.steps)):
        local = next(data)
        state, loss = step(
            state, sharding.to_global(local["image"], mesh), sharding.to_global(local["label"], mesh)
        )
        if (i + 1) % max(int(s.steps) // 5, 1) == 0:
            say(
                f"  segmenter step {i + 1}/{int(s.steps)}  loss {float(loss):.4f}  [{time.time() - started:.0f}s]"
            )

    # Its own score on real validation images: how much the alignment numbers can mean.
    predict = make_predict(config, mesh)
    cm = np.zeros((config.data.num_classes,) * 2, np.int64)
    confusion = jax.jit(
        functools.partial(miou.confusion_matrix_device, num_classes=config.data.num_classes),
        out_shardings=repl,
    )
    n = (
        min(int(config.eval.num_examples), pipeline.split_size(config))
        if config.eval.num_examples > 0
        else -1
    )
    for local in pipeline.eval_batches(config, n, int(config.eval.batch_size), "validation",
                                       jax.process_index(), jax.process_count()):  # fmt: skip
        b = {k: sharding.to_global(v, mesh) for k, v in local.items()}
        cm += np.asarray(
            confusion(predict(state["params"], b["image"]), b["label"], valid=b["valid"]).addressable_data(0)
        )
    meta = {**identity(config), "validation_miou": miou.mean_iou(cm), "steps": int(s.steps),
            "batch_size": data_config.train.batch_size,
            "seconds": time.time() - started}  # fmt: skip
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
    try:
        ckpt.save(int(s.steps), {"params": state["params"]}, force=True)
        ckpt.wait()
    finally:
        ckpt.close()
    if is_main:  # written last: a folder with segmenter.json holds a complete segmenter
        atomic_write_bytes(os.path.join(workdir, META), (json.dumps(meta, indent=2) + "\n").encode())
    say(f"segmenter: validation mIoU {meta['validation_miou']:.2f} on real images  [{meta['seconds']:.0f}s]")
    return meta


def load(config, mesh, workdir: str | None = None, train_if_missing: bool = True, quiet: bool = False):
    """(params replicated over mesh, meta) of config's segmenter from workdir (default: the cache), trained
    there first when it is missing and train_if_missing."""
    workdir = workdir or cache_dir(config)
    meta_path = os.path.join(workdir, META)
    if not os.path.exists(meta_path):
        if not train_if_missing:
            raise SemFlowError(f"no segmenter in {workdir}: train one with python -m semflow_jax.segmenter")
        train(config, workdir, quiet=quiet)
    try:
        meta = json.loads(open(meta_path).read())
    except (OSError, ValueError) as e:
        raise SemFlowError(f"{meta_path} is unreadable ({e}): delete {workdir} to retrain it") from None
    want = identity(config)
    for key in ("dataset", "image_hw", "num_classes"):
        if meta.get(key) != want[key]:
            raise SemFlowError(
                f"the segmenter in {workdir} was trained with {key}={meta.get(key)}, not {want[key]}"
            )
    repl = sharding.replicated(mesh)
    template = {
        "params": jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), _abstract_params(config)
        )
    }
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), create=False, async_save=False)
    try:
        params = ckpt.restore(template)["params"]
    finally:
        ckpt.close()
    return params, meta


def main(argv):
    """CLI entry."""
    del argv
    from absl import flags

    from semflow_jax import distributed

    distributed.initialize_from_flags()
    workdir = flags.FLAGS.workdir or cache_dir(flags.FLAGS.config)
    meta = train(flags.FLAGS.config, workdir)
    if jax.process_index() == 0:
        print(f"segmenter validation mIoU {meta['validation_miou']:.2f}; saved in {workdir}")


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from semflow_jax import distributed
    from semflow_jax.errors import run_cli

    config_flags.DEFINE_config_file(
        "config", None, "A dataset config, e.g. configs/shapes.py.", lock_config=True
    )
    flags.DEFINE_string("workdir", "", "Where to save it (default: the cache folder evaluation looks in).")
    flags.mark_flags_as_required(["config"])
    distributed.define_flags()
    run_cli(main, "semflow_jax.segmenter")
