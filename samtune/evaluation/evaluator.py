"""Evaluate a model on fixed prompts, exactly as ``SamPredictor`` would run it.

Each image is resized, normalised and padded as ``SamPredictor.set_image`` does and embedded once; all
prompts of one mode are decoded in one batched call (chunked for memory); masks are post-processed back to
the original image size and thresholded at SAM's ``mask_threshold``.

Modes: ``box``, ``point1``, ``point3`` (the fixed prompts of ``prompts.json``), ``point1_oracle`` (the
one-point prompts, each scored by the best of its three multimask outputs against the ground truth, as the SAM
paper's "oracle": what the masks could give if the IoU head chose perfectly), ``clicks`` (iterative
corrective clicks, :mod:`samtune.evaluation.clicks`) and ``auto`` (automatic mask generation matched to the
ground truth, :mod:`samtune.predict.auto`). Every mode also records the IoU head's calibration: predicted
against true IoU of each mask.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from samtune.data import volumes
from samtune.data.records import ImageRecord, load_record
from samtune.evaluation.clicks import run_clicks
from samtune.evaluation.matching import match_to_ground_truth
from samtune.metrics import ClickMetrics, InstanceMaskMetrics, calibration, instance_iou_dice
from samtune.model.promptable_sam import PromptableSam
from samtune.predict.auto import (
    build_mask_generator,
    encode_masks,
    explain_no_masks,
    filter_stats,
    generate_masks,
)
from samtune.predict.modes import EVAL_MODES, FIXED_MODES, REGISTRY, PromptMode
from samtune.predict.segmenter import Embedded, Segmenter
from samtune.predict.zoom import ZoomConfig
from samtune.utils.progress import progress

log = logging.getLogger(__name__)

PROMPT_MODES = FIXED_MODES
ORACLE_MODE = "point1_oracle"
MODES = EVAL_MODES
MULTIMASK_OUTPUTS = (1, 2, 3)


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE (compressed, counts as str) of an H x W boolean mask."""
    return encode_masks([mask])[0]


def map_path(map_dir: Path, rel_path: str) -> Path:
    """Where the predicted instance map of image ``rel_path`` is stored (uint16 PNG)."""
    return volumes.map_path(map_dir, rel_path)


@dataclass
class EvalResult:
    """Outcome of evaluating one model.

    Attributes:
        summary: mode -> {"miou", "dice", "n", ...}; ``clicks`` adds ``miou_at`` (clicks k -> mIoU), ``noc85``,
            ``noc90``, ``nof85``, ``nof90``, ``max_clicks``; ``auto`` adds ``precision50``, ``recall50``,
            ``f1_50``, ``n_pred``.
        rows: one dict per (mode, instance), as written to ``instances.jsonl``.
        calibration: mode -> {"spearman", "ece", "n"} between predicted and true IoU.
    """

    summary: dict[str, dict]
    rows: list[dict] = field(default_factory=list)
    calibration: dict[str, dict] = field(default_factory=dict)


@dataclass
class _Tally:
    """Per-mode accumulators."""

    metric: InstanceMaskMetrics | ClickMetrics
    pred_iou: list[float] = field(default_factory=list)
    true_iou: list[float] = field(default_factory=list)
    tp: int = 0
    n_pred: int = 0
    outputs: list[list[float]] = field(default_factory=list)  # point1_oracle: IoU of each multimask output


def _check_modes(modes: list[str], zoom: ZoomConfig | None, max_clicks: int) -> None:
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"eval.modes: unknown prompt modes {unknown}; valid: {list(MODES)}")
    for m in modes:
        if zoom is not None and not REGISTRY[m].zoom:
            raise ValueError(f"eval.modes={m} does not support eval.zoom: "
                             f"evaluate {m} with eval.zoom=null, or drop {m} from eval.modes")
    if "clicks" in modes and max_clicks < 1:
        raise ValueError(f"eval.max_clicks must be >= 1, got {max_clicks}")


def _row(name: str, mode: str, rel_path: str, instance: int, prompt: dict | None, iou: float, dice: float,
         pred_iou: float | None) -> dict:
    return {
        "model": name, "mode": mode, "image": rel_path, "instance": int(instance), "prompt": prompt,
        "iou": round(float(iou), 6), "dice": round(float(dice), 6),
        "pred_iou": None if pred_iou is None else round(float(pred_iou), 6),
    }


