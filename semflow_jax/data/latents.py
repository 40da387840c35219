"""Encode a dataset's VAE latents once, for latent-mode training without the VAE encoder in the step:
`python -m semflow_jax.data.latents --config=configs/coco.py:root=DIR,pretrained=SD --out=LATENTS
[--mask_samples=4] [--flip] [--dtype=float32|float16] [--batch_size=N] [--num_shards=N]`,
then train with `--config.data.latents=LATENTS`.

Each training image is resized to the model's size (no random crop: a cached latent cannot be re-cropped)
and encoded to its posterior (mean, logvar): training still draws a fresh posterior sample every step, as
the paper does. The painted mask is perturbed (|eps| < beta) and encoded to its posterior mode
`mask_samples` times with independent perturbations; training picks one of them at random per step (the
paper draws a new perturbation every step, so mask_samples = 1 freezes each mask's perturbation for the
run). With --flip every example is stored a second time, mirrored, standing in for the random flip.

The output is ArrayRecord shards `train.array_record-*` (msgpack records {"id", "flip", "mean", "logvar",
"masks"}: raw arrays of `dtype`) and `latents.json`, which records what the latents were made from
(image size, anchors, beta, class count, a checksum of the VAE weights). Training refuses latents that do
not match its config. Shards appear only when every one is written.
"""

from __future__ import annotations

import json
import os
import sys

import msgpack
import numpy as np

from semflow_jax.data.latent_source import META, SPLIT, expected_meta
from semflow_jax.errors import SemFlowError, atomic_write_bytes

# Examples each local device encodes per batch unless --batch_size says otherwise.
BATCH_PER_DEVICE = 8


def encoder_mesh(devices):
    """The mesh the encoder runs on: one process's devices, on one data axis (each process encodes its own
    examples into its own shards, so no collective crosses hosts)."""
    from jax.sharding import Mesh

    return Mesh(np.asarray(devices), ("data",))


def _encoder(config, mask_samples: int, mesh):
    """jitted (vae params, uint8 images [B, H, W, 3], uint8 labels [B, H, W], example indices [B], mirrored)
    -> (mean, logvar, masks [B, K, h, w, c]), batch split over mesh. Each example's perturbations come from
    (seed, its index, mirrored): the same latents whatever the batch size or process count."""
    import jax
    import jax.numpy as jnp

    from semflow_jax import flow, sharding
    from semflow_jax.models import Codec, build_vae
    from semflow_jax.models.sd import SDVAE

    vae = build_vae(config)
    codec = Codec(vae)
    anchors = jnp.asarray(
        flow.anchors_for(config.data.num_classes, config.anchors.base, config.anchors.spacing)
    )
    beta, seed_key = float(config.flow.beta), jax.random.PRNGKey(config.seed)

    def encode(params, images, labels, indices, mirrored):
        mean, logvar = vae.apply({"params": params}, flow.image_to_flow(images), method=SDVAE.encode)
        painted = flow.labels_to_mask(labels, anchors)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(seed_key, i), mirrored))(indices)
        masks = []
        for j in range(mask_samples):
            noisy = jax.vmap(lambda k, m, j=j: flow.perturb(jax.random.fold_in(k, j), m, beta))(keys, painted)
            masks.append(codec.encode(params, noisy))
        return mean, logvar, jnp.stack(masks, axis=1)

    batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(
        encode,
        in_shardings=(replicated, batch, batch, batch, replicated),
        out_shardings=(batch, batch, batch),
    )


