"""Each CPU form of semflow_jax/cpu/kernels.py computes what the plain layer computes (values and gradients),
and the layers take it on the CPU only where model.kernels="auto"."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semflow_jax.aot import jaxprs
from semflow_jax.cpu import amx, kernels, winograd
from semflow_jax.models import layers

_NHWC = ("NHWC", "HWIO", "NHWC")


def _ops(fn, *args) -> list[str]:
    """The primitives fn's CPU program runs (of a platform-dependent choice, the CPU branch)."""
    return [eqn.primitive.name for eqn, _ in jaxprs.equations(jax.make_jaxpr(fn)(*args), "cpu")]


def _conv3x3(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC, precision="highest"
    )


def _plain(fn):
    """fn traced with model.kernels="plain": the plain layers, on the CPU too."""

    def run(*args):
        with kernels.chosen("plain"):
            return fn(*args)

    return run


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


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_by_channels_of_parts_is_the_plain_group_norm_of_their_concatenation(fast, silu):
    """Channel parts (a group straddling their boundary) normalize as their concatenation; gradients too."""
    a = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 6)) * 2 + 1
    b = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 3, 10)) - 0.5
    scale = jax.random.normal(jax.random.PRNGKey(2), (16,))
    bias = jax.random.normal(jax.random.PRNGKey(3), (16,))

    def whole(a, b, scale, bias):  # the plain layer
        return layers.group_norm(jnp.concatenate([a, b], -1), scale, bias, 4, 1e-6, fast, silu=silu)

    def parts(a, b, scale, bias):  # the CPU form
        return jnp.concatenate(
            kernels.group_norm_by_channels((a, b), scale, bias, 4, 1e-6, fast, silu=silu), -1
        )

    got = kernels.group_norm_by_channels((a, b), scale, bias, 4, 1e-6, fast, silu=silu)
    assert isinstance(got, tuple) and [p.shape[-1] for p in got] == [6, 10]
    np.testing.assert_allclose(parts(a, b, scale, bias), whole(a, b, scale, bias), rtol=1e-5, atol=1e-5)
    w = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 3, 16))
    grads = [
        jax.grad(lambda *x, f=f: jnp.sum(f(*x) * w), argnums=(0, 1, 2, 3))(a, b, scale, bias)
        for f in (whole, parts)
    ]
    for g, g_ref in zip(*grads, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


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

    y, vjp = jax.vjp(lambda x, k: amx.amx_conv(x, k, padding, dots_forward), x, k)
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


def test_bfloat16_layers_run_as_amx_conv_where_dots_reach_amx(monkeypatch):
    """In bfloat16 where dots_reach_amx(): a Conv of wide parts is products both ways (no convolution left in
    its program), a narrower one keeps the convolution forward only, a 3-channel output keeps it both ways,
    and upsample_conv's wide parities are products too; each gives what the convolution gives, gradients too."""
    c = amx.DOTS_FORWARD_MIN_CHANNELS
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (1, 4, 4, 2 * c)).astype(jnp.bfloat16)
    parts = (x[..., :c], x[..., c:])
    conv = "conv_general_dilated"
    cases = {  # name: (module, input, convolutions expected forward / in the gradient when on)
        "wide": (layers.Conv(c, dtype=jnp.bfloat16), parts, (False, False)),
        "narrow": (layers.Conv(amx.AMX_CONV_MIN_FEATURES, dtype=jnp.bfloat16), parts, (True, False)),
        "output": (layers.Conv(3, dtype=jnp.bfloat16), parts, (True, True)),
        "upsample": (layers.UpsampleConv(c, dtype=jnp.bfloat16), x[..., :c], (False, False)),
    }
    for name, (module, inputs, (conv_forward, conv_grad)) in cases.items():
        params = module.init(key, inputs)

        def loss(p, module=module, inputs=inputs):
            return jnp.sum(jnp.sin(module.apply(p, inputs).astype(jnp.float32)))

        results = {}
        for on in (False, True):
            monkeypatch.setattr(amx, "dots_reach_amx", lambda on=on: on)
            forward = _ops(module.apply, params, inputs).count(conv)
            in_backward = _ops(jax.grad(loss), params).count(conv) - forward
            assert (forward > 0) == (conv_forward or not on), name
            assert (in_backward > 0) == (conv_grad or not on), name
            results[on] = (module.apply(params, inputs), jax.grad(loss)(params))
        for ours, ref in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False]), strict=True):
            ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
            np.testing.assert_allclose(ours, ref, rtol=2**-6, atol=2**-6 * np.abs(ref).max(), err_msg=name)


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
    for f in (winograd.winograd_conv3x3, winograd.winograd_forward):
        got = f(arg, kernel)
        assert got.shape == want.shape and got.dtype == jnp.float32
        assert float(jnp.max(jnp.abs(got - want))) < 1e-5 * scale
    ct = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    g_want = jax.grad(lambda x, k: jnp.sum(_conv3x3(x, k) * ct), argnums=(0, 1))(x, kernel)
    for f in (winograd.winograd_conv3x3, winograd.winograd_forward):
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
        winograd.winograd_conv3x3(jnp.zeros((1, 4, 6, 2)), jnp.zeros((3, 3, 2, 2)))
    with pytest.raises(ValueError, match="3x3 kernel"):
        winograd.winograd_conv3x3(jnp.zeros((1, 4, 8, 2)), jnp.zeros((1, 3, 2, 2)))


