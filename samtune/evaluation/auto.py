"""Automatic mask generation ("segment everything") and its matching to ground truth.

The masks come from segment_anything's own :class:`SamAutomaticMaskGenerator` (a grid of point prompts,
filtered by predicted IoU and stability score, de-duplicated by NMS) run on samtune's model; its
parameters are the ``amg`` config group (``eval.auto`` for evaluation, ``auto`` for ``scripts/predict.py``).
Evaluation matches them to the ground-truth instances: the best IoU of each ground-truth instance over all
generated masks (its mean is the mode's mIoU), and a one-to-one matching at IoU >= 0.5 for precision and
recall.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import MaskData, calculate_stability_score

from samtune.metrics import mask_iou_matrix, match_one_to_one
from samtune.model.promptable_sam import PromptableSam

AMG_PARAMS = (
    "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh", "stability_score_offset",
    "box_nms_thresh", "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio", "crop_n_points_downscale_factor",
    "min_mask_region_area",
)
MATCH_IOU = 0.5


@dataclass
class FilterStats:
    """What the predicted-IoU and stability filters of automatic mask generation did, over every image since the
    generator was built: the figures a user needs when nothing is kept (thresholds that do not fit the model).

    Attributes:
        candidates: Masks decoded (3 per grid point, every crop).
        passed_iou: Of those, masks with predicted IoU above ``pred_iou_thresh``.
        passed_both: Of those, masks with stability score at least ``stability_score_thresh`` (before the
            crop-edge filter and NMS).
        best_pred_iou: Highest predicted IoU of any candidate.
        best_stability: Highest stability score of a candidate that passed the IoU filter (the only ones whose
            stability the generator computes; with ``stability_score_thresh`` 0, of those it kept).
    """

    candidates: int = 0
    passed_iou: int = 0
    passed_both: int = 0
    best_pred_iou: float = -math.inf
    best_stability: float = -math.inf

    def add_scores(self, pred_iou: torch.Tensor, passed: torch.Tensor) -> None:
        """Count one batch of candidates by predicted IoU (``passed``: those above the threshold)."""
        if pred_iou.numel():
            self.candidates += int(pred_iou.numel())
            self.passed_iou += int(passed.sum())
            self.best_pred_iou = max(self.best_pred_iou, float(pred_iou.max()))

    def add_stability(self, stability: torch.Tensor, passed: int) -> None:
        """Count the stability scores of candidates that passed the IoU filter (``passed`` of them also pass
        the stability threshold)."""
        stability = torch.nan_to_num(stability.float(), nan=0.0)  # an empty mask at both thresholds: not stable
        self.passed_both += passed
        if stability.numel():
            self.best_stability = max(self.best_stability, float(stability.max()))

    def as_dict(self) -> dict:
        def num(v: float) -> float | None:
            return None if math.isinf(v) else round(v, 4)

        return {"candidates": self.candidates, "passed_pred_iou": self.passed_iou, "passed_both": self.passed_both,
                "best_pred_iou": num(self.best_pred_iou), "best_stability": num(self.best_stability)}

    def explain(self, pred_iou_thresh: float, stability_thresh: float, where: str) -> str:
        """Why no mask was kept, naming the thresholds (config keys under ``where``) and the best values seen."""
        d = self.as_dict()
        if not self.candidates:
            return "automatic mask generation decoded no candidate mask (no image, or an empty point grid)"
        text = (f"automatic mask generation kept no mask: of {d['candidates']} candidate masks, {d['passed_pred_iou']} "
                f"had predicted IoU above {where}.pred_iou_thresh={pred_iou_thresh:g} (best seen {d['best_pred_iou']})"
                f" and {d['passed_both']} of those stability >= {where}.stability_score_thresh={stability_thresh:g}")
        if d["best_stability"] is not None:
            text += f" (best among them {d['best_stability']})"
        text += ". The thresholds do not fit this model's scores: lower them (SAM's 0.88 / 0.95 fit the official checkpoints)"
        if d["passed_both"]:
            text += ", or check the crop-edge filter and NMS (masks passed both thresholds)"
        return text


class MaskGenerator(SamAutomaticMaskGenerator):
    """segment_anything's generator, unchanged in what it keeps, that also counts what its filters do
    (:class:`FilterStats` in ``stats``) and keeps working when a crop layer keeps no mask at all.

    Counting costs no mask work the generator does not do anyway: predicted IoU comes with every decoded batch, and
    stability is computed (as the generator does) only for masks above the IoU threshold, and not at all when
    ``stability_score_thresh`` is 0 (then the kept masks carry it).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stats = FilterStats()

    def _process_batch(self, points, im_size, crop_box, orig_size) -> MaskData:
        predict = self.predictor.predict_torch

        def counted(*args, **kwargs):
            masks, iou_preds, low_res = predict(*args, **kwargs)
            scores = iou_preds.flatten(0, 1)
            passed = (scores > self.pred_iou_thresh if self.pred_iou_thresh > 0
                      else torch.ones_like(scores, dtype=torch.bool))
            self.stats.add_scores(scores, passed)
            if self.stability_score_thresh > 0 and bool(passed.any()):
                stability = calculate_stability_score(masks.flatten(0, 1)[passed], self.predictor.model.mask_threshold,
                                                      self.stability_score_offset)
                self.stats.add_stability(stability, int((stability >= self.stability_score_thresh).sum()))
            return masks, iou_preds, low_res

        self.predictor.predict_torch = counted
        try:
            data = super()._process_batch(points, im_size, crop_box, orig_size)
        finally:
            del self.predictor.predict_torch  # the bound method of the class again
        if self.stability_score_thresh <= 0:  # no stability filter: every IoU-passing mask passes both
            passed = int(self.stats.passed_iou - self.stats.passed_both)
            self.stats.add_stability(data["stability_score"], passed)
        return data

    def _process_crop(self, image, crop_box, crop_layer_idx, orig_size) -> MaskData:
        data = super()._process_crop(image, crop_box, crop_layer_idx, orig_size)
        if len(data["rles"]) == 0:
            # segment_anything builds an empty crop_boxes of shape (0,), on which the crop NMS fails
            data["crop_boxes"] = torch.zeros((0, 4))
        return data


def build_mask_generator(model: PromptableSam, params: Mapping | None = None) -> MaskGenerator:
    """A :class:`MaskGenerator` (segment_anything's ``SamAutomaticMaskGenerator``) on ``model.sam`` with the given
    parameters.

    Raises:
        ValueError: an unknown parameter (the message lists the valid ones).
    """
    params = dict(params or {})
    unknown = sorted(set(params) - set(AMG_PARAMS))
    if unknown:
        raise ValueError(f"automatic mask generation: unknown parameters {unknown}; valid: {list(AMG_PARAMS)}")
    # COCO RLE out: "binary_mask" would decode every kept mask of an image at full size at once (hundreds of
    # masks of a large image: gigabytes), and every caller stores or matches RLEs anyway
    return MaskGenerator(model.sam, output_mode="coco_rle", **params)


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
