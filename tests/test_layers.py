"""The fast formulations in semflow_jax/models/layers.py compute what the textbook layers compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semflow_jax.aot import jaxprs
from semflow_jax.models import layers, unet

_NHWC = ("NHWC", "HWIO", "NHWC")


def _textbook_upsample_conv(x, kernel, bias):
    h = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    y = jax.lax.conv_general_dilated(h, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (1, 5, 3, 8)])
def test_upsample_conv_is_nearest_upsampling_then_a_3x3_convolution(shape):
    """Values and both gradients, odd sizes and a non-square map included, to float rounding."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 6)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(6), jnp.float32)
    got, want = layers.upsample_conv(x, kernel, bias), _textbook_upsample_conv(x, kernel, bias)
    assert got.shape == (shape[0], 2 * shape[1], 2 * shape[2], 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ct = jnp.asarray(rng.standard_normal(got.shape), jnp.float32)
    g_got = jax.grad(lambda x, k: jnp.sum(layers.upsample_conv(x, k, bias) * ct), argnums=(0, 1))(x, kernel)
    g_want = jax.grad(lambda x, k: jnp.sum(_textbook_upsample_conv(x, k, bias) * ct), argnums=(0, 1))(
        x, kernel
    )
    for a, b in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_upsample_conv_module_has_nn_conv_parameters_and_init():
    """Same parameter tree and the same initial values as nn.Conv(features, (3, 3)) under the same key."""
    x = jnp.ones((1, 4, 4, 5))
    ours = layers.UpsampleConv(7).init(jax.random.PRNGKey(3), x)
    theirs = nn.Conv(7, (3, 3)).init(jax.random.PRNGKey(3), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
    np.testing.assert_array_equal(ours["params"]["kernel"], theirs["params"]["kernel"])
    y = layers.UpsampleConv(7, dtype=jnp.bfloat16).apply(ours, x)
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 8, 8, 7)


def test_upsample_conv_rejects_other_kernel_sizes():
    with pytest.raises(ValueError, match="3x3"):
        layers.upsample_conv(jnp.ones((1, 2, 2, 1)), jnp.ones((5, 5, 1, 1)))


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("shape", [(2, 6, 5, 12), (3, 7, 8)])
def test_group_norm_matches_flax(fast, shape):
    """Per-channel-first statistics give flax's GroupNorm, fast and two-pass variance, any rank."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 2, jnp.float32)
    ref = nn.GroupNorm(4, use_fast_variance=fast)
    params = ref.init(jax.random.PRNGKey(0), x)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    ours = layers.GroupNorm(4, use_fast_variance=fast)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x)) == jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda p: jnp.sum(jnp.sin(ours.apply(p, x))))(params)
    g_ref = jax.grad(lambda p: jnp.sum(jnp.sin(ref.apply(p, x))))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_ref)


@pytest.mark.parametrize("fast", [True, False])
def test_group_norm_with_silu_is_silu_of_group_norm_values_and_gradients(fast):
    """silu=True (the activation's 1 a runtime array, its own derivative rule) is nn.silu(GroupNorm(x))."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 5, 6, 8)) * 3 + 1, jnp.float32)
    plain = layers.GroupNorm(4, use_fast_variance=fast)
    fused = layers.GroupNorm(4, use_fast_variance=fast, silu=True)
    params = plain.init(jax.random.PRNGKey(0), x)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)

    def ref(p, x):
        return nn.silu(plain.apply(p, x))

    np.testing.assert_allclose(fused.apply(params, x), ref(params, x), rtol=1e-5, atol=1e-6)
    for argnums in (0, 1):  # parameters and input
        g_ours = jax.grad(lambda p, x: jnp.sum(jnp.sin(3 * fused.apply(p, x))), argnums)(params, x)
        g_ref = jax.grad(lambda p, x: jnp.sum(jnp.sin(3 * ref(p, x))), argnums)(params, x)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_ref)


def test_group_norm_computes_in_float32_and_returns_the_compute_dtype():
    x = (jnp.arange(2 * 4 * 4 * 8, dtype=jnp.float32).reshape(2, 4, 4, 8) / 7).astype(jnp.bfloat16)
    m = layers.GroupNorm(2, dtype=jnp.bfloat16)
    y = m.apply(m.init(jax.random.PRNGKey(0), x), x)
    assert y.dtype == jnp.bfloat16
    ref = nn.GroupNorm(2, dtype=jnp.float32).apply(
        {"params": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}}, x
    )
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=2e-2)
    with pytest.raises(ValueError, match="8 channels do not split into 3 groups"):
        layers.GroupNorm(3).init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("dense", [False, True])
