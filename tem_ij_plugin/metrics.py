"""Segmentation scores: one confusion matrix and one mean IoU.

They serve the trainer, the demo, the experiment and the benchmarks.
"""

from __future__ import annotations

import numpy as np


def confusion(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """The confusion matrix (truth x prediction) of two label arrays of one shape; negative labels are skipped.

    >>> confusion(np.array([0, 1, 1, -1]), np.array([0, 1, 0, 1]), 2).tolist()
    [[1, 1], [0, 1]]
    """
    pred, truth = np.asarray(pred).ravel(), np.asarray(truth).ravel()
    keep = (pred >= 0) & (truth >= 0)
    pairs = truth[keep].astype(np.int64) * n_classes + pred[keep].astype(np.int64)
    return np.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def class_iou(conf: np.ndarray) -> np.ndarray:
    """IoU of each class of a confusion matrix; NaN for a class in neither truth nor prediction.

    >>> class_iou(np.array([[1, 1], [0, 1]])).round(3).tolist()
    [0.5, 0.5]
    """
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(conf: np.ndarray) -> float:
    """Mean IoU over the classes that occur in truth or prediction of a confusion matrix (0 if none do).

    >>> mean_iou(np.array([[8, 2], [0, 10]]))
    0.8166666666666667
    """
    per_class = class_iou(conf)
    present = ~np.isnan(per_class)
    return float(per_class[present].mean()) if present.any() else 0.0


def miou(pred: np.ndarray, truth: np.ndarray, n_classes: int = 2) -> float:
    """Mean IoU of two label arrays of one shape (see :func:`mean_iou`).

    >>> miou(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 1]]))
    0.5833333333333333
    """
    return mean_iou(confusion(pred, truth, n_classes))