@dataclass
class _Run:
    """What every mode's evaluation of one model shares."""

    segmenter: Segmenter
    name: str
    rows: list[dict]
    save_masks: bool
    max_clicks: int
    generator: object | None  # the automatic mask generator (``auto`` mode)


@dataclass
class _Image:
    """One image under evaluation: its pixels, ground-truth instance map and fixed prompts; its whole-image
    embedding is made once, when a mode first needs it."""

    rel_path: str
    image: np.ndarray
    instances: np.ndarray
    prompts: list[dict]
    segmenter: Segmenter
    _embedded: Embedded | None = None

    @property
    def embedded(self) -> Embedded:
        if self._embedded is None:
            self._embedded = self.segmenter.embed(self.image)
        return self._embedded

    def ground_truth(self, chunk: list[dict]) -> torch.Tensor:
        """n x H x W bool masks of the instances the prompts of ``chunk`` are for."""
        gt_all = torch.from_numpy(self.instances)
        return torch.stack([gt_all == p["instance"] for p in chunk])


@torch.no_grad()
def evaluate_model(
    model: PromptableSam,
    records: list[ImageRecord],
    prompts: dict[str, list[dict]],
    *,
    name: str,
    modes: Iterable[str] = PROMPT_MODES,
    binary_as_one_object: bool = False,
    save_masks: bool = False,
    zoom: ZoomConfig | None = None,
    max_clicks: int = 20,
    auto_params: Mapping | None = None,
    map_dir: Path | None = None,
    map_mode: str = "box",
) -> EvalResult:
    """Evaluate ``model`` on ``records`` with the fixed ``prompts`` (keyed by record ``rel_path``).

    Args:
        model: The model (put in eval mode here).
        records: Images to evaluate.
        prompts: rel_path -> list of per-instance prompt dicts (see ``samtune.prompts.eval_prompts``).
        name: Model label written in each row (``zero_shot`` / ``finetuned``).
        modes: Modes to run (:data:`MODES`, :mod:`samtune.predict.modes`).
        binary_as_one_object: Mask interpretation, as for training.
        save_masks: Put the predicted mask's COCO RLE in each row.
        zoom: Segment each prompt in a zoomed crop of its neighbourhood (None: the whole image); clicks too.
        max_clicks: Clicks per instance in ``clicks`` mode.
        auto_params: Automatic mask generation parameters for ``auto`` mode
            (:func:`samtune.predict.auto.build_mask_generator`).
        map_dir: If set, each image's predicted instance map for ``map_mode`` is written there (uint16 PNG,
            see :func:`map_path`), for overlays and worst-case pictures.
        map_mode: The prompt mode whose masks go to ``map_dir``.
    """
    modes = list(modes)
    _check_modes(modes, zoom, max_clicks)
    was_training = model.training
    model.eval()
    tallies = {m: _Tally(ClickMetrics(max_clicks) if m == "clicks" else InstanceMaskMetrics()) for m in modes}
    result = EvalResult(summary={})
    run = _Run(Segmenter(model, zoom), name, result.rows, save_masks, max_clicks,
               build_mask_generator(model, auto_params) if "auto" in modes else None)
    for record in progress(records, desc=f"eval {name}"):
        if record.rel_path not in prompts:
            raise KeyError(f"prompts file has no entry for image {record.rel_path}")
        image, instances = load_record(record, binary_as_one_object=binary_as_one_object)
        img = _Image(record.rel_path, image, instances, prompts[record.rel_path], run.segmenter)
        for name_ in modes:
            mode = REGISTRY[name_]
            if mode.kind == "auto":
                _eval_auto(run, img, tallies[name_])
            elif not img.prompts:
                continue
            elif mode.kind == "clicks":
                _eval_clicks(run, img, mode, tallies[name_])
            elif mode.kind == "oracle":
                _eval_oracle(run, img, mode, tallies[name_])
            else:
                kept = np.zeros(instances.shape, np.int32) if map_dir is not None and name_ == map_mode else None
                _eval_fixed(run, img, mode, tallies[name_], kept)
                if kept is not None:
                    path = map_path(map_dir, record.rel_path)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(path), np.clip(kept, 0, 65535).astype(np.uint16))
    for name_, tally in tallies.items():
        result.summary[name_] = _summarize(REGISTRY[name_], tally, max_clicks)
        result.calibration[name_] = calibration(np.asarray(tally.pred_iou), np.asarray(tally.true_iou))
    if run.generator is not None:
        # what the predicted-IoU and stability filters did; a run that keeps nothing says why
        result.summary["auto"]["filters"] = filter_stats(run.generator)
        if tallies["auto"].n_pred == 0 and records:
            why = explain_no_masks(run.generator, "eval.auto")
            result.summary["auto"]["why_no_masks"] = why
            log.warning("%s (%s)", why, name)
    model.train(was_training)
    return result


