"""Prompt-focused zoom: segment each prompt inside a crop of its neighbourhood.

A 1024-px SAM sees a 10-px solder defect of a 4,000-px board as a few pixels; cropping a square of
``context`` times the prompt's extent around it, resizing the crop to the model input, segmenting and
pasting the mask back gives the model the object at a useful scale. Zero-shot and fine-tuned models are
always evaluated the same way, and the report says which.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from samtune.model.promptable_sam import PromptableSam


@dataclass(frozen=True)
class ZoomConfig:
    """Zoom settings (config ``eval.zoom``).

    Attributes:
        context: Crop side as a multiple of the prompt's extent (box side, or the points' spread).
        min_frac: Smallest crop side as a fraction of the image's longest side (used for point
            prompts, whose object size is unknown, and for tiny boxes).
        min_px: Smallest crop side in pixels.
    """

    context: float = 2.0
    min_frac: float = 0.2
    min_px: int = 16

    def __post_init__(self) -> None:
        if self.context < 1:
            raise ValueError(f"eval.zoom.context must be >= 1, got {self.context}")
        if not 0 <= self.min_frac <= 1:
            raise ValueError(f"eval.zoom.min_frac must be in [0, 1], got {self.min_frac}")

    def describe(self) -> str:
        return (f"prompt-focused zoom: crop of {self.context:g}x the prompt's extent (at least "
                f"{self.min_frac:g} of the longest image side) around each prompt, resized to the model input")


def zoom_window(
    prompt_xyxy: tuple[float, float, float, float], image_size: tuple[int, int], cfg: ZoomConfig, *, is_box: bool
) -> tuple[int, int, int, int]:
    """Square crop window ``(x0, y0, x1, y1)`` (x1, y1 exclusive) around a prompt, inside the image.

    Args:
        prompt_xyxy: The box, or the bounding box of the prompt's points, in image pixels.
        image_size: (H, W).
        cfg: Zoom settings.
        is_box: Whether the extent is a box (points get at least ``min_frac`` of the image).
    """
    h, w = image_size
    x1, y1, x2, y2 = prompt_xyxy
    extent = max(x2 - x1 + 1, y2 - y1 + 1)
    side = cfg.context * extent
    floor = cfg.min_frac * max(h, w) if not is_box else 0.0
    side = int(round(max(side, floor, cfg.min_px)))
    cx, cy = (x1 + x2 + 1) / 2, (y1 + y2 + 1) / 2

    def span(center: float, limit: int) -> tuple[int, int]:
        if side >= limit:
            return 0, limit
        start = int(round(center - side / 2))
        start = min(max(start, 0), limit - side)  # shift inside rather than shrink
        return start, start + side

    xa, xb = span(cx, w)
    ya, yb = span(cy, h)
    return xa, ya, xb, yb


def _extent(prompt: dict, mode: str) -> tuple[float, float, float, float]:
    if mode == "box":
        return tuple(float(v) for v in prompt["box"])
    pts = np.asarray(prompt[mode]["points"], dtype=float)
    labels = np.asarray(prompt[mode]["labels"])
    pos = pts[labels == 1] if (labels == 1).any() else pts
    return float(pos[:, 0].min()), float(pos[:, 1].min()), float(pos[:, 0].max()), float(pos[:, 1].max())


@torch.no_grad()
def predict_prompts_zoomed(
    model: PromptableSam,
    image: np.ndarray,
    prompts: list[dict],
    mode: str,
    *,
    multimask: bool,
    cfg: ZoomConfig,
    chunk: int = 16,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Like ``predict_prompts`` but each prompt is segmented in its own zoomed crop.

    Args:
        model: The model.
        image: H x W x 3 uint8 RGB, the whole image.
        prompts: Per-instance prompt dicts (original image pixels).
        mode: ``box``, ``point1`` or ``point3``.
        multimask: Whether to pick the best multimask output (ambiguous prompts).
        cfg: Zoom settings.
        chunk: Crops embedded per encoder call.

    Yields:
        (slice of ``prompts``, masks n x H x W bool at the image size, predicted IoU n).
    """
    h, w = image.shape[:2]
    dev = model.device
    for start in range(0, len(prompts), chunk):
        sl = slice(start, start + chunk)
        items = prompts[sl]
        windows = [zoom_window(_extent(p, mode), (h, w), cfg, is_box=mode == "box") for p in items]
        prepared = [model.prepare_image(np.ascontiguousarray(image[y0:y1, x0:x1])) for x0, y0, x1, y1 in windows]
        embeddings = model.embed(torch.cat([x for x, _, _ in prepared]))
        masks = torch.zeros(len(items), h, w, dtype=torch.bool)
        scores = torch.zeros(len(items))
        for i, (p, (x0, y0, x1, y1), (_, in_size, crop_size)) in enumerate(zip(items, windows, prepared)):
            offset = torch.tensor([x0, y0], dtype=torch.float)
            kwargs = {}
            if mode == "box":
                box = torch.tensor([p["box"]], dtype=torch.float) - offset.repeat(2)
                kwargs["boxes"] = model.boxes_to_input(box, crop_size).to(dev)
            else:
                coords = torch.tensor([p[mode]["points"]], dtype=torch.float) - offset
                labels = torch.tensor([p[mode]["labels"]], dtype=torch.int)
                kwargs["points"] = (model.coords_to_input(coords, crop_size).to(dev), labels.to(dev))
            logits, iou = model.decode(embeddings[i : i + 1], **kwargs)
            chosen, pred_iou = PromptableSam.select_output(logits, iou, multimask)
            crop_mask = model.postprocess(chosen.float(), in_size, crop_size)[0, 0] > model.sam.mask_threshold
            masks[i, y0:y1, x0:x1] = crop_mask.cpu()
            scores[i] = float(pred_iou[0])
        yield sl, masks, scores