def test_conv_and_dense_of_parts_are_flax_layers_of_the_concatenation(dense):
    """layers.Conv / Dense of channel parts: nn.Conv's (nn.Dense's) parameters and initial values, and the
    output and gradients of the flax layer on the concatenation."""
    a = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5, 3))
    b = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 5, 4))
    ref = nn.Dense(8) if dense else nn.Conv(8, (3, 3))
    ours = layers.Dense(8) if dense else layers.Conv(8, (3, 3))
    params = ref.init(jax.random.PRNGKey(2), jnp.concatenate([a, b], -1))
    mine = ours.init(jax.random.PRNGKey(2), (a, b))
    assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, params)
    for x, y in zip(jax.tree.leaves(mine), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(x, y)  # the same initializers under the same names
    params = jax.tree.map(lambda x: x + 0.1, params)  # a nonzero bias

    def whole(p, a, b):
        return ref.apply(p, jnp.concatenate([a, b], -1))

    def parts(p, a, b):
        return ours.apply(p, (a, b))

    np.testing.assert_allclose(parts(params, a, b), whole(params, a, b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        ours.apply(params, (jnp.concatenate([a, b], -1),)), whole(params, a, b), rtol=1e-6
    )
    grads = [
        jax.grad(lambda p, a, b, f=f: jnp.sum(f(p, a, b) ** 2), argnums=(0, 1, 2))(params, a, b)
        for f in (whole, parts)
    ]
    for g, g_ref in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0]), strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


_FLAX_TWINS = {
    "conv 3x3": (lambda: nn.Conv(6, (3, 3)), lambda: layers.Conv(6, (3, 3)), (2, 7, 6, 5)),
    "conv stride 2": (
        lambda: nn.Conv(6, (3, 3), (2, 2)),
        lambda: layers.Conv(6, (3, 3), (2, 2)),
        (2, 7, 6, 5),
    ),
    "conv padding 1": (
        lambda: nn.Conv(6, (3, 3), (2, 2), padding=1),
        lambda: layers.Conv(6, (3, 3), (2, 2), padding=1),
        (2, 8, 6, 5),
    ),
    "conv padding pairs": (
        lambda: nn.Conv(6, (3, 3), padding=((0, 1), (1, 2))),
        lambda: layers.Conv(6, (3, 3), padding=((0, 1), (1, 2))),
        (2, 8, 6, 5),
    ),
    "conv 1x1 no bias": (
        lambda: nn.Conv(6, (1, 1), use_bias=False),
        lambda: layers.Conv(6, (1, 1), use_bias=False),
        (2, 4, 4, 5),
    ),
    "dense": (lambda: nn.Dense(6), lambda: layers.Dense(6), (3, 4, 5)),
    "dense to heads": (
        lambda: nn.DenseGeneral((2, 3)),
        lambda: layers.Dense((2, 3)),
        (3, 4, 5),
    ),
    "dense from heads": (
        lambda: nn.DenseGeneral(6, axis=(-2, -1)),
        lambda: layers.Dense(6, axes=2),
        (3, 4, 2, 5),
    ),
}


@pytest.mark.parametrize("case", sorted(_FLAX_TWINS))
def test_conv_and_dense_are_the_flax_layers(case):
    """Parameters, initial values (kernel_init on the flattened kernel, as DenseGeneral), output, gradients."""
    make_ref, make_ours, shape = _FLAX_TWINS[case]
    ref, ours = make_ref(), make_ours()
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    params = ref.init(jax.random.PRNGKey(1), x)
    mine = ours.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, params)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    np.testing.assert_array_equal(ours.apply(params, x), ref.apply(params, x))  # float32: the same ops
    g = [jax.grad(lambda p, m=m: jnp.sum(jnp.sin(m.apply(p, x))))(params) for m in (ours, ref)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), *g)


