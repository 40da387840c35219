"""The embedded `shapes` dataset and its grain pipelines."""

import numpy as np
import pytest

from configs import shapes as shapes_config
from semflow_jax.data import pipeline, shapes


def test_examples_are_a_pure_function_of_seed_split_index():
    a = shapes.make_example(0, "train", 7, 32)
    b = shapes.make_example(0, "train", 7, 32)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert a["image"].dtype == np.uint8 and a["image"].shape == (32, 32, 3)
    assert a["label"].dtype == np.uint8 and a["label"].shape == (32, 32)
    c = shapes.make_example(0, "validation", 7, 32)
    assert not np.array_equal(a["image"], c["image"])  # disjoint splits
    d = shapes.make_example(1, "train", 7, 32)
    assert not np.array_equal(a["image"], d["image"])


def _pixels(n=300, size=32):
    ex = [shapes.make_example(0, "train", i, size) for i in range(n)]
    images = np.stack([e["image"] for e in ex]).reshape(-1, 3).astype(float)
    labels = np.stack([e["label"] for e in ex]).reshape(-1)
    return images, labels


def test_every_class_appears_and_objects_overlap():
    _, labels = _pixels(100)
    counts = np.bincount(labels, minlength=shapes.NUM_CLASSES)
    assert shapes.NUM_CLASSES >= 5 and (counts > 0).all()


def test_disks_and_rings_share_colours_other_classes_do_not():
    images, labels = _pixels()
    mean = {c: images[labels == c].mean(0) for c in range(shapes.NUM_CLASSES)}
    spread = {c: images[labels == c].std(0).mean() for c in range(shapes.NUM_CLASSES)}
    assert np.abs(mean[3] - mean[4]).max() < 12  # rings and disks: same colour distribution
    for c in (0, 1, 2):
        assert np.abs(mean[4] - mean[c]).max() > 40  # different colour distribution
    assert all(s > 10 for s in spread.values())  # real variation inside each class


def test_train_iterator_batches_and_resumes_exactly():
    config = shapes_config.get_config("tiny")
    it = pipeline.train_iterator(config)
    first = next(it)
    assert first["image"].shape == (8, 16, 16, 3) and first["label"].shape == (8, 16, 16)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    it2 = pipeline.train_iterator(config)
    it2.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(it2)["image"], e["image"])


def test_processes_read_disjoint_examples():
    config = shapes_config.get_config("tiny")
    config.train.batch_size = 4
    a = next(pipeline.train_iterator(config, 0, 2))["image"]
    b = next(pipeline.train_iterator(config, 1, 2))["image"]
    assert a.shape[0] == 2 and not np.array_equal(a, b)


def test_eval_batches_pad_and_mark_padding():
    config = shapes_config.get_config("tiny")
    batches = list(pipeline.eval_batches(config, 10, 4))
    assert [b["image"].shape[0] for b in batches] == [4, 4, 4]
    assert [int(b["valid"].sum()) for b in batches] == [4, 4, 2]
    with pytest.raises(Exception, match="validation"):
        list(pipeline.eval_batches(config, 1000, 4))
