"""mIoU from a confusion matrix: the standard rule, ignore excluded, absent classes left out."""

import numpy as np

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
