"""Pseudo-labels of the data engine: proposals by automatic mask generation, filters, COCO files, quality.

Proposals come from segment_anything's ``SamAutomaticMaskGenerator`` run on the current model with its own
quality filters off (predicted-IoU and stability thresholds 0), so that every mask it would consider is kept
with its predicted IoU and stability score; the engine's thresholds (SAM's defaults 0.88 / 0.95, or chosen on
the validation split) are applied afterwards, which lets the report count masks proposed, kept and rejected
and lets the thresholds be chosen from validation without generating twice. Box NMS is the generator's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samtune.data.records import ImageRecord, load_record
from samtune.evaluation.matching import match_to_ground_truth
from samtune.metrics import calibration
from samtune.model.promptable_sam import PromptableSam
from samtune.predict.auto import build_mask_generator, encode_masks, generate_masks
from samtune.utils.io import atomic_write_json
from samtune.utils.progress import progress

CATEGORY = {"id": 1, "name": "object"}


@dataclass
class Proposal:
    """One generated mask of one image."""

    rle: dict
    area: int
    bbox: list[float]
    predicted_iou: float
    stability_score: float


@dataclass(frozen=True)
class Thresholds:
    """Which proposals become pseudo-labels (``engine.pred_iou_thresh`` / ``engine.stability_score_thresh``)."""

    pred_iou: float = 0.88
    stability: float = 0.95

    def keeps(self, p: Proposal) -> bool:
        return p.predicted_iou >= self.pred_iou and p.stability_score >= self.stability

    def as_dict(self) -> dict:
        return {"pred_iou_thresh": self.pred_iou, "stability_score_thresh": self.stability}


def propose(model: PromptableSam, records: list[ImageRecord], amg: Mapping, *, desc: str = "proposals") -> dict[str, list[Proposal]]:
    """All masks the generator proposes for each image (its IoU/stability filters off), largest first."""
    params = {**dict(amg), "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    generator = build_mask_generator(model, params)
    was_training = model.training
    model.eval()
    out: dict[str, list[Proposal]] = {}
    for record in progress(records, desc=desc):
        image, _ = load_record(record)
        masks = generate_masks(generator, image)
        rles = [m["segmentation"] for m in masks]  # COCO RLE (build_mask_generator)
        out[record.rel_path] = [
            Proposal(rle, int(m["area"]), [float(v) for v in m["bbox"]], float(m["predicted_iou"]),
                     float(m["stability_score"]))
            for rle, m in zip(rles, masks, strict=True)
        ]
    model.train(was_training)
    return out


def _true_iou(record: ImageRecord, masks: list[Proposal], binary_as_one_object: bool) -> list[float]:
    """IoU of each mask with its best-matching ground-truth instance of ``record``."""
    _, instances = load_record(record, binary_as_one_object=binary_as_one_object)
    gt = encode_masks(instances == i for i in range(1, int(instances.max()) + 1))  # one full-size mask at a time
    return match_to_ground_truth([p.rle for p in masks], gt).pred_best_iou.tolist()


def hidden_label_iou(records: list[ImageRecord], kept: Mapping[str, list[Proposal]],
                     binary_as_one_object: bool = False) -> list[float]:
    """IoU of each kept mask with its best-matching hidden ground-truth instance (only to measure quality)."""
    return hidden_label_quality(records, kept, binary_as_one_object)["ious"]


def hidden_label_quality(records: list[ImageRecord], kept: Mapping[str, list[Proposal]],
                         binary_as_one_object: bool = False, good_iou: float = 0.5) -> dict:
    """How good the kept masks are against the hidden labels of their images (never trained on).

    Returns ``ious`` (each kept mask's IoU with its best-matching instance), ``mean_iou``, ``precision``
    (share of kept masks that overlap an instance at IoU >= ``good_iou``), ``objects`` (instances of the images
    that have proposals) and ``recall`` (share of those instances with a kept mask at IoU >= ``good_iou``).
    """
    ious: list[float] = []
    objects = found = 0
    for record in records:
        if record.rel_path not in kept:
            continue
        _, instances = load_record(record, binary_as_one_object=binary_as_one_object)
        gt = encode_masks(instances == i for i in range(1, int(instances.max()) + 1))
        masks = kept.get(record.rel_path) or []
        objects += len(gt)
        if masks and gt:
            match = match_to_ground_truth([p.rle for p in masks], gt)
            ious += match.pred_best_iou.tolist()
            found += int((match.best_iou >= good_iou).sum())
        elif masks:
            ious += [0.0] * len(masks)
    return {"ious": ious, "mean_iou": float(np.mean(ious)) if ious else None,
            "precision": float(np.mean(np.asarray(ious) >= good_iou)) if ious else None,
            "objects": objects, "recall": found / objects if objects else None, "good_iou": good_iou}


def choose_thresholds(proposals: Mapping[str, list[Proposal]], records: list[ImageRecord], *,
                      binary_as_one_object: bool = False, good_iou: float = 0.5, target_iou: float | None = None,
                      min_kept: int = 3) -> tuple[Thresholds | None, dict]:
    """Thresholds chosen on labelled (validation) images, and how well the IoU head ranks the proposals there.

    Every proposal is matched to its best ground-truth instance (its "true IoU"); a proposal is good when that IoU
    reaches ``good_iou``. Over a grid of predicted-IoU and stability thresholds:

    * ``target_iou`` None: the pair with the best F1 of "kept" against "good" wins (ties: the stricter pair);
    * ``target_iou`` a number: among the pairs whose kept proposals (at least ``min_kept``) have a mean true IoU of
      at least ``target_iou``, the one that keeps the most wins (ties: the stricter pair). When no pair reaches
      it, the thresholds are None (keep nothing) and the stats say the best mean IoU any pair reached.

    Returns:
        (thresholds, {"spearman", "ece", "n", "f1", "precision", "recall", "mean_iou", "kept", "good_iou",
        "n_good", "target_iou", "best_mean_iou"}): calibration of the predicted IoU against the true IoU of the
        proposals, and the chosen pair's scores on validation.
    """
    pred, stab, true = [], [], []
    for record in records:
        props = proposals.get(record.rel_path) or []
        if not props:
            continue
        true += _true_iou(record, props, binary_as_one_object)
        pred += [p.predicted_iou for p in props]
        stab += [p.stability_score for p in props]
    pred_a, stab_a, true_a = np.asarray(pred), np.asarray(stab), np.asarray(true)
    stats = calibration(pred_a, true_a)
    good = true_a >= good_iou
    best: tuple | None = None
    best_key = None
    best_mean = None
    # the whole range: a model's IoU head may score far below SAM's (the shipped sam_tiny's whole-image masks: < 0.4)
    for t_iou in np.round(np.arange(0.0, 1.0001, 0.02), 2):
        for t_stab in np.round(np.arange(0.0, 1.0001, 0.05), 2):
            kept = (pred_a >= t_iou) & (stab_a >= t_stab)
            n_kept = int(kept.sum())
            tp = int((kept & good).sum())
            precision = tp / max(n_kept, 1)
            recall = tp / max(int(good.sum()), 1)
            f1 = 2 * precision * recall / max(precision + recall, 1e-9)
            mean_iou = float(true_a[kept].mean()) if n_kept else None
            if target_iou is None:
                key = f1
            else:
                if n_kept < min_kept:
                    continue
                best_mean = mean_iou if best_mean is None else max(best_mean, mean_iou)
                if mean_iou < target_iou:
                    continue
                key = n_kept
            if best_key is None or key >= best_key - 1e-12:
                best_key = key
                best = (Thresholds(float(t_iou), float(t_stab)), f1, precision, recall, mean_iou, n_kept)
    info = {**stats, "good_iou": good_iou, "n_good": int(good.sum()), "target_iou": target_iou,
            "best_mean_iou": best_mean}
    if best is None:
        return None, {**info, "f1": None, "precision": None, "recall": None, "mean_iou": None, "kept": 0}
    thresholds, f1, precision, recall, mean_iou, n_kept = best
    return thresholds, {**info, "f1": f1, "precision": precision, "recall": recall, "mean_iou": mean_iou,
                        "kept": n_kept}


def checkpoint_hash(path: str | Path) -> str:
    """sha256 of a weights file (the provenance of every pseudo-label made with it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_pseudo_labels(path: Path, records: list[ImageRecord], kept: Mapping[str, list[Proposal]], *,
                        round_index: int, stage: str, model_hash: str, thresholds: Thresholds | None, root: Path) -> Path:
    """COCO instances JSON (RLE masks) of the kept masks, with provenance per mask; written atomically.

    ``file_name`` is the image path relative to the dataset ``root`` (the annotation file is not beside the
    images: the labelled data is never modified).
    """
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        height, width = (kept[record.rel_path][0].rle["size"] if kept.get(record.rel_path) else (None, None))
        if height is None:
            from samtune.data.io import load_image

            height, width = load_image(record.image_path).shape[:2]
        images.append({"id": image_id, "file_name": record.rel_path, "height": int(height), "width": int(width)})
        for p in kept.get(record.rel_path) or []:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY["id"], "iscrowd": 0,
                "segmentation": p.rle, "area": p.area, "bbox": p.bbox, "score": p.predicted_iou,
                "provenance": {"round": round_index, "stage": stage, "source_image": record.rel_path,
                               "model_checkpoint_sha256": model_hash, "predicted_iou": p.predicted_iou,
                               "stability_score": p.stability_score,
                               "thresholds": thresholds.as_dict() if thresholds is not None else None},
            })
    data = {"info": {"description": f"samtune data engine, round {round_index} ({stage})", "root": str(root)},
            "images": images, "annotations": annotations, "categories": [CATEGORY]}
    return atomic_write_json(path, data)


def pseudo_records(path: Path, records: list[ImageRecord], *, weight: float, kind: str) -> list[ImageRecord]:
    """Training records of the unlabelled images with the masks of a pseudo-label file (images without a mask
    are left out)."""
    from samtune.utils.io import read_json

    data = read_json(path)
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    by_path = {r.rel_path: r for r in records}
    out = []
    for info in data["images"]:
        anns = by_image.get(info["id"])
        record = by_path.get(info["file_name"])
        if not anns or record is None:
            continue
        out.append(ImageRecord(image_path=record.image_path, rel_path=record.rel_path, split=record.split,
                               coco_anns=tuple(anns), coco_size=(info["height"], info["width"]), weight=weight,
                               kind=kind))
    return out
