"""mIoU from a confusion matrix: the standard rule, ignore excluded, absent classes left out."""

import numpy as np
import pytest

from semflow_jax.metrics import miou


def test_known_confusion():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    cm = miou.confusion_matrix(pred, gt, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [0, 0, 0]])
    iou = miou.iou_per_class(cm)
    np.testing.assert_allclose(iou[:2], [1 / 2, 2 / 3])
    assert np.isnan(iou[2])  # in neither: left out of the mean
    np.testing.assert_allclose(miou.mean_iou(cm), 100 * (1 / 2 + 2 / 3) / 2)


def test_ignore_and_padding_never_count():
    gt = np.array([[0, 255], [1, 1]])
    pred = np.array([[0, 1], [0, 0]])
    cm = miou.confusion_matrix(pred, gt, 2, valid=np.array([True, False]))
    np.testing.assert_array_equal(cm, [[1, 0], [0, 0]])
    assert miou.mean_iou(cm) == 100.0


def test_predicted_but_absent_class_counts_as_zero():
    cm = miou.confusion_matrix(np.array([[0, 2]]), np.array([[0, 0]]), 3)
    iou = miou.iou_per_class(cm)
    assert iou[2] == 0.0 and np.isnan(iou[1])


def test_pairwise_distance_sum_masks_padding():
    import itertools

    import jax.numpy as jnp

    from semflow_jax.eval import pairwise_distance_sum

    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8) for _ in range(3)]
    valid = np.array([True, True, True, False])
    total, count = pairwise_distance_sum([jnp.asarray(s) for s in samples], jnp.asarray(valid))
    x = [s[:3].astype(np.float64) / 255 for s in samples]
    rows = np.mean(
        [np.sqrt(((x[a] - x[b]) ** 2).mean(axis=(1, 2, 3))) for a, b in itertools.combinations(range(3), 2)],
        0,
    )
    assert int(count) == 3 and float(total) == pytest.approx(rows.sum(), rel=1e-5)


def _independent_miou(pred, gt, num_classes):
    """mIoU straight from the definition, class by class with boolean masks (no confusion matrix)."""
    keep = gt != 255
    ious = []
    for c in range(num_classes):
        p, g = (pred == c) & keep, (gt == c) & keep
        union = np.sum(p | g)
        if union:  # a class in neither ground truth nor prediction is left out
            ious.append(np.sum(p & g) / union)
    return 100 * float(np.mean(ious))


def test_matches_an_independent_implementation_on_random_labels_with_ignore():
    rng = np.random.default_rng(0)
    for trial in range(5):
        c = int(rng.integers(2, 12))
        gt = rng.integers(0, c, (6, 17, 13))
        gt[rng.random(gt.shape) < 0.2] = 255  # ignore pixels
        pred = np.where(rng.random(gt.shape) < 0.6, gt % c, rng.integers(0, c, gt.shape))
        if trial == 0:
            gt[gt == 1] = 0  # a class only ever predicted, never true
        cm = miou.confusion_matrix(pred, gt, c)
        assert miou.mean_iou(cm) == pytest.approx(_independent_miou(pred, gt, c), rel=1e-12)


def test_device_confusion_is_identical_on_1_and_8_devices():
    import functools

    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from semflow_jax import sharding

    rng = np.random.default_rng(1)
    c = 7
    gt = rng.integers(0, c, (16, 9, 11)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.15] = 255
    pred = rng.integers(0, c, gt.shape).astype(np.uint8)
    valid = np.arange(16) < 13  # three padding rows
    count = functools.partial(miou.confusion_matrix_device, num_classes=c)
    results = []
    for n in (1, 8):
        mesh = sharding.mesh_from_config((("data", n),), jax.devices()[:n])
        split = NamedSharding(mesh, P("data"))
        args = [jax.device_put(x, split) for x in (pred, gt, valid)]
        cm = jax.jit(lambda p, g, v: count(p, g, valid=v), out_shardings=NamedSharding(mesh, P()))(*args)
        results.append(np.asarray(cm))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], miou.confusion_matrix(pred, gt, c, valid=valid))
    assert miou.mean_iou(results[1]) == miou.mean_iou(miou.confusion_matrix(pred[:13], gt[:13], c))
