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


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_of_parts_is_group_norm_of_their_concatenation(fast, silu):
    """Channel parts (a group straddling their boundary) normalize as their concatenation; gradients too."""
    a = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 6)) * 2 + 1
    b = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 3, 10)) - 0.5
    scale = jax.random.normal(jax.random.PRNGKey(2), (16,))
    bias = jax.random.normal(jax.random.PRNGKey(3), (16,))

    def whole(a, b, scale, bias):
        return layers.group_norm(jnp.concatenate([a, b], -1), scale, bias, 4, 1e-6, fast, silu=silu)

    def parts(a, b, scale, bias):
        return jnp.concatenate(layers.group_norm((a, b), scale, bias, 4, 1e-6, fast, silu=silu), -1)

    got = layers.group_norm((a, b), scale, bias, 4, 1e-6, fast, silu=silu)
    assert isinstance(got, tuple) and [p.shape[-1] for p in got] == [6, 10]
    np.testing.assert_allclose(parts(a, b, scale, bias), whole(a, b, scale, bias), rtol=1e-5, atol=1e-5)
    w = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 3, 16))
    grads = [
        jax.grad(lambda *x, f=f: jnp.sum(f(*x) * w), argnums=(0, 1, 2, 3))(a, b, scale, bias)
        for f in (whole, parts)
    ]
    for g, g_ref in zip(*grads, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize(
    "shape, kernel, padding",
    [
        ((2, 6, 5, 16), (3, 3), ((1, 1), (1, 1))),
        ((1, 1, 1, 8), (3, 3), ((1, 1), (1, 1))),
        ((2, 2, 3, 4), (3, 3), ((1, 1), (1, 1))),
        ((2, 4, 3, 8), (2, 2), ((1, 0), (0, 1))),  # an upsampling parity's 2x2 convolution
        ((2, 5, 4, 8), (2, 3), ((0, 1), (2, 0))),
    ],
)
@pytest.mark.parametrize("dots_forward", [True, False])
def test_amx_conv_is_the_convolution_and_its_gradients(shape, kernel, padding, dots_forward):
    """Forward equal to XLA's float32-result convolution of the same bfloat16 operands; both gradients equal
    to the convolution's, computed in float32 and rounded to bfloat16 (within a bfloat16 ulp or two), and
    returned in the operands' dtype. Odd widths, a 1x1 image, fewer columns than the kernel, uneven padding."""
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, shape).astype(jnp.bfloat16)
    k = (0.2 * jax.random.normal(kk, (*kernel, shape[-1], 8))).astype(jnp.bfloat16)

    def reference(x, k):
        return jax.lax.conv_general_dilated(
            x.astype(jnp.float32), k.astype(jnp.float32), (1, 1), padding, dimension_numbers=_NHWC
        )

    y, vjp = jax.vjp(lambda x, k: layers.amx_conv(x, k, padding, dots_forward), x, k)
    want, ref_vjp = jax.vjp(reference, x, k)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(kg, y.shape)
    for ours, ref in zip(vjp(g), ref_vjp(g), strict=True):
        assert ours.dtype == jnp.bfloat16
        ref = np.asarray(ref, np.float32)
        np.testing.assert_allclose(
            np.asarray(ours, np.float32), ref, rtol=2**-7, atol=1e-2 * np.abs(ref).max()
        )


def _ops(fn, *args) -> list[str]:
    """The primitives fn's CPU program runs (of a platform-dependent choice, the CPU branch)."""
    return [eqn.primitive.name for eqn, _ in jaxprs.equations(jax.make_jaxpr(fn)(*args), "cpu")]


