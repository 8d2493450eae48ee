"""Automatic masks matched to ground truth: the best IoU of each ground-truth instance over all generated masks
(its mean is the ``auto`` mode's mIoU), and a one-to-one matching at IoU >= :data:`MATCH_IOU` for precision and
recall.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from samtune.metrics import mask_iou_matrix, match_one_to_one

MATCH_IOU = 0.5


@dataclass
class AutoMatch:
    """Generated masks of one image against its ground truth.

    Attributes:
        best_iou: G best IoU of each ground-truth instance over all generated masks (0 without masks).
        best_pred: G index of that generated mask (-1 without masks).
        pred_best_iou: P best IoU of each generated mask over all ground-truth instances (its "true IoU").
        true_positives: Matched pairs of the one-to-one matching at IoU >= ``MATCH_IOU``.
    """

    best_iou: np.ndarray
    best_pred: np.ndarray
    pred_best_iou: np.ndarray
    true_positives: int


def match_to_ground_truth(pred_rles: list[dict], gt_rles: list[dict]) -> AutoMatch:
    """Match generated masks (RLEs) to ground-truth instances (RLEs)."""
    iou = mask_iou_matrix(pred_rles, gt_rles)
    p, g = iou.shape
    best_iou = iou.max(0) if p else np.zeros(g)
    best_pred = iou.argmax(0) if p else np.full(g, -1)
    pred_best = iou.max(1) if g else np.zeros(p)
    return AutoMatch(best_iou, best_pred, pred_best, len(match_one_to_one(iou, MATCH_IOU)))
