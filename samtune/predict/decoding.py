"""Decode prompts against one image embedding, exactly as ``SamPredictor`` would.

The whole-image path of :class:`samtune.predict.segmenter.Segmenter` (the prompt-focused zoom path is
:mod:`samtune.predict.zoom`): prompts in original-image pixels are mapped into the model's input frame, decoded in
batched chunks, and the chosen output is post-processed back to the original size and thresholded at SAM's
``mask_threshold``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from segment_anything.utils.amg import calculate_stability_score

from samtune.model.promptable_sam import PromptableSam
from samtune.predict.modes import prompt_mode


class PromptPrediction(NamedTuple):
    """One chunk of decoded prompts.

    Attributes:
        index: Slice of the prompt list this chunk covers.
        masks: n x H x W bool at the original image size (CPU).
        pred_iou: n predicted IoU of the chosen outputs (CPU).
        stability: n stability scores (IoU of the mask thresholded at +-offset around ``mask_threshold``).
        low_res: n x 1 x h x w low-resolution logits of the chosen outputs (model device), the mask prompt
            of a next round.
    """

    index: slice
    masks: torch.Tensor
    pred_iou: torch.Tensor
    stability: torch.Tensor
    low_res: torch.Tensor | None


def prompt_tensors(prompts: list[dict], mode: str) -> dict[str, torch.Tensor]:
    """``{"boxes": N x 4}`` for ``mode == "box"``, else ``{"coords": N x K x 2, "labels": N x K}`` from
    ``prompt[mode] = {"points": [[x, y], ...], "labels": [...]}`` (all prompts with the same K)."""
    if mode == "box":
        return {"boxes": torch.tensor([p["box"] for p in prompts], dtype=torch.float)}
    coords = torch.tensor([p[mode]["points"] for p in prompts], dtype=torch.float)
    labels = torch.tensor([p[mode]["labels"] for p in prompts], dtype=torch.int)
    return {"coords": coords, "labels": labels}


def finish_logits(
    model: PromptableSam,
    logits: torch.Tensor,
    iou: torch.Tensor,
    *,
    multimask: bool,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    stability_offset: float = 1.0,
    output: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose one output per prompt and bring it to the original size.

    Args:
        model: The model (for ``mask_threshold`` and post-processing).
        logits: N x 4 x h x w decoder logits.
        iou: N x 4 predicted IoU.
        multimask: Pick the best of the multimask outputs (one ambiguous point) instead of output 0.
        input_size: (h, w) of the resized image before padding.
        original_size: (H, W) of the image.
        stability_offset: Logit offset of the stability score (``SamAutomaticMaskGenerator``'s default 1.0).
        output: Take this decoder output (0: single mask, 1-3: multimask) for every prompt instead of choosing.

    Returns:
        (masks N x H x W bool CPU, predicted IoU N CPU, stability N CPU, chosen low-res logits N x 1 x h x w).
    """
    if output is None:
        chosen, pred_iou = PromptableSam.select_output(logits, iou, multimask)
    else:
        chosen, pred_iou = logits[:, output : output + 1], iou[:, output]
    full = model.postprocess(chosen.float(), input_size, original_size)[:, 0]
    threshold = model.sam.mask_threshold
    stability = calculate_stability_score(full, threshold, stability_offset)
    return (full > threshold).cpu(), pred_iou.float().cpu(), stability.float().cpu(), chosen


@torch.no_grad()
def decode_prompts(
    model: PromptableSam,
    embedding: torch.Tensor,
    prompts: list[dict],
    mode: str,
    *,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    multimask: bool | None = None,
    stability_offset: float = 1.0,
    chunk: int = 32,
    output: int | None = None,
) -> Iterator[PromptPrediction]:
    """Decode ``prompts`` (original-image pixels) against ``embedding`` chunk by chunk.

    Args:
        model: The model.
        embedding: 1 x C x h x w embedding of the image.
        prompts: Dicts with ``"box"`` (mode ``box``) or ``mode: {"points", "labels"}``.
        mode: Which prompt field to read.
        input_size: (h, w) of the resized image before padding.
        original_size: (H, W) of the image.
        multimask: Output choice (default: the mode's, :class:`samtune.predict.modes.PromptMode`; as SAM
            recommends, a box or several points use the single-mask output, one point the best multimask output).
        stability_offset: See :func:`finish_logits`.
        chunk: Prompts per decoder call.
        output: Take this decoder output for every prompt (see :func:`finish_logits`).
    """
    if multimask is None:
        n_points = 0 if mode == "box" or not prompts else len(prompts[0][mode]["points"])
        multimask = prompt_mode(mode).multimask_for(n_points)
    tensors = prompt_tensors(prompts, mode) if prompts else {}
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
        masks, pred_iou, stability, low_res = finish_logits(
            model, logits, iou, multimask=multimask, input_size=input_size, original_size=original_size,
            stability_offset=stability_offset, output=output,
        )
        yield PromptPrediction(sl, masks, pred_iou, stability, low_res)