def test_bfloat16_layers_run_as_amx_conv_where_dots_reach_amx(monkeypatch):
    """In bfloat16 where dots_reach_amx(): a Conv of wide parts is products both ways (no convolution left in
    its program), a narrower one keeps the convolution forward only, a 3-channel output keeps it both ways,
    and upsample_conv's wide parities are products too; each gives what the convolution gives, gradients too."""
    c = layers.DOTS_FORWARD_MIN_CHANNELS
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (1, 4, 4, 2 * c)).astype(jnp.bfloat16)
    parts = (x[..., :c], x[..., c:])
    conv = "conv_general_dilated"
    cases = {  # name: (module, input, convolutions expected forward / in the gradient when on)
        "wide": (layers.Conv(c, dtype=jnp.bfloat16), parts, (False, False)),
        "narrow": (layers.Conv(layers.AMX_CONV_MIN_FEATURES, dtype=jnp.bfloat16), parts, (True, False)),
        "output": (layers.Conv(3, dtype=jnp.bfloat16), parts, (True, True)),
        "upsample": (layers.UpsampleConv(c, dtype=jnp.bfloat16), x[..., :c], (False, False)),
    }
    for name, (module, inputs, (conv_forward, conv_grad)) in cases.items():
        params = module.init(key, inputs)

        def loss(p, module=module, inputs=inputs):
            return jnp.sum(jnp.sin(module.apply(p, inputs).astype(jnp.float32)))

        results = {}
        for on in (False, True):
            monkeypatch.setattr(layers, "dots_reach_amx", lambda on=on: on)
            forward = _ops(module.apply, params, inputs).count(conv)
            in_backward = _ops(jax.grad(loss), params).count(conv) - forward
            assert (forward > 0) == (conv_forward or not on), name
            assert (in_backward > 0) == (conv_grad or not on), name
            results[on] = (module.apply(params, inputs), jax.grad(loss)(params))
        for ours, ref in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False]), strict=True):
            ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
            np.testing.assert_allclose(ours, ref, rtol=2**-6, atol=2**-6 * np.abs(ref).max(), err_msg=name)


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


@pytest.mark.parametrize(
    "shape, features, split",
    [((2, 8, 16, 128), 128, None), ((1, 5, 12, 130), 140, 50), ((2, 3, 4, 7), 5, None), ((1, 6, 8, 9), 4, 3)],
)
def test_winograd_conv3x3_is_the_convolution_and_has_its_gradients(shape, features, split):
    """Winograd F(4, 3) along the width (of one array or of channel parts) is the SAME 3x3 convolution to a
    few 1e-6 of its scale; winograd_conv3x3's gradients are XLA's convolution gradients, and the transposed
    Winograd steps (winograd_forward under jax.grad) give them too."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(
        rng.standard_normal((3, 3, shape[-1], features)) / np.sqrt(9 * shape[-1]), jnp.float32
    )
    want = _conv3x3(x, kernel)
    scale = float(jnp.max(jnp.abs(want)))
    arg = x if split is None else (x[..., :split], x[..., split:])
    for f in (layers.winograd_conv3x3, layers.winograd_forward):
        got = f(arg, kernel)
        assert got.shape == want.shape and got.dtype == jnp.float32
        assert float(jnp.max(jnp.abs(got - want))) < 1e-5 * scale
    ct = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    g_want = jax.grad(lambda x, k: jnp.sum(_conv3x3(x, k) * ct), argnums=(0, 1))(x, kernel)
    for f in (layers.winograd_conv3x3, layers.winograd_forward):
        if split is None:
            g = jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) * ct), argnums=(0, 1))(x, kernel)
        else:
            g = jax.grad(lambda x, k, f=f: jnp.sum(f((x[..., :split], x[..., split:]), k) * ct), (0, 1))(
                x, kernel
            )
        for a, b in zip(g, g_want, strict=True):
            assert float(jnp.max(jnp.abs(a - b))) < 1e-5 * float(jnp.max(jnp.abs(b)))


def test_winograd_conv3x3_refuses_other_kernels_and_widths():
    with pytest.raises(ValueError, match="3x3 kernel and a width divisible by 4"):
        layers.winograd_conv3x3(jnp.zeros((1, 4, 6, 2)), jnp.zeros((3, 3, 2, 2)))
    with pytest.raises(ValueError, match="3x3 kernel"):
        layers.winograd_conv3x3(jnp.zeros((1, 4, 8, 2)), jnp.zeros((1, 3, 2, 2)))


def test_use_winograd_covers_wide_float32_same_3x3_convolutions_on_the_cpu(monkeypatch):
    """The rule Conv follows: float32, 3x3, stride 1, SAME, >= 128 channels in and out, width a multiple of
    4, on the CPU backend, unless SEMFLOW_WINOGRAD=0."""
    monkeypatch.delenv("SEMFLOW_WINOGRAD", raising=False)
    args = dict(
        dtype=jnp.float32, in_channels=128, features=128, width=32, kernel_size=(3, 3), strides=(1, 1)
    )
    assert jax.default_backend() == "cpu"
    assert layers.use_winograd(**args, padding="SAME")
    assert layers.use_winograd(**args, padding=1)
    for change in (
        {"dtype": jnp.bfloat16},
        {"in_channels": 64},
        {"features": 127},
        {"width": 30},
        {"kernel_size": (1, 1)},
        {"strides": (2, 2)},
    ):
        assert not layers.use_winograd(**{**args, **change}, padding="SAME"), change
    assert not layers.use_winograd(**args, padding="VALID")
    # A list of pairs is not a form it recognizes: the plain convolution.
    assert not layers.use_winograd(**args, padding=[(1, 1), (1, 1)])
    monkeypatch.setenv("SEMFLOW_WINOGRAD", "0")
    assert not layers.use_winograd(**args, padding="SAME")


def test_conv_winograd_field_forces_either_form_and_refuses_what_it_cannot_compute():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 8, 3))
    for winograd, windows in ((True, [(3, 1)] * 6), (False, [(3, 3)])):
        m = layers.Conv(4, (3, 3), winograd=winograd)
        params = m.init(jax.random.PRNGKey(1), x)
        assert _conv_windows(lambda p, m=m: m.apply(p, x), params) == windows
    ref = nn.Conv(4, (3, 3)).apply(params, x)
    got = layers.Conv(4, (3, 3), winograd=True).apply(params, x)
    assert float(jnp.max(jnp.abs(got - ref))) < 1e-5 * float(jnp.max(jnp.abs(ref)))
    with pytest.raises(ValueError, match="winograd=True.*width 6"):
        layers.Conv(4, (3, 3), winograd=True).init(jax.random.PRNGKey(1), jnp.zeros((1, 4, 6, 3)))
    with pytest.raises(ValueError, match=r"winograd=True.*strides \(2, 2\)"):
        layers.Conv(4, (3, 3), (2, 2), winograd=True).init(jax.random.PRNGKey(1), x)


def _conv_windows(fn, *args, platform="cpu"):
    """The kernel window (height, width) of every convolution in fn's program for `platform`."""
    return [
        tuple(e.invars[1].aval.shape[:2])
        for e, _ in jaxprs.equations(jax.make_jaxpr(fn)(*args), platform)
        if e.primitive.name == "conv_general_dilated"
    ]


