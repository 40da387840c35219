"""The inference commands on users' files: segment and synthesize on good and bad pictures and masks.

Most runs call the commands in-process (`cli(argv)`, the same parser, loop and exit path as `python -m`); one
test runs each as a real subprocess, twice, to see the exit code, the output and the compilation cache.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import shapes as shapes_config
from semflow_jax import segment, synthesize
from semflow_jax.data import shapes
from semflow_jax.train import train_and_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16  # the tiny config's resolution
NUM_CLASSES = len(shapes.CLASS_NAMES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("run"))
    train_and_checkpoint(shapes_config.get_config("tiny"), wd, quiet=True)
    return wd


def _picture(h, w, channels, seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A folder of good pictures in four forms and sizes, two bad files beside them."""
    d = tmp_path_factory.mktemp("pictures")
    Image.fromarray(_picture(40, 50, 3)).save(d / "photo.png")
    Image.fromarray(_picture(23, 31, 3, 1)).save(d / "camera.jpg", quality=90)
    Image.fromarray(_picture(16, 16, 1, 2)).save(d / "gray.png")
    Image.fromarray(_picture(30, 20, 4, 3)).save(d / "cutout.png")
    (d / "notes.txt").write_text("not a picture")
    data = (d / "photo.png").read_bytes()
    (d / "broken.png").write_bytes(data[: len(data) // 2])
    return d


def _mask(seed=0, size=SIZE, classes=NUM_CLASSES):
    return np.random.default_rng(seed).integers(0, classes, (size, size), dtype=np.uint8)


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    """A folder of good masks (grayscale, palette with ignore pixels) and bad ones."""
    d = tmp_path_factory.mktemp("masks")
    Image.fromarray(_mask(0)).save(d / "scene.png")
    m = _mask(1)
    m[:4] = 255  # ignore
    p = Image.frombytes("P", m.shape[::-1], m.tobytes())  # palette indices are the ids
    p.putpalette(list(np.asarray(shapes.PALETTE).ravel()) + [255, 255, 255] * 251)
    p.save(d / "paletted.png")
    Image.fromarray(_mask(2, classes=NUM_CLASSES + 3)).save(d / "too_many_classes.png")
    return d


def _run(module, argv, capsys):
    with pytest.raises(SystemExit) as e:
        module.cli(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


# --------------------------------------------------------------------------------------------------------
# segment
# --------------------------------------------------------------------------------------------------------
def _check_segmentation(out_dir, stem, input_path):
    with Image.open(input_path) as im:
        w, h = im.size
    ids = Image.open(out_dir / f"{stem}_labels.png")
    assert ids.mode == "L"  # one channel of uint8 class ids
    ids = np.asarray(ids)
    assert ids.shape == (h, w) and ids.dtype == np.uint8
    assert ids.max() < NUM_CLASSES  # never 255: every pixel is read as a class
    color = np.asarray(Image.open(out_dir / f"{stem}_color.png"))
    assert color.shape == (h, w, 3) and color.dtype == np.uint8
    np.testing.assert_array_equal(color, np.asarray(shapes.PALETTE)[ids])  # exactly the palette
    over = np.asarray(Image.open(out_dir / f"{stem}_overlay.png"))
    assert over.shape == (h, w, 3)
    return ids


@pytest.mark.parametrize("name", ["photo.png", "camera.jpg", "gray.png", "cutout.png"])
def test_segment_one_picture_of_each_kind(workdir, pictures, tmp_path, capsys, name):
    code, out, err = _run(
        segment, ["--workdir", workdir, "--input", str(pictures / name), "--output", str(tmp_path)], capsys
    )
    assert code == 0, err
    stem = name.split(".")[0]
    _check_segmentation(tmp_path, stem, pictures / name)
    assert sorted(os.listdir(tmp_path)) == [f"{stem}_{k}.png" for k in ("color", "labels", "overlay")]
    assert str(tmp_path) in out  # says where the results are


def test_segment_folder_writes_the_good_lists_the_bad(workdir, pictures, tmp_path, capsys):
    out_dir = tmp_path / "out"
    argv = ["--workdir", workdir, "--input", str(pictures), "--output", str(out_dir), "--batch-size", "3"]
    code, out, err = _run(segment, [*argv, "--trajectory", "--steps", "3"], capsys)
    assert code == 1  # some inputs failed, the others written
    lines = err.strip().splitlines()
    assert any("broken.png" in x and "not a readable image" in x for x in lines)
    assert any("notes.txt" in x for x in lines)
    for name in ("photo.png", "camera.jpg", "gray.png", "cutout.png"):
        _check_segmentation(out_dir, name.split(".")[0], pictures / name)
        gif = Image.open(out_dir / f"{name.split('.')[0]}_trajectory.gif")
        assert gif.n_frames == 4  # the states at t = 0, 1/3, 2/3, 1
    assert not [f for f in os.listdir(out_dir) if f.startswith(("broken", "notes"))]
    assert len(os.listdir(out_dir)) == 16
    # The batch size does not change the result.
    again = tmp_path / "again"
    code, _, _ = _run(segment, [*argv[:5], str(again), "--batch-size", "1", "--steps", "3"], capsys)
    assert code == 1
    for stem in ("photo", "camera", "gray", "cutout"):
        np.testing.assert_array_equal(
            np.asarray(Image.open(again / f"{stem}_labels.png")),
            np.asarray(Image.open(out_dir / f"{stem}_labels.png")),
        )


def test_segment_and_the_api_agree(workdir, pictures, tmp_path, capsys):
    from semflow_jax import SemFlow

    image = np.asarray(Image.open(pictures / "gray.png").convert("RGB"))  # already at the model's size
    code, _, _ = _run(
        segment,
        ["--workdir", workdir, "--input", str(pictures / "gray.png"), "--output", str(tmp_path)],
        capsys,
    )
    assert code == 0
    expected = SemFlow.from_workdir(workdir).segment(image[None])[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "gray_labels.png")), expected)


# --------------------------------------------------------------------------------------------------------
# synthesize
# --------------------------------------------------------------------------------------------------------
def test_synthesize_folder_samples_grid_and_seeds(workdir, masks, tmp_path, capsys):
    def run(out, *extra):
        argv = ["--workdir", workdir, "--mask", str(masks), "--output", str(out), "--num-samples", "3"]
        return _run(synthesize, [*argv, *extra], capsys)

    code, out, err = run(tmp_path / "a", "--seed", "7", "--trajectory", "--steps", "2")
    assert code == 1 and "too_many_classes.png has class id" in err and "5 classes" in err
    for stem in ("scene", "paletted"):
        samples = [np.asarray(Image.open(tmp_path / "a" / f"{stem}_sample{k}.png")) for k in range(3)]
        for s in samples:
            assert s.shape == (SIZE, SIZE, 3) and s.dtype == np.uint8
        assert not np.array_equal(samples[0], samples[1])  # the perturbation makes them differ
        grid = np.asarray(Image.open(tmp_path / "a" / f"{stem}_grid.png"))
        assert grid.ndim == 3 and grid.shape[1] > 4 * grid.shape[0] // 2  # mask | 3 samples in one row
        assert Image.open(tmp_path / "a" / f"{stem}_trajectory.gif").n_frames == 3
    assert not [f for f in os.listdir(tmp_path / "a") if f.startswith("too_many")]

    # Same seed, same pictures (another batch size too); another seed, other pictures.
    run(tmp_path / "b", "--seed", "7", "--steps", "2", "--batch-size", "1")
    run(tmp_path / "c", "--seed", "8", "--steps", "2")
    for k in range(3):
        a, b, c = (np.asarray(Image.open(tmp_path / d / f"scene_sample{k}.png")) for d in "abc")
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_synthesize_without_perturbation_is_deterministic(workdir, masks, tmp_path, capsys):
    argv = ["--workdir", workdir, "--mask", str(masks / "scene.png"), "--output", str(tmp_path)]
    code, _, err = _run(synthesize, [*argv, "--beta", "0", "--num_samples", "2"], capsys)
    assert code == 0, err
    a, b = (np.asarray(Image.open(tmp_path / f"scene_sample{k}.png")) for k in range(2))
    np.testing.assert_array_equal(a, b)


def test_synthesize_resizes_masks_only_when_asked(workdir, tmp_path, capsys):
    Image.fromarray(_mask(3, size=SIZE * 2)).save(tmp_path / "big.png")
    argv = ["--workdir", workdir, "--mask", str(tmp_path / "big.png"), "--output", str(tmp_path / "out")]
    code, _, err = _run(synthesize, argv, capsys)
    assert code == 2 and "32x32" in err and f"{SIZE}x{SIZE}" in err
    code, _, err = _run(synthesize, [*argv, "--resize-masks"], capsys)
    assert code == 0, err
    assert np.asarray(Image.open(tmp_path / "out" / "big_sample0.png")).shape == (SIZE, SIZE, 3)


# --------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file, a non-zero exit, nothing written.
# --------------------------------------------------------------------------------------------------------
def _bad_inputs(d):
    """(command, flag, path, what the message must say) for every bad-input case of the issue."""
    (d / "text.png").write_text("this is not a PNG")
    good = d / "good.png"
    Image.fromarray(_picture(20, 20, 3)).save(good)
    (d / "corrupt.png").write_bytes(good.read_bytes()[:60])
    Image.fromarray(_mask(0, classes=NUM_CLASSES + 1) | 1).save(d / "ids.png")  # some id == NUM_CLASSES
    Image.fromarray(_mask(0, size=SIZE + 2)).save(d / "size.png")
    Image.fromarray(_picture(SIZE, SIZE, 3)).save(d / "rgb.png")
    Image.fromarray(_mask(0)).save(d / "mask.jpg")
    (d / "empty").mkdir()
    return [
        (segment, "--input", d / "text.png", "text.png is not a readable image"),
        (segment, "--input", d / "corrupt.png", "corrupt.png is not a readable image"),
        (segment, "--input", d / "empty", "holds no files"),
        (segment, "--input", d / "missing.png", "missing.png does not exist"),
        (synthesize, "--mask", d / "text.png", "text.png is not a readable image"),
        (synthesize, "--mask", d / "corrupt.png", "corrupt.png is not a readable image"),
        (synthesize, "--mask", d / "ids.png", f"ids.png has class id {NUM_CLASSES}"),
        (synthesize, "--mask", d / "size.png", f"size.png is {SIZE + 2}x{SIZE + 2}"),
        (synthesize, "--mask", d / "rgb.png", "rgb.png has 3 channels"),
        (synthesize, "--mask", d / "mask.jpg", "mask.jpg is a JPEG"),
        (synthesize, "--mask", d / "empty", "holds no files"),
    ]


def test_every_bad_input_is_one_line_and_writes_nothing(workdir, tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    for i, (module, flag, path, message) in enumerate(cases):
        out_dir = tmp_path / f"out{i}"
        code, _, err = _run(module, ["--workdir", workdir, flag, str(path), "--output", str(out_dir)], capsys)
        assert code == 2, (path, err)
        assert len(err.strip().splitlines()) == 1 and message in err, err
        assert not out_dir.exists() or not os.listdir(out_dir), path
    # A workdir with no trained model (an empty folder, a config without checkpoints), and none at all.
    good = str(tmp_path / "good.png")
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "untrained").mkdir()
    (tmp_path / "untrained" / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
    for wd, message in (
        (tmp_path / "empty_run", "config.json not found"),
        (tmp_path / "untrained", "no checkpoint"),
        (tmp_path / "nowhere", "does not exist"),
    ):
        code, _, err = _run(
            segment, ["--workdir", str(wd), "--input", good, "--output", str(tmp_path / "o")], capsys
        )
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    # Flags: a bad value is one line too, and beta must keep every pixel in its class.
    code, _, err = _run(
        synthesize, ["--workdir", workdir, "--mask", good, "--output", "x", "--steps", "0"], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--steps" in err
    Image.fromarray(_mask(0)).save(tmp_path / "fine.png")
    mask = str(tmp_path / "fine.png")
    code, _, err = _run(
        synthesize,
        ["--workdir", workdir, "--mask", mask, "--output", str(tmp_path / "b"), "--beta", "200"],
        capsys,
    )
    assert code == 2 and "--beta" in err and "127.5" in err and not (tmp_path / "b").exists()


def test_commands_as_processes_and_the_compilation_cache(workdir, pictures, masks, tmp_path):
    env = dict(
        os.environ, SEMFLOW_CACHE=str(tmp_path / "cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
    )
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the suite's shared cache: the commands' default is tested
    cache_dir = tmp_path / "cache" / "xla"

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
        )

    seg = ["semflow_jax.segment", "--workdir", workdir, "--input", str(pictures / "photo.png")]
    first = run(*seg, "--output", str(tmp_path / "s1"))
    assert first.returncode == 0, first.stderr
    assert "1 pictures segmented" in first.stdout and str(tmp_path / "s1") in first.stdout
    entries = set(os.listdir(cache_dir))
    assert entries  # the executables were stored
    second = run(*seg, "--output", str(tmp_path / "s2"))
    assert second.returncode == 0 and set(os.listdir(cache_dir)) == entries  # all read back, none rebuilt
    syn = run(
        "semflow_jax.synthesize", "--workdir", workdir, "--mask", str(masks), "--output", str(tmp_path / "y")
    )
    assert syn.returncode == 1 and syn.stderr.count("error:") == 1, syn.stderr


def test_api_trajectories_start_and_end_where_they_should(workdir):
    import jax.numpy as jnp

    from semflow_jax import SemFlow, flow

    m = SemFlow.from_workdir(workdir)
    images = np.stack([_picture(SIZE, SIZE, 3, s) for s in range(3)])
    labels, frames = m.segment(images, steps=3, return_trajectory=True)
    assert frames.shape == (3, 4, SIZE, SIZE, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[:, 0], images)  # t = 0 is the picture itself (pixel space)
    read = flow.mask_to_labels(flow.image_to_flow(frames[:, -1]), m.anchors)  # t = 1, read as a mask
    assert np.mean(np.asarray(read) == labels) > 0.99  # up to the uint8 rounding of the frame
    np.testing.assert_array_equal(m.segment(images, steps=3), labels)  # the trajectory changes nothing

    masks = np.stack([_mask(s) for s in range(2)])
    samples, frames = m.synthesize(masks, steps=3, beta=0.0, return_trajectory=True)
    assert frames.shape == (2, 4, SIZE, SIZE, 3)
    painted = flow.flow_to_image(flow.labels_to_mask(jnp.asarray(masks), m.anchors))
    np.testing.assert_array_equal(frames[:, 0], np.asarray(painted))  # t = 1: the painted mask (beta 0)
    np.testing.assert_array_equal(frames[:, -1], samples)  # t = 0: the returned pictures
