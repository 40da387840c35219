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
