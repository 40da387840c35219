"""Mean intersection over union from a streaming confusion matrix (the mmsegmentation / Cityscapes rule).

Ignore pixels are excluded; a class absent from both ground truth and prediction has no IoU and is left out
of the mean.
"""

from __future__ import annotations

import numpy as np

from semflow_jax.flow import IGNORE_LABEL


def confusion_matrix(pred, gt, num_classes: int, valid=None) -> np.ndarray:
    """int64 [C, C] counts, rows ground truth, columns prediction; `valid` [N] drops padded examples."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if valid is not None:
        pred, gt = pred[np.asarray(valid)], gt[np.asarray(valid)]
    keep = gt != IGNORE_LABEL
    gt_k, pred_k = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    if gt_k.size and (gt_k.max() >= num_classes or pred_k.max() >= num_classes or pred_k.min() < 0):
        raise ValueError(f"labels outside [0, {num_classes}) reached the confusion matrix")
    return np.bincount(gt_k * num_classes + pred_k, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """float [C] IoU = TP / (TP + FP + FN); NaN for a class in neither ground truth nor prediction."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """mIoU in percent over the classes that have an IoU."""
    iou = iou_per_class(cm)
    return float(100.0 * np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")


def confusion_matrix_device(pred, gt, num_classes: int, valid):
    """The jnp twin of `confusion_matrix` for (sharded) device arrays: int32 [C, C], `valid` [N] required."""
    import jax.numpy as jnp

    keep = (gt != IGNORE_LABEL) & valid.reshape((-1,) + (1,) * (gt.ndim - 1))
    index = jnp.where(keep, gt.astype(jnp.int32) * num_classes + pred.astype(jnp.int32), 0)
    counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[index.ravel()].add(keep.ravel())
    return counts.reshape(num_classes, num_classes)
