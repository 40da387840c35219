"""Diffusers weights to flax: `python -m semflow_jax.convert --diffusers=DIR --out=DIR [--empty_prompt=FILE.npy]`.

Reads DIR/unet and DIR/vae (config.json + *.safetensors, no PyTorch) and writes OUT/{unet,vae}/config.json and
params.msgpack plus OUT/empty_prompt.npy (the CLIP embedding of "" that the UNet is conditioned on, as in
the paper). A tensor maps to the flax parameter with the same name once "." and "/" are both read as "_"
(our modules are named after the diffusers keys); weight -> kernel (transposed) or scale. Every source
tensor must be used exactly once and every flax parameter filled, else it stops and lists the mismatches.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np

from semflow_jax.errors import SemFlowError

# Old diffusers VAE checkpoints (SD 1.5's among them) name the mid-block attention differently.
_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def torch_name(key: str) -> tuple[str, str]:
    """(canonical module path, "weight" | "bias") of a diffusers state-dict key."""
    module, _, leaf = key.rpartition(".")
    parts = module.split(".")
    if parts and parts[-1] in _LEGACY:
        parts = parts[:-1] + _LEGACY[parts[-1]].split(".")
    return "_".join(parts), leaf


def flax_name(path: tuple[str, ...]) -> tuple[str, str]:
    """(canonical module path, "weight" | "bias") of a flax parameter path."""
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    return "_".join(path[:-1]), leaf


def to_flax(value: np.ndarray, target_shape) -> np.ndarray:
    """A torch tensor in flax layout: conv OIHW -> HWIO, linear [out, in] -> [in, out], 1x1 conv -> linear.

    A view, not a copy: the one copy is made when the params are serialized (tensor by tensor), so converting
    SD 1.5 holds its 3.4 GB of UNet weights once, not twice, before writing them."""
    if value.ndim == 4 and len(target_shape) == 2:  # a 1x1 conv stored for a linear layer (legacy VAE)
        value = value[:, :, 0, 0]
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return value.T
    return value


def convert_state_dict(state: dict, template) -> dict:
    """Flax params shaped like `template` (a params pytree of arrays or ShapeDtypeStructs) from `state`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    wanted = {}
    for path, leaf in flat:
        wanted[flax_name(tuple(p.key for p in path))] = leaf
    given = {}
    for key in state:
        given.setdefault(torch_name(key), []).append(key)
    missing = sorted(f"{m}.{leaf}" for m, leaf in set(wanted) - set(given))
    unused = sorted(k for name, keys in given.items() if name not in wanted for k in keys)
    doubled = sorted(k for keys in given.values() if len(keys) > 1 for k in keys)
    problems = []
    if missing:
        problems.append(f"{len(missing)} flax parameters have no source tensor: {', '.join(missing[:8])}")
    if unused:
        problems.append(f"{len(unused)} source tensors are not used: {', '.join(unused[:8])}")
    if doubled:
        problems.append(f"source tensors map to one parameter twice: {', '.join(doubled[:8])}")
    out = []
    for path, leaf in flat:
        name = flax_name(tuple(p.key for p in path))
        if name not in given:
            out.append(None)
            continue
        key = given[name][0]
        value = to_flax(np.asarray(state[key], np.float32), leaf.shape)
        if value.shape != tuple(leaf.shape):
            problems.append(f"{key}: shape {list(value.shape)} in flax layout, expected {list(leaf.shape)}")
        out.append(value)
    if problems:
        raise SemFlowError("weights do not match the model: " + "; ".join(problems))
    return jax.tree_util.tree_unflatten(treedef, out)


def load_safetensors(folder: str) -> dict:
    """Every tensor of folder/*.safetensors as float32 numpy (fp16 and bf16 files too)."""
    from safetensors import safe_open

    files = (
        sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
    )
    if not files:
        raise SemFlowError(f"no .safetensors file in {folder}")
    # Prefer the full-precision file when a folder holds both (diffusion_pytorch_model[.fp16].safetensors).
    full = [f for f in files if not re.search(r"\.(fp16|bf16)\.safetensors$", f)]
    out = {}
    for f in full or files:
        with safe_open(os.path.join(folder, f), framework="flax") as reader:
            for key in reader.keys():
                out[key] = np.asarray(reader.get_tensor(key), np.float32)
    return out