@pytest.mark.parametrize("switched_off", [False, True])
def test_wide_conv_runs_as_winograd_unless_switched_off(monkeypatch, switched_off):
    """layers.Conv of 128 channels (one array or parts) traces six 3x1 convolutions per part, with nn.Conv's
    parameters, values to float rounding and gradients; SEMFLOW_WINOGRAD=0 keeps the 3x3 convolution."""
    monkeypatch.setenv("SEMFLOW_WINOGRAD", "0" if switched_off else "1")
    a = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8, 64))
    b = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 8, 64))
    ref, ours = nn.Conv(128, (3, 3)), layers.Conv(128, (3, 3))
    params = ref.init(jax.random.PRNGKey(2), jnp.concatenate([a, b], -1))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(2), (a, b))) == jax.tree.map(
        jnp.shape, params
    )
    windows = _conv_windows(lambda p: ours.apply(p, (a, b)), params)
    assert windows == ([(3, 3)] * 2 if switched_off else [(3, 1)] * 12)

    def whole(p):
        return ref.apply(p, jnp.concatenate([a, b], -1))

    def parts(p):
        return ours.apply(p, (a, b))

    want = whole(params)
    np.testing.assert_allclose(parts(params), want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    g = [jax.grad(lambda p, f=f: jnp.sum(jnp.sin(f(p))))(params) for f in (parts, whole)]
    for x, y in zip(
        jax.tree.leaves(g[0]), jax.tree.leaves(g[1]), strict=True
    ):  # to 1e-5 of each leaf's scale
        assert float(jnp.max(jnp.abs(x - y))) < 1e-5 * float(jnp.max(jnp.abs(y)))
