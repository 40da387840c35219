"""Reading cached VAE latents (made by `python -m semflow_jax.data.latents`) for latent-mode training.

`LatentSource` is the grain source the input pipeline reads them through; `latents.json` records what they
were made from, and training refuses latents that do not match its config (`check_meta`).
"""

from __future__ import annotations

import json
import os
import zlib

import msgpack
import numpy as np

from semflow_jax.errors import SemFlowError

META = "latents.json"
SPLIT = "train"


def vae_checksum(pretrained: str) -> str:
    """crc32 of the VAE's weights and config in a semflow_jax.convert folder (what the latents depend on)."""
    crc = 0
    for name in ("config.json", "params.msgpack"):
        path = os.path.join(pretrained, "vae", name)
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    crc = zlib.crc32(chunk, crc)
        except OSError as e:
            raise SemFlowError(f"cannot read {path}: {e}") from None
    return f"{crc:08x}"


def expected_meta(config) -> dict:
    """The fields of latents.json a config must agree with to train on the latents."""
    from semflow_jax import config_lib
    from semflow_jax.models import flow_shape

    return {
        "dataset": config.data.name,
        "image_hw": list(config_lib.image_hw(config)),
        "latent_shape": list(flow_shape(config)),
        "num_classes": int(config.data.num_classes),
        "anchors": [int(config.anchors.base), float(config.anchors.spacing)],
        "beta": float(config.flow.beta),
        "vae_crc32": vae_checksum(config.model.pretrained),
    }


def read_meta(root: str) -> dict:
    """latents.json of a latent folder; a one-line error where there is none."""
    path = os.path.join(root, META)
    try:
        return json.loads(open(path).read())
    except (OSError, ValueError) as e:
        raise SemFlowError(
            f"{path} is missing or unreadable ({e}): make the latents with python -m semflow_jax.data.latents"
        ) from None


def check_meta(config, meta: dict) -> None:
    """Refuses latents made for another image size, VAE, class count, anchors or beta than config's."""
    want = expected_meta(config)
    for key, value in want.items():
        if meta.get(key) != value:
            raise SemFlowError(
                f"data.latents={config.data.latents} were made with {key}={meta.get(key)}, but the config "
                f"gives {value}: encode them again for this config"
            )


class LatentSource:
    """grain random-access source over cached latents: {"mean", "logvar" [h, w, c], "masks" [K, h, w, c]}
    as float32, checked against config on construction."""

    def __init__(self, config):
        import grain

        from semflow_jax.data import records

        self.meta = read_meta(config.data.latents)
        check_meta(config, self.meta)
        self._shape = tuple(self.meta["latent_shape"])
        self._dtype = np.dtype(self.meta["dtype"])
        self._k = int(self.meta["mask_samples"])
        self._source = grain.sources.ArrayRecordDataSource(records.find_shards(config.data.latents, SPLIT))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        rec = msgpack.unpackb(self._source[int(index)])

        def array(key, shape):
            return np.frombuffer(rec[key], self._dtype).reshape(shape).astype(np.float32)

        return {
            "mean": array("mean", self._shape),
            "logvar": array("logvar", self._shape),
            "masks": array("masks", (self._k,) + self._shape),
        }


def pick_mask(example: dict, rng: np.random.Generator) -> dict:
    """A training row: the image posterior and one of the example's perturbed mask latents, at random."""
    masks = example["masks"]
    return {
        "latent_mean": example["mean"],
        "latent_logvar": example["logvar"],
        "mask_latent": masks[rng.integers(len(masks))],
    }