def test_use_winograd_covers_wide_float32_same_3x3_convolutions():
    """The rule Conv follows: float32, 3x3, stride 1, SAME, >= 128 channels in and out, width a multiple of
    4."""
    args = dict(
        dtype=jnp.float32, in_channels=128, features=128, width=32, kernel_size=(3, 3), strides=(1, 1)
    )
    assert jax.default_backend() == "cpu"
    assert winograd.use_winograd(**args, padding="SAME")
    assert winograd.use_winograd(**args, padding=1)
    for change in (
        {"dtype": jnp.bfloat16},
        {"in_channels": 64},
        {"features": 127},
        {"width": 30},
        {"kernel_size": (1, 1)},
        {"strides": (2, 2)},
    ):
        assert not winograd.use_winograd(**{**args, **change}, padding="SAME"), change
    assert not winograd.use_winograd(**args, padding="VALID")
    # A list of pairs is not a form it recognizes: the plain convolution.
    assert not winograd.use_winograd(**args, padding=[(1, 1), (1, 1)])


def _conv_windows(fn, *args, platform="cpu"):
    """The kernel window (height, width) of every convolution in fn's program for `platform`."""
    return [
        tuple(e.invars[1].aval.shape[:2])
        for e, _ in jaxprs.equations(jax.make_jaxpr(fn)(*args), platform)
        if e.primitive.name == "conv_general_dilated"
    ]