def test_conv_in_bfloat16_sums_its_bias_gradient_in_float32():
    """bfloat16 compute: the bias is added in float32 and rounded once, so its gradient (a sum over every
    example and position, here 2 * 64 * 64 = 8192 terms) is the float32 sum of the cotangent, rounded once.
    Added and summed in bfloat16, as flax's nn.Conv does, the sum drifts by percents; the kernel gradient
    and the output stay what the bfloat16 product gives."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 8))
    ct = (1.0 + jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 4))).astype(jnp.bfloat16)
    ours = layers.Conv(4, (3, 3), dtype=jnp.bfloat16)
    params = ours.init(jax.random.PRNGKey(2), x)
    params = jax.tree.map(lambda p: p + 0.3, params)

    def loss(p, m):
        y = m.apply(p, x)
        assert y.dtype == jnp.bfloat16
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))

    g = jax.grad(loss)(params, ours)["params"]
    exact = jnp.sum(ct.astype(jnp.float32), axis=(0, 1, 2))  # d(loss)/d(bias), summed in float32
    np.testing.assert_allclose(g["bias"], exact, rtol=2**-8)
    g_flax = jax.grad(loss)(params, nn.Conv(4, (3, 3), dtype=jnp.bfloat16))["params"]
    np.testing.assert_array_equal(g["kernel"], g_flax["kernel"])  # the same bfloat16 products
    y = ours.apply(params, x).astype(jnp.float32)
    want = nn.Conv(4, (3, 3)).apply(params, x)
    np.testing.assert_allclose(y, want, rtol=2**-6, atol=0.05 * float(jnp.max(jnp.abs(want))))


def test_conv_of_parts_in_bfloat16_accumulates_them_in_float32():
    """bfloat16 compute: the parts' products are summed in float32 and rounded once, to bfloat16.

    The two parts nearly cancel (the same input, kernels k and -k + d/64), so a sum of two bfloat16-rounded
    part results would be off by about 64 of the result's half-ulps; one rounding stays within one.
    """
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 32)).astype(jnp.bfloat16)
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 32, 16)).astype(jnp.bfloat16)
    d = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 32, 16)).astype(jnp.bfloat16)
    kernel = jnp.concatenate([k, (-k.astype(jnp.float32) + d / 64).astype(jnp.bfloat16)], axis=2)
    params = {"params": {"kernel": kernel.astype(jnp.float32), "bias": jnp.zeros(16)}}
    y = layers.Conv(16, dtype=jnp.bfloat16).apply(params, (x, x))
    assert y.dtype == jnp.bfloat16
    exact = layers.Conv(16).apply(params, (x.astype(jnp.float32),) * 2)  # float32 throughout
    np.testing.assert_allclose(np.asarray(y, np.float32), exact, rtol=2**-7, atol=1e-3)


def _ops(fn, *args) -> list[str]:
    """The primitives fn's CPU program runs (of a platform-dependent choice, the CPU branch)."""
    return [eqn.primitive.name for eqn, _ in jaxprs.equations(jax.make_jaxpr(fn)(*args), "cpu")]


def test_add_bias_is_the_plain_sum_in_float32_and_rounds_once_in_bfloat16():
    y = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 7))
    b = jax.random.normal(jax.random.PRNGKey(1), (7,))
    np.testing.assert_array_equal(layers.add_bias(y, b), y + b)
    got = layers.add_bias(y.astype(jnp.bfloat16), b)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, (y.astype(jnp.bfloat16).astype(jnp.float32) + b).astype(jnp.bfloat16))


@pytest.mark.parametrize("widths, channels", [((16, 8), 8), ((8, 8), 16)])
def test_res_block_on_parts_is_the_block_on_their_concatenation(widths, channels):
    """The decoder passes [h, skip] as parts: the same parameters and output as concatenating first, with the
    1x1 skip projection (width change) or the identity residual (widths adding up to the block's)."""
    xs = tuple(jax.random.normal(jax.random.PRNGKey(i), (2, 4, 4, c)) for i, c in enumerate(widths))
    temb = jax.random.normal(jax.random.PRNGKey(9), (2, 12))
    block = unet.ResBlock(channels, 4)
    params = block.init(jax.random.PRNGKey(3), jnp.concatenate(xs, -1), temb)
    assert jax.tree.map(jnp.shape, block.init(jax.random.PRNGKey(3), xs, temb)) == jax.tree.map(
        jnp.shape, params
    )
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(4), x.shape), params)
    np.testing.assert_allclose(
        block.apply(params, xs, temb),
        block.apply(params, jnp.concatenate(xs, -1), temb),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("fast", [False, True])
def test_unet_attention_is_flax_multi_head_attention(fast):
    """unet.SelfAttention has nn.MultiHeadDotProductAttention's parameters and initial values and gives its
    output and gradients, with flax's attention_fn and with jax.nn.dot_product_attention (sampling's)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8))
    ref = nn.MultiHeadDotProductAttention(num_heads=2)
    fn = unet.dot_product_attention if fast else nn.dot_product_attention
    ours = unet.SelfAttention(2, attention_fn=fn)
    params = ref.init(jax.random.PRNGKey(1), x)
    mine = ours.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, params)
    jax.tree.map(np.testing.assert_array_equal, mine, params)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
    g = [jax.grad(lambda p, m=m: jnp.sum(jnp.sin(m.apply(p, x))))(params) for m in (ours, ref)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *g)


def _conv3x3(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC, precision="highest"
    )