def _points(prompt: dict, mode: PromptMode) -> int:
    return 0 if mode.is_box else len(prompt[mode.key]["points"])


def _segment(run: _Run, img: _Image, mode: PromptMode, *, output: int | None = None):
    """The chunks of ``img``'s prompts of ``mode`` segmented by the run's segmenter (whole image or zoom)."""
    multimask = mode.multimask_for(_points(img.prompts[0], mode))
    embedded = None if run.segmenter.zoom is not None else img.embedded
    return run.segmenter.segment(img.image, img.prompts, mode.key, multimask=multimask, output=output,
                                 embedded=embedded)


def _eval_fixed(run: _Run, img: _Image, mode: PromptMode, tally: _Tally, kept: np.ndarray | None) -> None:
    """One fixed prompt per instance, decoded once; ``kept`` (if given) collects the instance map."""
    for pred in _segment(run, img, mode):
        chunk = img.prompts[pred.index]
        iou, dice = instance_iou_dice(pred.masks, img.ground_truth(chunk))
        tally.metric.update_values(iou, dice)
        tally.pred_iou += pred.pred_iou.tolist()
        tally.true_iou += iou.tolist()
        for j, p in enumerate(chunk):
            prompt = {"box": p["box"]} if mode.is_box else dict(p[mode.key])
            row = _row(run.name, mode.name, img.rel_path, p["instance"], prompt, iou[j], dice[j], pred.pred_iou[j])
            if run.save_masks:
                row["mask_rle"] = encode_rle(pred.masks[j].numpy())
            run.rows.append(row)
            if kept is not None:
                kept[pred.masks[j].numpy() & (kept == 0)] = int(p["instance"])


def _eval_oracle(run: _Run, img: _Image, mode: PromptMode, tally: _Tally) -> None:
    """One-point prompts decoded once per multimask output (1-3, each all the way, zoom re-crops included);
    each instance scored by its best output."""
    runs = [_segment(run, img, mode, output=k) for k in MULTIMASK_OUTPUTS]
    for preds in zip(*runs, strict=True):
        chunk = img.prompts[preds[0].index]
        gt = img.ground_truth(chunk)
        scored = [instance_iou_dice(pred.masks, gt) for pred in preds]
        ious = torch.stack([iou for iou, _ in scored], dim=1)  # n x 3
        best = ious.argmax(dim=1)
        rows_n = torch.arange(len(chunk))
        iou = ious[rows_n, best]
        dice = torch.stack([d for _, d in scored], dim=1)[rows_n, best]
        pred_iou = torch.stack([pred.pred_iou for pred in preds], dim=1)[rows_n, best]
        tally.metric.update_values(iou, dice)
        tally.pred_iou += pred_iou.tolist()
        tally.true_iou += iou.tolist()
        tally.outputs += ious.tolist()
        for j, p in enumerate(chunk):
            row = _row(run.name, mode.name, img.rel_path, p["instance"], dict(p[mode.key]), iou[j], dice[j],
                       pred_iou[j])
            row["output"] = MULTIMASK_OUTPUTS[int(best[j])]
            row["output_ious"] = [round(float(v), 6) for v in ious[j]]
            if run.save_masks:
                row["mask_rle"] = encode_rle(preds[int(best[j])].masks[j].numpy())
            run.rows.append(row)


