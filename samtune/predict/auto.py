"""Automatic mask generation ("segment everything").

The masks come from segment_anything's own :class:`SamAutomaticMaskGenerator` (a grid of point prompts,
filtered by predicted IoU and stability score, de-duplicated by NMS) run on samtune's model; its
parameters are the ``amg`` config group (``eval.auto`` for evaluation, ``auto`` for ``scripts/predict.py``).

With ``zoom`` set (:class:`ZoomedMaskGenerator`), the generator's masks are only candidates: each candidate's box
is segmented again in a crop of ``zoom`` times its extent (prompt-focused zoom, the ``eval.zoom`` box path), and
the predicted-IoU / stability filters and NMS apply to those answers. Objects a few pixels wide in the whole image
(nuclei, PCB defects) are segmented at a scale the model sees them, and the IoU head judges a mask where it can:
on the shipped ``sam_tiny`` at ``nuclei`` the whole-image masks that match a nucleus have predicted IoU 0.21
(median), the zoomed answers rank far better (README, "Segment everything").
Evaluation matches them to the ground-truth instances (:mod:`samtune.evaluation.matching`).
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

from samtune.model.promptable_sam import PromptableSam
from samtune.predict.segmenter import Segmenter
from samtune.predict.zoom import ZoomConfig, prompt_window

AMG_PARAMS = (
    "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh", "stability_score_offset",
    "box_nms_thresh", "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio", "crop_n_points_downscale_factor",
    "min_mask_region_area",
)
# the prompt-focused zoom of ZoomedMaskGenerator (zoom: null or absent = segment_anything's generator alone)
ZOOM_PARAMS = ("zoom", "candidate_pred_iou_thresh", "candidate_stability_thresh", "candidate_nms_thresh")


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


class ZoomedMaskGenerator:
    """Automatic masks segmented in prompt-focused zoom: :class:`MaskGenerator` proposes candidates (its own
    filters and NMS set loose: ``candidate_*``), each candidate's box is segmented again in a square crop of
    ``zoom`` times its extent resized to the model input (:class:`samtune.predict.segmenter.Segmenter` in
    prompt-focused zoom, the box path of ``eval.zoom``), and the answers are kept by predicted IoU
    (``pred_iou_thresh``) and stability (``stability_score_thresh``), then de-duplicated by box NMS
    (``box_nms_thresh``), as segment_anything does with its own masks.

    It answers like the generator: ``generate(image)`` gives the same dicts (``point_coords`` is the grid point of
    the candidate, ``crop_box`` the zoom window), ``stats`` counts the final filters (``candidate_stats`` the
    candidates'). Costs one encoder call per candidate on top of the generator's (crops batched as memory allows).
    """

    def __init__(self, model: PromptableSam, *, zoom: float, pred_iou_thresh: float = 0.88,
                 stability_score_thresh: float = 0.95, stability_score_offset: float = 1.0,
                 box_nms_thresh: float = 0.7, candidate_pred_iou_thresh: float = 0.0,
                 candidate_stability_thresh: float = 0.0, candidate_nms_thresh: float = 0.5,
                 min_mask_region_area: int = 0, **amg) -> None:
        self.model = model
        self.zoom = ZoomConfig(context=float(zoom))  # validates (context >= 1)
        self.segmenter = Segmenter(model, self.zoom, stability_offset=float(stability_score_offset))
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.min_mask_region_area = int(min_mask_region_area)
        self.candidates = MaskGenerator(
            model.sam, output_mode="coco_rle", pred_iou_thresh=float(candidate_pred_iou_thresh),
            stability_score_thresh=float(candidate_stability_thresh), box_nms_thresh=float(candidate_nms_thresh),
            stability_score_offset=self.stability_score_offset, **amg)
        self.candidate_stats = self.candidates.stats
        self.stats = FilterStats()

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict]:
        from torchvision.ops import batched_nms

        h, w = image.shape[:2]
        candidates = self.candidates.generate(image)
        if not candidates:
            return []
        # inclusive pixel boxes of the candidates (the way the evaluation's box prompts are made from masks)
        prompts = [{"box": [x, y, x + max(bw - 1, 0), y + max(bh - 1, 0)]} for x, y, bw, bh in
                   (c["bbox"] for c in candidates)]
        kept: list[dict] = []
        for pred in self.segmenter.segment(image, prompts, "box", multimask=False):
            passed = pred.pred_iou > self.pred_iou_thresh
            self.stats.add_scores(pred.pred_iou, passed)
            stable = pred.stability[passed] >= self.stability_score_thresh
            self.stats.add_stability(pred.stability[passed], int(stable.sum()))
            for j in torch.nonzero(passed).flatten()[stable].tolist():
                i = pred.index.start + j
                mask = pred.masks[j].numpy()
                if not mask.any():
                    continue
                kept.append({"segmentation": encode_masks([mask])[0], "predicted_iou": float(pred.pred_iou[j]),
                             "stability_score": float(pred.stability[j]), "point_coords": candidates[i]["point_coords"],
                             "crop_box": list(prompt_window(tuple(prompts[i]["box"]), (h, w), self.zoom, is_box=True)),
                             "candidate": i})
        if not kept:
            return []
        if self.min_mask_region_area > 0:
            kept = self._remove_small_regions(kept)
            if not kept:
                return []
        xywh = torch.tensor([list(mask_utils.toBbox(m["segmentation"])) for m in kept], dtype=torch.float)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        scores = torch.tensor([m["predicted_iou"] for m in kept])
        keep = batched_nms(xyxy, scores, torch.zeros(len(kept)), iou_threshold=self.box_nms_thresh)
        out = []
        for k in keep.tolist():
            m = kept[k]
            m["area"] = int(mask_utils.area(m["segmentation"]))
            m["bbox"] = xywh[k].tolist()
            out.append(m)
        return out

    def _remove_small_regions(self, kept: list[dict]) -> list[dict]:
        """segment_anything's clean-up of small holes and islands, mask by mask."""
        from segment_anything.utils.amg import remove_small_regions

        out = []
        for m in kept:
            mask = mask_utils.decode(m["segmentation"]).astype(bool)
            mask, _ = remove_small_regions(mask, self.min_mask_region_area, mode="holes")
            mask, _ = remove_small_regions(mask, self.min_mask_region_area, mode="islands")
            if mask.any():
                out.append({**m, "segmentation": encode_masks([mask])[0]})
        return out

    def explain(self, where: str) -> str:
        """Why no mask was kept (see :meth:`FilterStats.explain`), the candidates' side too."""
        if not self.candidate_stats.candidates:
            return "automatic mask generation decoded no candidate mask (no image, or an empty point grid)"
        if not self.stats.candidates:
            c = self.candidate_stats.as_dict()
            return (f"automatic mask generation kept no candidate to zoom into: of {c['candidates']} grid masks, "
                    f"{c['passed_pred_iou']} had predicted IoU above {where}.candidate_pred_iou_thresh="
                    f"{self.candidates.pred_iou_thresh:g} (best seen {c['best_pred_iou']}) and {c['passed_both']} of "
                    f"those stability >= {where}.candidate_stability_thresh={self.candidates.stability_score_thresh:g}"
                    ". Lower the candidate thresholds")
        return self.stats.explain(self.pred_iou_thresh, self.stability_score_thresh, where) + (
            f" (scores of the {self.stats.candidates} candidates segmented in {self.zoom.context:g}x zoom)")


def explain_no_masks(generator: MaskGenerator | ZoomedMaskGenerator, where: str) -> str:
    """Why ``generator`` kept no mask, naming its thresholds under the config key ``where``."""
    if isinstance(generator, ZoomedMaskGenerator):
        return generator.explain(where)
    return generator.stats.explain(generator.pred_iou_thresh, generator.stability_score_thresh, where)


def filter_stats(generator: MaskGenerator | ZoomedMaskGenerator) -> dict:
    """What the generator's filters did (``FilterStats.as_dict``; with zoom, of the zoomed answers, and the
    candidates' under ``candidates_grid``)."""
    out = generator.stats.as_dict()
    if isinstance(generator, ZoomedMaskGenerator):
        out["candidates_grid"] = generator.candidate_stats.as_dict()
    return out


def build_mask_generator(model: PromptableSam, params: Mapping | None = None) -> MaskGenerator | ZoomedMaskGenerator:
    """The automatic mask generator of ``params`` (config ``eval.auto`` / ``auto`` / ``engine.amg``) on ``model``:
    segment_anything's ``SamAutomaticMaskGenerator`` (:class:`MaskGenerator`), or with ``zoom`` set its masks
    segmented again in prompt-focused zoom (:class:`ZoomedMaskGenerator`).

    Raises:
        ValueError: an unknown parameter (the message lists the valid ones), or ``zoom`` below 1.
    """
    params = dict(params or {})
    unknown = sorted(set(params) - set(AMG_PARAMS) - set(ZOOM_PARAMS))
    if unknown:
        raise ValueError(f"automatic mask generation: unknown parameters {unknown}; valid: "
                         f"{list(AMG_PARAMS) + list(ZOOM_PARAMS)}")
    zoom = params.pop("zoom", None)
    if zoom is not None:
        if isinstance(zoom, bool) or not isinstance(zoom, (int, float)) or zoom < 1:
            raise ValueError(f"automatic mask generation: zoom must be null or a number >= 1 (the crop side as a "
                             f"multiple of a candidate's extent), got {zoom!r}")
        return ZoomedMaskGenerator(model, zoom=zoom, **params)
    for key in ZOOM_PARAMS[1:]:
        params.pop(key, None)  # candidate_* only apply with zoom
    # COCO RLE out: "binary_mask" would decode every kept mask of an image at full size at once (hundreds of
    # masks of a large image: gigabytes), and every caller stores or matches RLEs anyway
    return MaskGenerator(model.sam, output_mode="coco_rle", **params)


def generate_masks(generator: SamAutomaticMaskGenerator | ZoomedMaskGenerator, image: np.ndarray) -> list[dict]:
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