def encode_dataset(config, out: str, mask_samples: int = 4, flip: bool = False, dtype: str = "float32",
                   batch_size: int = 0, num_shards: int = 8, quiet: bool = False) -> dict:  # fmt: skip
    """Encodes config's training split into out/ (see the module docstring); returns latents.json's dict.

    Runs on this process's devices; with several processes each encodes examples p, p + P, ... into its
    own shards, and process 0 writes latents.json after all have finished.
    """
    import grain
    import jax
    from tqdm import tqdm

    from semflow_jax import config_lib, sharding
    from semflow_jax.data import pipeline, records
    from semflow_jax.models import load_pretrained

    config = config_lib.validate(config)
    if config.flow.space != "latent":
        raise SemFlowError(
            "latents are for flow.space=latent configs (with model.pretrained holding the VAE)"
        )
    if mask_samples < 1:
        raise SemFlowError(f"--mask_samples must be >= 1, got {mask_samples}")
    if dtype not in ("float32", "float16"):
        raise SemFlowError(f"--dtype must be float32 or float16, got {dtype!r}")
    if config.data.latents:
        raise SemFlowError("the config already reads cached latents (data.latents); encode from the images")
    pid, nproc = jax.process_index(), jax.process_count()
    devices = jax.local_devices()
    mesh = encoder_mesh(devices)
    batch_size = batch_size or BATCH_PER_DEVICE * len(devices)
    if batch_size % len(devices):
        raise SemFlowError(f"--batch_size={batch_size} must be divisible by the {len(devices)} local devices")
    source = pipeline.make_source(config, SPLIT)
    indices = np.arange(pid, len(source), nproc)
    if len(indices) == 0:
        raise SemFlowError(f"the {SPLIT} split of {config.data.name} is empty")
    encode = _encoder(config, mask_samples, mesh)
    vae_params = jax.device_put(load_pretrained(config)["vae"], sharding.replicated(mesh))
    transform = pipeline.eval_transform(config)
    read = grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch)
    ds = grain.MapDataset.source(source)[pid::nproc].map(transform).batch(batch_size, drop_remainder=False)

    os.makedirs(out, exist_ok=True)
    shards = max(1, min(num_shards, len(indices) * (2 if flip else 1)))
    total = nproc * shards
    paths = [records.shard_paths(out, SPLIT, total)[pid * shards + i] for i in range(shards)]
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = [f"{p}.partial" for p in paths]
    writers = [ArrayRecordWriter(t, "group_size:1") for t in tmp]
    written = 0
    try:
        start = 0
        bar = tqdm(
            total=len(indices), desc=f"encoding {config.data.name}", unit="ex", disable=quiet, file=sys.stderr
        )
        for batch in ds.to_iter_dataset(read):
            n = len(batch["image"])
            idx = indices[start : start + n]
            start += n
            for mirrored in (False, True) if flip else (False,):
                images, labels = batch["image"], batch["label"]
                if mirrored:
                    images, labels = images[:, :, ::-1], labels[:, :, ::-1]
                pad = batch_size - n
                images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
                labels = np.concatenate([labels, np.zeros((pad,) + labels.shape[1:], labels.dtype)])
                rows = np.concatenate([idx, np.zeros(pad, idx.dtype)]).astype(np.int32)
                outs = encode(vae_params, images, labels, rows, np.int32(mirrored))
                mean, logvar, masks = (np.asarray(x)[:n].astype(dtype) for x in outs)
                ok = batch["ok"]
                for r in range(n):
                    if not ok[r]:
                        continue  # a bad example skip_bad replaced: not cached at all
                    rec = {"id": int(idx[r]), "flip": mirrored, "mean": mean[r].tobytes(),
                           "logvar": logvar[r].tobytes(), "masks": masks[r].tobytes()}  # fmt: skip
                    writers[written % shards].write(msgpack.packb(rec))
                    written += 1
            bar.update(n)
        bar.close()
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            try:
                w.close()
            except Exception:  # already closed, or failed half-way: the file goes either way
                pass
        for t in tmp:
            if os.path.exists(t):
                os.remove(t)
        raise
    for t, p in zip(tmp, paths, strict=True):
        os.replace(t, p)
    meta = {**expected_meta(config), "dtype": dtype, "mask_samples": mask_samples, "flip": flip}
    if nproc > 1:  # latents.json marks the folder complete: only once every process has renamed its shards
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("semflow_jax.data.latents written")
    if pid == 0:
        atomic_write_bytes(os.path.join(out, META), (json.dumps(meta, indent=2) + "\n").encode())
    if not quiet and pid == 0:
        print(
            f"wrote {written} latent records in {shards} shard(s) to {out}; train with --config.data.latents={out}"
        )
    return meta


def main(argv):
    """CLI entry."""
    del argv
    from absl import flags

    from semflow_jax import distributed

    distributed.initialize_from_flags()
    f = flags.FLAGS
    encode_dataset(f.config, f.out, f.mask_samples, f.flip, f.dtype, f.batch_size, f.num_shards)


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from semflow_jax import distributed
    from semflow_jax.errors import run_cli

    config_flags.DEFINE_config_file(
        "config", None, "A latent-mode config, e.g. configs/coco.py:root=D,pretrained=P."
    )
    flags.DEFINE_string("out", None, "Folder for the latent shards and latents.json.")
    flags.DEFINE_integer(
        "mask_samples", 4, "Perturbed encodings stored per mask (training picks one per step)."
    )
    flags.DEFINE_bool("flip", False, "Also store every example mirrored (the random flip of training).")
    flags.DEFINE_string("dtype", "float32", "Storage dtype: float32, or float16 for half the disk.")
    flags.DEFINE_integer("batch_size", 0, "Examples per encoder call (0: 8 per local device).")
    flags.DEFINE_integer("num_shards", 8, "Shards per process.")
    flags.mark_flags_as_required(["config", "out"])
    distributed.define_flags()
    run_cli(main, "semflow_jax.data.latents")
