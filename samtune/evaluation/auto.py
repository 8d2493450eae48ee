"""Automatic mask generation ("segment everything") and its matching to ground truth.

The masks come from segment_anything's own :class:`SamAutomaticMaskGenerator` (a grid of point prompts,
filtered by predicted IoU and stability score, de-duplicated by NMS) run on samtune's model; its
parameters are the ``amg`` config group (``eval.auto`` for evaluation, ``auto`` for ``scripts/predict.py``).
Evaluation matches them to the ground-truth instances: the best IoU of each ground-truth instance over all
generated masks (its mean is the mode's mIoU), and a one-to-one matching at IoU >= 0.5 for precision and
recall.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator

from samtune.metrics import mask_iou_matrix, match_one_to_one
from samtune.model.promptable_sam import PromptableSam

AMG_PARAMS = (
    "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh", "stability_score_offset",
    "box_nms_thresh", "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio", "crop_n_points_downscale_factor",
    "min_mask_region_area",
)
MATCH_IOU = 0.5


def build_mask_generator(model: PromptableSam, params: Mapping | None = None) -> SamAutomaticMaskGenerator:
    """A :class:`SamAutomaticMaskGenerator` on ``model.sam`` with the given parameters.

    Raises:
        ValueError: an unknown parameter (the message lists the valid ones).
    """
    params = dict(params or {})
    unknown = sorted(set(params) - set(AMG_PARAMS))
    if unknown:
        raise ValueError(f"automatic mask generation: unknown parameters {unknown}; valid: {list(AMG_PARAMS)}")
    # COCO RLE out: "binary_mask" would decode every kept mask of an image at full size at once (hundreds of
    # masks of a large image: gigabytes), and every caller stores or matches RLEs anyway
    return SamAutomaticMaskGenerator(model.sam, output_mode="coco_rle", **params)


def generate_masks(generator: SamAutomaticMaskGenerator, image: np.ndarray) -> list[dict]:
    """Masks of ``image`` (H x W x 3 uint8 RGB), largest first.

    Returns:
        Dicts with ``segmentation`` (COCO RLE, counts as str, from :func:`build_mask_generator`), ``area``,
        ``bbox`` (XYWH), ``predicted_iou``, ``stability_score``, ``point_coords`` (the grid point that produced
        the mask), ``crop_box``.
    """
    return sorted(generator.generate(image), key=lambda m: -int(m["area"]))


def encode_masks(masks: Iterable[np.ndarray] | np.ndarray) -> list[dict]:
    """COCO RLEs (counts as str) of H x W boolean masks (an iterator is encoded one mask at a time)."""
    rles = []
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray(np.asarray(m, dtype=np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        rles.append(rle)
    return rles


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