@pytest.mark.parametrize("switched_off", [False, True])
def test_wide_conv_runs_as_winograd_unless_kernels_are_plain(switched_off):
    """layers.Conv of 128 channels (one array or parts) traces six 3x1 convolutions per part on the CPU, with
    nn.Conv's parameters, values to float rounding and gradients; model.kernels="plain" keeps the 3x3
    convolution of the concatenation."""
    a = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8, 64))
    b = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 8, 64))
    ref, ours = nn.Conv(128, (3, 3)), layers.Conv(128, (3, 3))
    params = ref.init(jax.random.PRNGKey(2), jnp.concatenate([a, b], -1))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(2), (a, b))) == jax.tree.map(
        jnp.shape, params
    )

    def parts(p):
        return ours.apply(p, (a, b))

    parts = _plain(parts) if switched_off else parts
    windows = _conv_windows(parts, params)
    assert windows == ([(3, 3)] if switched_off else [(3, 1)] * 12)

    def whole(p):
        return ref.apply(p, jnp.concatenate([a, b], -1))

    want = whole(params)
    np.testing.assert_allclose(parts(params), want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    g = [jax.grad(lambda p, f=f: jnp.sum(jnp.sin(f(p))))(params) for f in (parts, whole)]
    for x, y in zip(
        jax.tree.leaves(g[0]), jax.tree.leaves(g[1]), strict=True
    ):  # to 1e-5 of each leaf's scale
        assert float(jnp.max(jnp.abs(x - y))) < 1e-5 * float(jnp.max(jnp.abs(y)))


def _layer_cases():
    """(name, module, input) for every layer with a CPU form, in each form's dtype and shape of input."""
    key = jax.random.PRNGKey(0)
    x16 = jax.random.normal(key, (2, 4, 8, 16))
    parts = (x16[..., :6], x16[..., 6:])
    wide = jax.random.normal(key, (1, 4, 8, 128))
    return [
        ("conv, parts", layers.Conv(8), parts),
        ("conv, winograd", layers.Conv(128), wide),
        (
            "conv, bfloat16 parts",
            layers.Conv(16, dtype=jnp.bfloat16),
            tuple(p.astype(jnp.bfloat16) for p in parts),
        ),
        ("dense, parts", layers.Dense(8), parts),
        ("group norm", layers.GroupNorm(4), x16),
        ("group norm silu, parts", layers.GroupNorm(4, silu=True), parts),
        (
            "group norm silu, bfloat16",
            layers.GroupNorm(4, silu=True, dtype=jnp.bfloat16),
            x16.astype(jnp.bfloat16),
        ),
        ("upsample, bfloat16", layers.UpsampleConv(16, dtype=jnp.bfloat16), x16.astype(jnp.bfloat16)),
    ]


@pytest.mark.parametrize("amx_on", [False, True])
@pytest.mark.parametrize("case", range(len(_layer_cases())))
def test_every_cpu_form_equals_the_plain_layer(monkeypatch, case, amx_on):
    """On the CPU, model.kernels="auto" (the CPU forms) and "plain" give the same values and gradients to
    float rounding; with AMX's products on (as where the CPU has AMX) too. "auto" traces other operations
    than "plain" for each case (the CPU form is really taken)."""
    monkeypatch.setattr(amx, "dots_reach_amx", lambda: amx_on)
    name, module, x = _layer_cases()[case]
    params = module.init(jax.random.PRNGKey(1), x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)

    def loss(p):
        out = module.apply(p, x)
        return sum(jnp.sum(jnp.sin(o.astype(jnp.float32))) for o in layers.as_parts(out))

    has_form = amx_on or not name.startswith("upsample")  # upsample_conv's only CPU form is AMX's
    assert (_ops(module.apply, params, x) != _ops(_plain(module.apply), params, x)) == has_form, name
    bf16 = any(jnp.dtype(leaf.dtype) == jnp.bfloat16 for leaf in layers.as_parts(x))
    tol = 2**-6 if bf16 else 2e-5
    results = [(f(module.apply)(params, x), jax.grad(f(loss))(params)) for f in (lambda g: g, _plain)]
    for ours, ref in zip(*(jax.tree.leaves(r) for r in results), strict=True):
        ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
        np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * np.abs(ref).max(), err_msg=name)


def test_the_choice_is_one_config_key_and_plain_programs_hold_no_platform_choice():
    """model.kernels reaches the layers through the model: "plain" traces no platform-dependent branch, and
    a bad value is refused."""
    from configs import shapes
    from semflow_jax import config_lib
    from semflow_jax.errors import SemFlowError
    from semflow_jax.models import build_model, flow_shape

    config = shapes.get_config("tiny")
    h, w, c = flow_shape(config)
    z, t = jnp.zeros((2, h, w, c)), jnp.full((2,), 0.5)
    params = build_model(config).init(jax.random.PRNGKey(0), z, t)
    counts = {}
    for choice in kernels.CHOICES:
        config.model.kernels = choice
        model = build_model(config)
        jaxpr = str(jax.make_jaxpr(lambda p, m=model: m.apply(p, z, t))(params))
        counts[choice] = jaxpr.count("platform_index")
    assert counts["auto"] > 0 and counts["plain"] == 0
    config.model.kernels = "fast"
    with pytest.raises(SemFlowError, match="model.kernels"):
        config_lib.validate(config)
    with pytest.raises(ValueError, match="model.kernels"):
        with kernels.chosen("fast"):
            pass
