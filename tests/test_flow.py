"""The method against the paper's equations: anchors, ignore, perturbation, interpolation, the integrator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semflow_jax import flow


def test_anchor_colors_follow_eq7():
    a = flow.anchor_colors(216, base=6, spacing=50)
    np.testing.assert_array_equal(a[0], [0, 0, 0])
    np.testing.assert_array_equal(a[1], [0, 0, 50])
    np.testing.assert_array_equal(a[6], [0, 50, 0])
    np.testing.assert_array_equal(a[36], [50, 0, 0])
    np.testing.assert_array_equal(a[215], [250, 250, 250])
    assert len({tuple(x) for x in a}) == 216  # all distinct
    np.testing.assert_allclose(flow.anchors_for(216)[0], [-1, -1, -1])


@pytest.mark.parametrize("base,spacing", [(6, 50.0), (4, 80.0), (3, 100.0)])
def test_anchor_round_trip_every_class(base, spacing):
    c = base**3
    anchors = flow.anchors_for(c, base, spacing)
    labels = jnp.arange(c).reshape(1, 1, c)
    back = flow.mask_to_labels(flow.labels_to_mask(labels, anchors), anchors)
    np.testing.assert_array_equal(back, labels)


def test_too_many_classes_refused():
    with pytest.raises(ValueError, match="base"):
        flow.anchor_colors(217, base=6)


def test_ignore_is_painted_white_and_is_no_anchor():
    anchors = flow.anchors_for(216)
    labels = jnp.array([[0, 255, 5]])
    mask = flow.labels_to_mask(labels, anchors)
    np.testing.assert_array_equal(mask[0, 1], [1.0, 1.0, 1.0])
    dist = np.sqrt(((np.asarray(anchors) - 1.0) ** 2).sum(-1)).min()
    assert dist > 0.03  # white sits 5/127.5 from the nearest anchor (250, 250, 250)


@settings(max_examples=40, deadline=None)
@given(
    base=st.integers(2, 6),
    spacing_frac=st.floats(0.2, 1.0),
    beta_frac=st.floats(0.0, 0.999),
    seed=st.integers(0, 2**31 - 1),
)
def test_perturbation_never_changes_the_class(base, spacing_frac, beta_frac, seed):
    spacing = spacing_frac * 255.0 / (base - 1)
    beta = beta_frac * spacing / 2
    c = base**3
    anchors = flow.anchors_for(c, base, spacing)
    labels = jax.random.randint(jax.random.PRNGKey(seed), (4, 16, 16), 0, c)
    rng = jax.random.PRNGKey(seed + 1)
    mask = flow.perturb(rng, flow.labels_to_mask(labels, anchors), beta)
    np.testing.assert_array_equal(flow.mask_to_labels(mask, anchors), labels)


def test_perturbation_is_bounded_and_not_zero():
    anchors = flow.anchors_for(5)
    mask = flow.labels_to_mask(jnp.zeros((2, 8, 8), jnp.int32), anchors)
    out = flow.perturb(jax.random.PRNGKey(0), mask, 10.0)
    eps = np.asarray(out - mask) * 127.5
    assert np.abs(eps).max() <= 10.0 + 1e-4
    assert np.abs(eps).max() > 5.0


def test_beta_at_half_spacing_is_refused():
    flow.check_beta(24.9, 50.0)
    with pytest.raises(ValueError, match="beta"):
        flow.check_beta(25.0, 50.0)


def test_interpolation_and_target():
    z0 = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 3))
    z1 = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 3))
    t = jnp.array([0.0, 0.25, 1.0])
    zt = flow.interpolate(z0, z1, t)
    np.testing.assert_allclose(zt[0], z0[0], atol=1e-6)
    np.testing.assert_allclose(zt[2], z1[2], atol=1e-6)
    np.testing.assert_allclose(zt[1], 0.75 * z0[1] + 0.25 * z1[1], atol=1e-6)
    # The target is the time derivative of the path.
    dt = 1e-2
    deriv = (flow.interpolate(z0, z1, t + dt) - flow.interpolate(z0, z1, t)) / dt
    np.testing.assert_allclose(deriv, flow.target_velocity(z0, z1), atol=1e-3)
    # The oracle velocity has zero loss; a wrong one does not.
    oracle = lambda z, t: z1 - z0  # noqa: E731
    assert float(flow.flow_loss(oracle, z0, z1, t)) < 1e-10
    assert float(flow.flow_loss(lambda z, t: 0 * z, z0, z1, t)) > 0.5


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 3, 25])
def test_constant_field_integrates_exactly_both_ways(solver, steps):
    z0 = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
    z1 = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 3))
    v = lambda z, t: z1 - z0  # noqa: E731  the straight path's velocity
    np.testing.assert_allclose(flow.integrate(v, z0, 1.0, steps, solver), z1, atol=1e-5)
    np.testing.assert_allclose(flow.integrate(v, z1, -1.0, steps, solver), z0, atol=1e-5)


def test_time_grid_matches_the_paper():
    seen = []

    def v(z, t):
        jax.debug.callback(lambda x: seen.append(float(x)), t[0] * flow.TIME_SCALE)
        return jnp.zeros_like(z)

    z = jnp.zeros((1, 2))
    flow.integrate(v, z, 1.0, 25).block_until_ready()
    np.testing.assert_allclose(seen, np.arange(25) * 40.0, atol=1e-3)  # 0, 40, ..., 960
    seen.clear()
    flow.integrate(v, z, -1.0, 25).block_until_ready()
    np.testing.assert_allclose(seen, 1000.0 - np.arange(25) * 40.0, atol=1e-3)  # 1000, 960, ..., 40


def test_euler_vs_heun_on_a_time_dependent_field():
    # dz/dt = 2t: exact z(1) - z(0) = 1. Heun (trapezoid) is exact for linear-in-t fields; Euler is not.
    v = lambda z, t: jnp.broadcast_to(2 * t[:, None], z.shape)  # noqa: E731
    z = jnp.zeros((1, 1))
    assert abs(float(flow.integrate(v, z, 1.0, 4, "heun")[0, 0]) - 1.0) < 1e-6
    euler = float(flow.integrate(v, z, 1.0, 4, "euler")[0, 0])
    np.testing.assert_allclose(euler, 0.75, atol=1e-6)  # left Riemann sum 2 * (0 + 1 + 2 + 3) / 16
    # Backward from z = 1 returns to 0 with Heun.
    assert abs(float(flow.integrate(v, jnp.ones((1, 1)), -1.0, 4, "heun")[0, 0])) < 1e-6


def test_trajectory_has_every_step():
    v = lambda z, t: jnp.ones_like(z)  # noqa: E731
    end, path = flow.integrate(v, jnp.zeros((1, 2)), 1.0, 5, return_trajectory=True)
    assert path.shape == (6, 1, 2)
    np.testing.assert_allclose(path[:, 0, 0], np.linspace(0, 1, 6), atol=1e-6)
    np.testing.assert_allclose(end, path[-1])


def test_unknown_solver_refused():
    with pytest.raises(ValueError, match="solver"):
        flow.integrate(lambda z, t: z, jnp.zeros((1, 2)), 1.0, 2, "rk4")


def test_one_compilation_serves_both_directions():
    traces = []

    @jax.jit
    def run(z, d):
        traces.append(1)  # runs once per trace (= per compilation)
        return flow.integrate(lambda z, t: -z * t[:, None], z, d, 10)

    z = jnp.ones((2, 3))
    fwd = run(z, jnp.float32(1.0))
    bwd = run(z, jnp.float32(-1.0))
    assert len(traces) == 1
    assert run._cache_size() == 1
    assert not np.allclose(fwd, bwd)


@pytest.mark.parametrize("power,fraction", [(1.0, 1.0), (3.0, 1.0), (3.0, 0.5), (3.0, 0.0)])
def test_time_sampling(power, fraction):
    t = np.asarray(flow.sample_time(jax.random.PRNGKey(0), 40000, power, fraction))
    assert t.min() >= 0 and t.max() < 1
    mean = fraction / (power + 1) + (1 - fraction) / 2  # E[u^p] = 1 / (p + 1)
    below = fraction * 0.05 ** (1 / power) + (1 - fraction) * 0.05
    np.testing.assert_allclose(t.mean(), mean, atol=0.01)
    np.testing.assert_allclose((t < 0.05).mean(), below, atol=0.01)