def _eval_clicks(run: _Run, img: _Image, mode: PromptMode, tally: _Tally) -> None:
    """Corrective clicks from each instance's one-point prompt (:func:`samtune.evaluation.clicks.run_clicks`)."""
    zoomed = run.segmenter.zoom is not None
    predict = run.segmenter.click_predictor(img.image, None if zoomed else img.embedded)
    chunk_size = run.segmenter.chunk
    for start in range(0, len(img.prompts), chunk_size):
        chunk = img.prompts[start : start + chunk_size]
        first = torch.tensor([p[mode.key]["points"][0] for p in chunk], dtype=torch.float)
        out = run_clicks(predict, img.ground_truth(chunk), first, run.max_clicks)
        tally.metric.update(out.ious, out.dices)
        tally.pred_iou += out.pred_ious.flatten().tolist()
        tally.true_iou += out.ious.flatten().tolist()
        for j, p in enumerate(chunk):
            prompt = {"points": out.coords[j].long().tolist(), "labels": out.labels[j].tolist()}
            row = _row(run.name, mode.name, img.rel_path, p["instance"], prompt, out.ious[j, -1], out.dices[j, -1],
                       out.pred_ious[j, -1])
            row["ious"] = [round(float(v), 6) for v in out.ious[j]]
            row["pred_ious"] = [round(float(v), 6) for v in out.pred_ious[j]]
            if run.save_masks:
                row["mask_rle"] = encode_rle(out.masks[j].numpy())
            run.rows.append(row)


def _eval_auto(run: _Run, img: _Image, tally: _Tally) -> None:
    """Automatic masks matched to every ground-truth instance (:mod:`samtune.evaluation.matching`)."""
    generated = generate_masks(run.generator, img.image)
    pred_rles = [m["segmentation"] for m in generated]  # COCO RLE (build_mask_generator)
    ids = [int(i) for i in np.unique(img.instances) if i > 0]
    gt_rles = encode_masks(img.instances == i for i in ids)  # one full-size mask at a time
    match = match_to_ground_truth(pred_rles, gt_rles)
    tally.tp += match.true_positives
    tally.n_pred += len(generated)
    tally.pred_iou += [float(m["predicted_iou"]) for m in generated]
    tally.true_iou += match.pred_best_iou.tolist()
    best = torch.from_numpy(match.best_iou).float()
    dice = 2 * best / (1 + best)  # of the same pair: Dice = 2 IoU / (1 + IoU)
    tally.metric.update_values(best, dice)
    for j, instance in enumerate(ids):
        k = int(match.best_pred[j])
        pred_iou = generated[k]["predicted_iou"] if k >= 0 else None
        row = _row(run.name, "auto", img.rel_path, instance, None, best[j], dice[j], pred_iou)
        if run.save_masks and k >= 0:
            row["mask_rle"] = pred_rles[k]
        run.rows.append(row)


def _summarize(mode: PromptMode, tally: _Tally, max_clicks: int) -> dict:
    res = tally.metric.compute()
    if mode.kind == "clicks":
        return {
            "miou": res["miou_at"][-1], "dice": res["dice_at"][-1], "n": res["n"], "max_clicks": max_clicks,
            "miou_at": {str(k + 1): v for k, v in enumerate(res["miou_at"])},
            "noc85": res["noc85"], "noc90": res["noc90"], "nof85": res["nof85"], "nof90": res["nof90"],
        }
    out = {"miou": float(res["miou"]), "dice": float(res["dice"]), "n": int(res["n"])}
    if mode.kind == "oracle":
        per_output = np.asarray(tally.outputs, dtype=float).reshape(-1, len(MULTIMASK_OUTPUTS))
        out["output_miou"] = {str(k): (float(per_output[:, i].mean()) if len(per_output) else float("nan"))
                              for i, k in enumerate(MULTIMASK_OUTPUTS)}
        out["output_share"] = {str(k): (float((per_output.argmax(1) == i).mean()) if len(per_output) else float("nan"))
                               for i, k in enumerate(MULTIMASK_OUTPUTS)}
    if mode.kind == "auto":
        precision = tally.tp / tally.n_pred if tally.n_pred else float("nan")
        recall = tally.tp / out["n"] if out["n"] else float("nan")
        f1 = 2 * tally.tp / (tally.n_pred + out["n"]) if tally.n_pred + out["n"] else float("nan")
        out.update(precision50=precision, recall50=recall, f1_50=f1, n_pred=tally.n_pred, true_positives=tally.tp)
    return out
