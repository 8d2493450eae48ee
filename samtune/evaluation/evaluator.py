"""Evaluate a model on fixed prompts, exactly as ``SamPredictor`` would run it.

Each image is resized, normalised and padded as ``SamPredictor.set_image`` does and embedded once;
all prompts of one mode are decoded in one batched call (chunked for memory); masks are
post-processed back to the original image size and thresholded at SAM's ``mask_threshold``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from pycocotools import mask as mask_utils

from samtune.data.records import ImageRecord, load_record
from samtune.evaluation.zoom import ZoomConfig, predict_prompts_zoomed
from samtune.metrics import InstanceMaskMetrics, instance_iou_dice
from samtune.model.promptable_sam import PromptableSam
from samtune.utils.progress import progress

log = logging.getLogger(__name__)

MODES = ("box", "point1", "point3")
MULTIMASK = {"box": False, "point1": True, "point3": False}


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE (compressed, counts as str) of an H x W boolean mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


@dataclass
class EvalResult:
    """Outcome of evaluating one model.

    Attributes:
        summary: mode -> {"miou", "dice", "n"}.
        rows: one dict per (mode, instance), as written to ``instances.jsonl``.
        masks: rel_path -> mode -> H x W int32 map of predicted masks (only for ``keep_masks`` images).
    """

    summary: dict[str, dict[str, float]]
    rows: list[dict] = field(default_factory=list)
    masks: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _prompt_tensors(prompts: list[dict], mode: str) -> dict:
    if mode == "box":
        return {"boxes": torch.tensor([p["box"] for p in prompts], dtype=torch.float)}
    coords = torch.tensor([p[mode]["points"] for p in prompts], dtype=torch.float)
    labels = torch.tensor([p[mode]["labels"] for p in prompts], dtype=torch.int)
    return {"coords": coords, "labels": labels}


@torch.no_grad()
def predict_prompts(
    model: PromptableSam,
    embedding: torch.Tensor,
    prompts: list[dict],
    mode: str,
    *,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    chunk: int = 32,
) -> Iterable[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Yield (slice of ``prompts``, masks n x H x W bool at original size, predicted IoU n) chunk by chunk."""
    tensors = _prompt_tensors(prompts, mode)
    dev = model.device
    for start in range(0, len(prompts), chunk):
        sl = slice(start, start + chunk)
        kwargs = {}
        if "boxes" in tensors:
            kwargs["boxes"] = model.boxes_to_input(tensors["boxes"][sl], original_size).to(dev)
        else:
            coords = model.coords_to_input(tensors["coords"][sl], original_size).to(dev)
            kwargs["points"] = (coords, tensors["labels"][sl].to(dev))
        logits, iou = model.decode(embedding, **kwargs)
        chosen, pred_iou = PromptableSam.select_output(logits, iou, MULTIMASK[mode])
        masks = model.postprocess(chosen.float(), input_size, original_size)[:, 0] > model.sam.mask_threshold
        yield sl, masks.cpu(), pred_iou.float().cpu()


@torch.no_grad()
def evaluate_model(
    model: PromptableSam,
    records: list[ImageRecord],
    prompts: dict[str, list[dict]],
    *,
    name: str,
    modes: Iterable[str] = MODES,
    binary_as_one_object: bool = False,
    save_masks: bool = False,
    keep_masks: Iterable[str] = (),
    zoom: ZoomConfig | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``records`` with the fixed ``prompts`` (keyed by record ``rel_path``).

    Args:
        model: The model (put in eval mode here).
        records: Images to evaluate.
        prompts: rel_path -> list of per-instance prompt dicts (see ``samtune.prompts.eval_prompts``).
        name: Model label written in each row (``zero_shot`` / ``finetuned``).
        modes: Prompt modes to run.
        binary_as_one_object: Mask interpretation, as for training.
        save_masks: Put the predicted mask's COCO RLE in each row.
        keep_masks: rel_paths whose predicted masks are returned for overlays.
        zoom: Segment each prompt in a zoomed crop of its neighbourhood (None: the whole image).
    """
    modes = list(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"eval.modes: unknown prompt modes {unknown}; valid: {list(MODES)}")
    keep = set(keep_masks)
    was_training = model.training
    model.eval()
    metrics = {m: InstanceMaskMetrics() for m in modes}
    result = EvalResult(summary={})
    for record in progress(records, desc=f"eval {name}"):
        if record.rel_path not in prompts:
            raise KeyError(f"prompts file has no entry for image {record.rel_path}")
        image, instances = load_record(record, binary_as_one_object=binary_as_one_object)
        inst_prompts = prompts[record.rel_path]
        if not inst_prompts:
            continue
        if zoom is None:
            x, input_size, original_size = model.prepare_image(image)
            embedding = model.embed(x)
        gt_all = torch.from_numpy(instances)
        for mode in modes:
            kept = np.zeros(instances.shape, np.int32) if record.rel_path in keep else None
            if zoom is None:
                chunks = predict_prompts(model, embedding, inst_prompts, mode, input_size=input_size,
                                         original_size=original_size)
            else:
                chunks = predict_prompts_zoomed(model, image, inst_prompts, mode, multimask=MULTIMASK[mode], cfg=zoom)
            for sl, masks, pred_iou in chunks:
                chunk = inst_prompts[sl]
                gt = torch.stack([gt_all == p["instance"] for p in chunk])
                iou, dice = instance_iou_dice(masks, gt)
                metrics[mode].update_values(iou, dice)
                for j, p in enumerate(chunk):
                    prompt = {"box": p["box"]} if mode == "box" else dict(p[mode])
                    row = {
                        "model": name, "mode": mode, "image": record.rel_path, "instance": int(p["instance"]),
                        "prompt": prompt, "iou": round(float(iou[j]), 6), "dice": round(float(dice[j]), 6),
                        "pred_iou": round(float(pred_iou[j]), 6),
                    }
                    if save_masks:
                        row["mask_rle"] = encode_rle(masks[j].numpy())
                    result.rows.append(row)
                    if kept is not None:
                        kept[masks[j].numpy() & (kept == 0)] = int(p["instance"])
            if kept is not None:
                result.masks.setdefault(record.rel_path, {})[mode] = kept
    for mode, metric in metrics.items():
        res = metric.compute()
        result.summary[mode] = {"miou": float(res["miou"]), "dice": float(res["dice"]), "n": int(res["n"])}
    model.train(was_training)
    return result
