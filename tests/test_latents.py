"""Cached VAE latents (semflow_jax.data.latents): what is stored, that a train step on them equals the step
that encodes on the fly, the config checks, and a CLI encode -> train -> eval run on tiny random SD models."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes as shapes_config
from semflow_jax import convert, flow
from semflow_jax.data import latent_source, latents, pipeline
from semflow_jax.errors import SemFlowError
from semflow_jax.models import build_vae, load_pretrained
from semflow_jax.models.sd import SDVAE
from tests.test_sd import write_diffusers_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    write_diffusers_folder(tmp / "sd")
    convert.convert(str(tmp / "sd"), str(tmp / "flax"), str(tmp / "sd" / "empty.npy"))
    return str(tmp / "flax")


def latent_config(pretrained, num_train=8):
    config = shapes_config.get_config("tiny")
    config.model.kind, config.model.pretrained, config.flow.space = "sd", pretrained, "latent"
    config.data.num_train = num_train
    return config


def test_stored_latents_are_the_vae_posterior_and_perturbed_mask_modes(sd_folder, tmp_path):
    config = latent_config(sd_folder, num_train=6)
    meta = latents.encode_dataset(config, str(tmp_path / "lat"), mask_samples=2, flip=True, num_shards=2,
                                  batch_size=8, quiet=True)  # fmt: skip
    assert meta["mask_samples"] == 2 and meta["flip"] and meta["latent_shape"] == [8, 8, 4]
    assert sorted(os.listdir(tmp_path / "lat")) == [
        "latents.json",
        "train.array_record-00000-of-00002",
        "train.array_record-00001-of-00002",
    ]
    config.data.latents = str(tmp_path / "lat")
    source = latent_source.LatentSource(config)
    assert len(source) == 12  # 6 examples, each also mirrored
    # One encoder batch: the 6 plain rows, then the 6 mirrored ones, dealt in turn to the two shards.
    raw = pipeline.make_source(config, "train")
    vae, params = build_vae(config), load_pretrained(config)["vae"]
    anchors = flow.anchors_for(config.data.num_classes, config.anchors.base, config.anchors.spacing)
    order = [(i, m) for m in (0, 1) for i in range(6)]
    by_shard = [order[0::2], order[1::2]]
    rows = by_shard[0] + by_shard[1]
    assert rows[0] == (0, 0) and rows[3] == (0, 1) and rows[10] == (3, 1)
    for r in (0, 3, 10):
        i, m = rows[r]
        example = raw[i]
        image, label = example["image"], example["label"]
        if m:
            image, label = image[:, ::-1], label[:, ::-1]
        mean, logvar = vae.apply({"params": params}, flow.image_to_flow(image[None]), method=SDVAE.encode)
        got = source[r]
        np.testing.assert_allclose(got["mean"], mean[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["logvar"], logvar[0], rtol=1e-5, atol=1e-5)
        painted = flow.labels_to_mask(jnp.asarray(label[None]), jnp.asarray(anchors))
        clean = vae.apply({"params": params}, painted, method=SDVAE.encode)[0][0] * vae.scaling_factor
        masks = got["masks"]
        assert masks.shape == (2, 8, 8, 4)
        # Two independent perturbations (|eps| <= beta = 32 of 255): close to the clean mode, not equal to it
        # nor to each other.
        for j in range(2):
            gap = np.abs(masks[j] - clean).max() / np.abs(clean).max()
            assert 0 < gap < 0.5
        assert np.abs(masks[0] - masks[1]).max() > 1e-4
    # Mirroring changed the latents.
    assert np.abs(source[0]["mean"] - source[3]["mean"]).max() > 1e-4


def test_a_step_on_cached_latents_equals_the_step_that_encodes(sd_folder, tmp_path):
    from semflow_jax.models import build_model
    from semflow_jax.state import init_state, make_optimizer
    from semflow_jax.train import make_train_step

    config = latent_config(sd_folder)
    config.flow.beta = 0.0  # the cached mask is then exactly the on-the-fly one
    latents.encode_dataset(config, str(tmp_path / "lat"), mask_samples=1, num_shards=1, quiet=True)
    cached = latent_config(sd_folder)
    cached.flow.beta, cached.data.latents = 0.0, str(tmp_path / "lat")
    # Same shuffle seed over same-length sources: the first batch holds the same examples.
    raw_batch = next(pipeline.train_iterator(config))
    lat_batch = next(pipeline.train_iterator(cached))
    assert set(lat_batch) == {"latent_mean", "latent_logvar", "mask_latent"}
    model, tx = build_model(config), make_optimizer(config.train)
    state = jax.jit(lambda r, pre: init_state(config, model, tx, r, pre))(
        jax.random.PRNGKey(0), load_pretrained(config)
    )
    step = jax.jit(make_train_step(config, model, tx))
    s_raw, m_raw = step(state, raw_batch)
    s_lat, m_lat = step(state, lat_batch)
    np.testing.assert_allclose(m_lat["loss"], m_raw["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_lat["grad_norm"], m_raw["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s_lat["params"]), jax.tree.leaves(s_raw["params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_latents_made_for_another_config_are_refused(sd_folder, tmp_path):
    config = latent_config(sd_folder, num_train=2)
    latents.encode_dataset(config, str(tmp_path / "lat"), mask_samples=1, num_shards=1, quiet=True)
    other = latent_config(sd_folder, num_train=2)
    other.data.latents, other.flow.beta = str(tmp_path / "lat"), 16.0
    with pytest.raises(SemFlowError, match=r"made with beta=32\.0, but the config gives 16\.0"):
        latent_source.LatentSource(other)
    other.flow.beta, other.data.latents = 32.0, str(tmp_path / "nothing")
    with pytest.raises(SemFlowError, match=r"latents\.json is missing"):
        latent_source.LatentSource(other)
    pixel = shapes_config.get_config("tiny")
    pixel.data.latents = str(tmp_path / "lat")
    with pytest.raises(SemFlowError, match="needs flow.space=latent"):
        from semflow_jax import config_lib

        config_lib.validate(pixel)


def test_cli_encodes_then_training_reads_only_latents(sd_folder, tmp_path):
    from semflow_jax.train import train_and_checkpoint

    flags = [f"--config={ROOT}/configs/shapes.py:tiny", "--config.model.kind=sd", "--config.flow.space=latent",
             f"--config.model.pretrained={sd_folder}", "--config.data.num_train=16"]  # fmt: skip
    out = tmp_path / "lat"
    r = subprocess.run([sys.executable, "-m", "semflow_jax.data.latents", *flags, f"--out={out}", "--flip",
                        "--dtype=float16", "--mask_samples=2"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote 32 latent records" in r.stdout
    # A bad option: one line, exit 2, nothing written.
    r = subprocess.run([sys.executable, "-m", "semflow_jax.data.latents", *flags, f"--out={tmp_path / 'bad'}",
                        "--dtype=int8"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--dtype" in r.stderr
    assert not os.path.exists(tmp_path / "bad") or not os.listdir(tmp_path / "bad")

    config = latent_config(sd_folder, num_train=16)
    config.data.latents = str(out)
    config.model.remat = True
    metrics = train_and_checkpoint(config, str(tmp_path / "run"), quiet=True)  # its previews read images
    assert np.isfinite(metrics["loss"])