def read_config(folder: str) -> dict:
    """folder/config.json as a dict."""
    path = os.path.join(folder, "config.json")
    try:
        return json.load(open(path))
    except (OSError, ValueError) as e:
        raise SemFlowError(f"cannot read {path}: {e}") from None


def template(model, cfg_kind: str, cfg: dict):
    """The abstract params of `model` (shapes only, nothing allocated)."""
    import jax.numpy as jnp

    if cfg_kind == "unet":
        z = jnp.zeros((1, 8, 8, model.in_channels))
        ctx = jnp.zeros((1, 2, model.cross_attention_dim))
        fn = lambda r: model.init(r, z, jnp.zeros((1,)), ctx)  # noqa: E731
    else:
        x = jnp.zeros((1, 8, 8, model.in_channels))
        fn = lambda r: model.init(r, x)  # noqa: E731
    del cfg
    return jax.eval_shape(fn, jax.random.PRNGKey(0))["params"]


def empty_prompt_embedding(diffusers_dir: str, npy: str = "") -> np.ndarray:
    """[77, D] CLIP embedding of the empty prompt: from a .npy file, or computed with transformers + torch."""
    if npy:
        try:
            return np.load(npy).astype(np.float32).reshape(77, -1)
        except (OSError, ValueError) as e:
            raise SemFlowError(f"cannot read the empty-prompt embedding {npy}: {e}") from None
    try:
        import torch
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise SemFlowError(
            "computing the empty-prompt embedding needs torch and transformers; pass --empty_prompt=FILE.npy"
        ) from None
    tok = CLIPTokenizer.from_pretrained(os.path.join(diffusers_dir, "tokenizer"))
    enc = CLIPTextModel.from_pretrained(os.path.join(diffusers_dir, "text_encoder"))
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return enc(ids)[0][0].float().numpy()


def convert(diffusers_dir: str, out_dir: str, empty_prompt: str = "") -> None:
    """Writes out_dir/{unet,vae}/{config.json,params.msgpack} and out_dir/empty_prompt.npy."""
    from semflow_jax import weights_io
    from semflow_jax.errors import atomic_open, atomic_write_bytes
    from semflow_jax.models.sd import SDVAE, SDUNet

    embedding = empty_prompt_embedding(diffusers_dir, empty_prompt)
    converted = {}
    for kind, cls in (("unet", SDUNet), ("vae", SDVAE)):  # everything is checked before anything is written
        cfg = read_config(os.path.join(diffusers_dir, kind))
        state = load_safetensors(os.path.join(diffusers_dir, kind))
        converted[kind] = cfg, convert_state_dict(state, template(cls.from_config(cfg), kind, cfg))
    for kind, (cfg, params) in converted.items():
        os.makedirs(os.path.join(out_dir, kind), exist_ok=True)
        atomic_write_bytes(os.path.join(out_dir, kind, "config.json"), json.dumps(cfg, indent=2).encode())
        weights_io.write(os.path.join(out_dir, kind, "params.msgpack"), params)  # tensor by tensor
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        print(f"{kind}: {n / 1e6:.1f}M parameters -> {out_dir}/{kind}")
    with atomic_open(os.path.join(out_dir, "empty_prompt.npy")) as f:
        np.save(f, embedding)


def main(argv):
    """CLI entry."""
    del argv
    from absl import flags

    f = flags.FLAGS
    convert(f.diffusers, f.out, f.empty_prompt)


if __name__ == "__main__":
    from absl import flags

    from semflow_jax.errors import run_cli

    flags.DEFINE_string("diffusers", None, "A diffusers model folder with unet/ and vae/.")
    flags.DEFINE_string("out", None, "Output folder.")
    flags.DEFINE_string(
        "empty_prompt", "", "A .npy [77, D] empty-prompt embedding (else computed with torch)."
    )
    flags.mark_flags_as_required(["diffusers", "out"])
    run_cli(main, "semflow_jax.convert")
