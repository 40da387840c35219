"""The Stable Diffusion port: parity with diffusers on tiny random models (fixtures made by
tests/fixtures/make_sd_fixtures.py), and the converter's complete key coverage of the real SD 1.5 models."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semflow_jax import convert
from semflow_jax.errors import SemFlowError
from semflow_jax.models.sd import SDVAE, SDUNet
from tests.fixtures.sd_weights import fixture_weights

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SPEC = json.load(open(os.path.join(FIXTURES, "sd_tiny.json")))
DATA = np.load(os.path.join(FIXTURES, "sd_tiny.npz"))


def relative_error(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def converted(tag, model, kind):
    spec = SPEC[tag]
    state = fixture_weights(spec["keys"], spec["seed"])
    return convert.convert_state_dict(state, convert.template(model, kind, spec["config"]))


@pytest.mark.parametrize("tag", ["unet_sd1", "unet_sd2"])
def test_unet_matches_diffusers(tag):
    unet = SDUNet.from_config(SPEC[tag]["config"])
    params = converted(tag, unet, "unet")
    out = unet.apply({"params": params}, DATA[f"{tag}/z"], DATA[f"{tag}/t"], DATA[f"{tag}/context"])
    assert relative_error(out, DATA[f"{tag}/out"]) < 1e-4


def test_vae_matches_diffusers():
    vae = SDVAE.from_config(SPEC["vae"]["config"])
    params = converted("vae", vae, "vae")
    mean, logvar = vae.apply({"params": params}, DATA["vae/x"], method=SDVAE.encode)
    assert relative_error(mean, DATA["vae/mean"]) < 1e-4
    assert relative_error(logvar, DATA["vae/logvar"]) < 1e-4
    decoded = vae.apply({"params": params}, DATA["vae/mean"], method=SDVAE.decode)
    assert relative_error(decoded, DATA["vae/decoded"]) < 1e-4


def test_remat_and_bfloat16_keep_the_function():
    unet = SDUNet.from_config(SPEC["unet_sd1"]["config"])
    params = converted("unet_sd1", unet, "unet")
    args = (DATA["unet_sd1/z"], DATA["unet_sd1/t"], DATA["unet_sd1/context"])
    want = DATA["unet_sd1/out"]
    remat = SDUNet.from_config(SPEC["unet_sd1"]["config"], remat=True)

    # Jitted: op by op, the SD UNet's gradients and forward passes took longer than compiling them.
    @functools.partial(jax.jit, static_argnums=1)
    def grad(p, model):
        return jax.grad(lambda p: jnp.mean(model.apply({"params": p}, *args) ** 2))(p)

    @functools.partial(jax.jit, static_argnums=1)
    def forward(p, model):
        return model.apply({"params": p}, *args)

    g1, g2 = grad(params, unet), grad(params, remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    bf16 = SDUNet.from_config(SPEC["unet_sd1"]["config"], dtype=jnp.bfloat16)
    assert relative_error(forward(params, bf16), want) < 5e-2
    # Attention in query chunks (with remat) is the same function: against diffusers, and in its gradients.
    chunked = SDUNet.from_config(SPEC["unet_sd1"]["config"], remat=True, attention_chunk=16)
    assert relative_error(forward(params, chunked), want) < 1e-4
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(grad(params, chunked)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_attend_in_query_chunks_is_exact():
    from semflow_jax.models.sd_blocks import attend

    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 64, 2, 8))
    k = k[:, :48]  # cross-attention: another length of keys than queries
    v = v[:, :48]

    def f(q, k, v, chunk):
        return jnp.sum(jnp.sin(attend(q, k, v, chunk)))

    whole = attend(q, k, v)
    for chunk in (16, 32):
        np.testing.assert_allclose(attend(q, k, v, chunk), whole, rtol=1e-6, atol=1e-6)
        for a, b in zip(
            jax.grad(f, (0, 1, 2))(q, k, v, chunk), jax.grad(f, (0, 1, 2))(q, k, v, 0), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(attend(q, k, v, 24), whole, rtol=1e-6)  # 24 does not divide 64: whole


@pytest.mark.parametrize("kind, cls", [("unet", SDUNet), ("vae", SDVAE)])
def test_converter_covers_the_real_sd15_key_set(kind, cls):
    keys = json.load(open(os.path.join(FIXTURES, "sd15_keys.json")))
    model = cls.from_config(keys["configs"][kind])
    template = convert.template(model, kind, keys["configs"][kind])
    # Shapes only: zeros of each source shape stand in for the weights.
    state = {k: np.zeros(shape, np.float32) for k, shape in keys[kind].items()}
    params = convert.convert_state_dict(state, template)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert n == sum(int(np.prod(s)) for s in keys[kind].values())
    assert n == {"unet": 859_520_964, "vae": 83_653_863}[kind]
    if kind == "vae":  # the legacy attention names of the published SD 1.5 VAE file map too
        names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        legacy = {}
        for k, v in state.items():
            for new, old in names.items():
                k = k.replace(f".{new}.", f".{old}.")
            legacy[k] = v
        assert any(".query." in k for k in legacy)
        convert.convert_state_dict(legacy, template)


def test_converter_lists_what_does_not_match():
    keys = json.load(open(os.path.join(FIXTURES, "sd15_keys.json")))
    template = convert.template(SDVAE.from_config(keys["configs"]["vae"]), "vae", None)
    state = {k: np.zeros(s, np.float32) for k, s in keys["vae"].items()}
    state.pop("decoder.conv_out.bias")
    state["decoder.extra.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(SemFlowError, match=r"1 flax parameters have no source tensor: decoder_conv_out\.bias.*"
                                           r"1 source tensors are not used: decoder\.extra\.weight"):  # fmt: skip
        convert.convert_state_dict(state, template)


def write_diffusers_folder(root):
    """A diffusers-format folder of the tiny fixture models (safetensors + config.json)."""
    from safetensors.numpy import save_file

    for kind, tag in (("unet", "unet_sd1"), ("vae", "vae")):
        os.makedirs(root / kind)
        json.dump(SPEC[tag]["config"], open(root / kind / "config.json", "w"))
        save_file(
            fixture_weights(SPEC[tag]["keys"], SPEC[tag]["seed"]),
            str(root / kind / "diffusion_pytorch_model.safetensors"),
        )
    np.save(root / "empty.npy", np.random.default_rng(0).standard_normal((77, 24)).astype(np.float32))


def test_convert_cli(tmp_path):
    import subprocess
    import sys

    from flax import serialization

    write_diffusers_folder(tmp_path / "sd")
    root = os.path.dirname(os.path.dirname(FIXTURES))
    args = [sys.executable, "-m", "semflow_jax.convert", f"--diffusers={tmp_path / 'sd'}", f"--out={tmp_path / 'out'}",
            f"--empty_prompt={tmp_path / 'sd' / 'empty.npy'}"]  # fmt: skip
    r = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    params = serialization.msgpack_restore(open(tmp_path / "out" / "unet" / "params.msgpack", "rb").read())
    unet = SDUNet.from_config(SPEC["unet_sd1"]["config"])
    out = unet.apply({"params": params}, DATA["unet_sd1/z"], DATA["unet_sd1/t"], DATA["unet_sd1/context"])
    assert relative_error(out, DATA["unet_sd1/out"]) < 1e-4
    assert np.load(tmp_path / "out" / "empty_prompt.npy").shape == (77, 24)
    # A checkpoint that misses a tensor: one line naming it, exit 2, and nothing written for that model.
    from safetensors.numpy import load_file, save_file

    path = str(tmp_path / "sd" / "vae" / "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    state.pop("decoder.conv_out.bias")
    save_file(state, path)
    r = subprocess.run(
        [*args[:4], f"--out={tmp_path / 'out2'}", args[5]],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "decoder_conv_out.bias" in r.stderr and not os.path.exists(tmp_path / "out2")


def test_latent_mode_trains_and_evaluates_end_to_end(tmp_path):
    """The paper's setting in miniature: SD UNet + frozen VAE from a converted folder, flow between latents."""
    from configs import shapes as shapes_config
    from semflow_jax import SemFlow
    from semflow_jax.eval import evaluate
    from semflow_jax.train import train_and_checkpoint

    write_diffusers_folder(tmp_path / "sd")
    convert.convert(str(tmp_path / "sd"), str(tmp_path / "flax"), str(tmp_path / "sd" / "empty.npy"))
    config = shapes_config.get_config("tiny")
    config.model.kind, config.model.pretrained, config.flow.space = "sd", str(tmp_path / "flax"), "latent"
    config.model.remat = True
    metrics = train_and_checkpoint(config, str(tmp_path / "run"), quiet=True)
    assert np.isfinite(metrics["loss"])
    m = SemFlow.from_workdir(str(tmp_path / "run"))
    # The VAE stayed frozen: the checkpoint holds exactly the converted weights.
    from flax import serialization

    want = serialization.msgpack_restore(open(tmp_path / "flax" / "vae" / "params.msgpack", "rb").read())
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(jax.device_get(m.vae_params)), strict=True):
        np.testing.assert_array_equal(a, b)
    images = np.zeros((2, 16, 16, 3), np.uint8)
    assert m.segment(images).shape == (2, 16, 16)  # encoded to 8x8 latents, decoded back to pixels
    assert m.synthesize(np.zeros((2, 16, 16), np.int32)).shape == (2, 16, 16, 3)
    result = evaluate(config, str(tmp_path / "run"), quiet=True)
    assert 0 <= result["segmentation"]["miou"] <= 100
