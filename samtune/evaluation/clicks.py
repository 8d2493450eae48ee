"""Iterative-click evaluation: the standard interactive-segmentation protocol (NoC@85 / NoC@90).

Click 1 is SAM's single centre point (``point1``: the interior point farthest from the boundary, the
best of the multimask outputs). Every next click is put at the centre of the largest error region of
the current prediction (:func:`samtune.prompts.largest_error_click`: positive in a missed region,
negative in a false-positive one) and decoded together with all earlier clicks and the previous
low-resolution logits as mask prompt, with the single-mask output. Everything is deterministic, so the
only stored prompt is the first click; all instances of an image are decoded in one call per round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from samtune.metrics import instance_iou_dice
from samtune.predict.segmenter import ClickPredictor
from samtune.prompts import largest_error_click


@dataclass
class ClickOutcome:
    """Result of K click rounds on N instances.

    Attributes:
        ious: N x K IoU after click 1..K.
        dices: N x K Dice after click 1..K.
        pred_ious: N x K predicted IoU after click 1..K.
        coords: N x K x 2 XY clicks (original pixels).
        labels: N x K click labels (1 positive, 0 negative).
        masks: N x H x W bool final masks.
    """

    ious: torch.Tensor
    dices: torch.Tensor
    pred_ious: torch.Tensor
    coords: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor


def run_clicks(predict: ClickPredictor, gt: torch.Tensor, first: torch.Tensor, max_clicks: int) -> ClickOutcome:
    """Simulate ``max_clicks`` rounds of corrective clicks.

    Args:
        predict: The model's decoding step (:meth:`samtune.predict.segmenter.Segmenter.click_predictor`).
        gt: N x H x W bool ground-truth masks.
        first: N x 2 XY first clicks (positive).
        max_clicks: Rounds K (>= 1).
    """
    if max_clicks < 1:
        raise ValueError(f"eval.max_clicks must be >= 1, got {max_clicks}")
    n = gt.shape[0]
    coords = first.reshape(n, 1, 2).float().cpu()
    labels = torch.ones(n, 1, dtype=torch.long)
    ious, dices, pred_ious = [], [], []
    mask_input = None
    masks = torch.zeros_like(gt)
    for k in range(max_clicks):
        masks, low_res, pred_iou = predict(coords, labels, mask_input, k == 0)
        iou, dice = instance_iou_dice(masks, gt)
        ious.append(iou)
        dices.append(dice)
        pred_ious.append(pred_iou.float().cpu())
        if k + 1 < max_clicks:
            click, label = largest_error_click(masks.cpu(), gt.cpu())
            coords = torch.cat([coords, click.float()], dim=1)
            labels = torch.cat([labels, label.long()], dim=1)
            mask_input = low_res
    return ClickOutcome(
        ious=torch.stack(ious, 1), dices=torch.stack(dices, 1), pred_ious=torch.stack(pred_ious, 1),
        coords=coords, labels=labels, masks=masks.cpu(),
    )
