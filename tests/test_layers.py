"""The fast formulations in semflow_jax/models/layers.py compute what the textbook layers compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semflow_jax.models import layers, unet


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


def test_group_norm_silu_is_finite_where_its_exponential_overflows():
    """exp(-y) overflows float32 below y = -88: silu is then -0, its derivative 0, never nan."""
    x = jnp.array([-200.0, -100.0, -89.0, 0.0, 30.0, 200.0]).reshape(1, 6, 1)
    params = {"params": {"scale": jnp.full((1,), 80.0), "bias": jnp.zeros(1)}}  # y reaches -160
    m = layers.GroupNorm(1, silu=True)
    y = m.apply(params, x)
    np.testing.assert_allclose(y, nn.silu(layers.GroupNorm(1).apply(params, x)), rtol=1e-6, atol=1e-30)
    g = jax.grad(lambda x: jnp.sum(m.apply(params, x)))(x)
    assert np.isfinite(np.asarray(g)).all()
    g_ref = jax.grad(lambda x: jnp.sum(nn.silu(layers.GroupNorm(1).apply(params, x))))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)


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


def test_unet_attention_matches_flax_default():
    """The UNet's attention_fn (jax.nn.dot_product_attention) gives flax's default attention."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8))
    ref = nn.MultiHeadDotProductAttention(num_heads=2)
    ours = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=unet.dot_product_attention)
    params = ref.init(jax.random.PRNGKey(1), x)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
