"""The networks that judge synthesized images, jitted over the evaluation mesh: FID Inception features, LPIPS
distances and the label-alignment segmenter, plus the cached real-image FID statistics.

Each takes and returns global arrays split over the mesh's batch axis, so evaluation runs them on every
device and host exactly like the sampler; padded rows are dropped by the caller through its "valid" mask.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib

import jax
import jax.numpy as jnp

from semflow_jax import config_lib, sharding
from semflow_jax.cache import cache_root
from semflow_jax.metrics import fid, inception, lpips

LPIPS_MIN_SIDE = 64  # AlexNet's five stages need room: smaller images are upsampled (bilinear) to this side


def inception_features(mesh, params_path: str | None = None):
    """jitted uint8 images [B, H, W, 3] (split over mesh) -> pool3 features [B, 2048] (split likewise)."""
    from semflow_jax.metrics.convert_inception import ensure_params

    path = ensure_params(params_path)
    params = jax.device_put(inception.load_params(path), sharding.replicated(mesh))
    model, batch = inception.FIDInception(), sharding.batch_sharding(mesh)
    apply = jax.jit(
        lambda p, x: model.apply({"params": p}, x),
        in_shardings=(sharding.replicated(mesh), batch),
        out_shardings=batch,
    )
    return lambda images: apply(params, images), path


def lpips_distance(mesh):
    """jitted (uint8 images a, uint8 images b) [B, H, W, 3] (split over mesh) -> LPIPS (AlexNet) [B].

    Images whose shorter side is under LPIPS_MIN_SIDE are upsampled bilinearly first (both the same way).
    """
    params = jax.device_put(lpips.load_params("alexnet"), sharding.replicated(mesh))
    model, batch = lpips.LPIPS(net="alexnet"), sharding.batch_sharding(mesh)

    def prepare(images):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        n, h, w, c = x.shape
        if min(h, w) < LPIPS_MIN_SIDE:
            f = LPIPS_MIN_SIDE / min(h, w)
            x = jax.image.resize(x, (n, round(h * f), round(w * f), c), "bilinear")
        return x

    apply = jax.jit(
        lambda p, a, b: model.apply(p, prepare(a), prepare(b)),
        in_shardings=(sharding.replicated(mesh), batch, batch),
        out_shardings=batch,
    )
    return lambda a, b: apply(params, a, b)


def file_checksum(path: str) -> str:
    """crc32 of a file (which converted Inception weights made a statistics file)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def real_stats_path(config, num_examples: int, inception_path: str, split: str = "validation") -> str:
    """Cache file of the real images' FID statistics: one per dataset, folder, split, size, example count
    (and seed for the procedural shapes) and Inception weights."""
    d = config.data
    ident = {
        "dataset": d.name,
        "root": os.path.abspath(d.root) if d.root else "",
        "split": split,
        "image_hw": list(config_lib.image_hw(config)),
        "num_examples": int(num_examples),
        "inception": file_checksum(inception_path),
    }
    if d.name == "shapes":
        ident["seed"] = int(config.seed)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_root(), "fid_stats", f"{d.name}-{split}-{digest}.npz")


def load_real_stats(path: str):
    """(mu, sigma) from the cache, or None when it has not been computed yet."""
    return fid.load_stats(path) if os.path.exists(path) else None
