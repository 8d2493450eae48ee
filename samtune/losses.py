"""SAM's training loss: 20 focal + 1 dice + 1 IoU-MSE, minimum over multimask outputs.

SAM trains output 0 (single mask) on unambiguous prompts (a box, several points) and, for an
ambiguous prompt (one point), back-propagates only the multimask output (1..3) with the lowest mask
loss. The IoU head is trained on the true IoU of every output it is asked to rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Per-mask focal loss averaged over pixels.

    Args:
        logits: N x K x H x W.
        target: N x 1 x H x W or N x K x H x W, float in {0, 1}.

    Returns:
        N x K.
    """
    target = target.expand_as(logits)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-mask soft dice loss. Shapes as :func:`sigmoid_focal_loss`; returns N x K."""
    target = target.expand_as(logits)
    prob = logits.sigmoid().flatten(2)
    target = target.flatten(2)
    num = 2 * (prob * target).sum(-1)
    den = prob.sum(-1) + target.sum(-1)
    return 1 - (num + eps) / (den + eps)


def binary_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks over the last two dims (empty union counts as IoU 1)."""
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@dataclass
class LossOutput:
    """Loss of one decoder call.

    Attributes:
        loss: N per-prompt total loss.
        focal, dice, iou: N per-prompt components (unweighted) of the chosen output.
        chosen: N index of the output that was trained (0, or the best of 1..3).
        true_iou: N true IoU of the chosen output.
    """

    loss: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor
    chosen: torch.Tensor
    true_iou: torch.Tensor


# The mask terms of the two losses starting weights are trained with (configs/loss/<name>.yaml spell them out):
# SAM's (20 focal with alpha 0.25, gamma 2, + 1 dice; the official checkpoints) and BCE + dice (1:1; the sam_tiny
# generalist). Each fixes where a mask's edge falls: with alpha 0.25 a pixel is foreground only when it is about three
# times likelier foreground than not, with BCE when it is likelier at all. Fine-tuning with the other loss first moves
# every edge (configs/model/*.yaml: pretrain_loss; README, "Which loss").
LOSS_PRESETS: dict[str, dict[str, float]] = {
    "sam": {"focal_weight": 20.0, "dice_weight": 1.0, "focal_alpha": 0.25, "focal_gamma": 2.0},
    "bce_dice": {"focal_weight": 1.0, "dice_weight": 1.0, "focal_alpha": -1.0, "focal_gamma": 0.0},
}


def loss_preset_name(params) -> str | None:
    """The preset (``sam`` or ``bce_dice``) whose mask terms ``params`` (a loss config) has, or None."""
    for name, preset in LOSS_PRESETS.items():
        if all(float(params.get(k, float("nan"))) == v for k, v in preset.items()):
            return name
    return None


class SamLoss(nn.Module):
    """Weighted focal + dice + IoU-MSE with SAM's multimask rule.

    Args:
        focal_weight: Weight of the focal term (SAM: 20).
        dice_weight: Weight of the dice term (SAM: 1).
        iou_weight: Weight of the IoU-prediction MSE (SAM: 1).
        focal_alpha: Focal alpha (negative disables class balancing).
        focal_gamma: Focal gamma.
    """

    def __init__(
        self,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        iou_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        for name, value in (("focal_weight", focal_weight), ("dice_weight", dice_weight), ("iou_weight", iou_weight)):
            if value < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {value}")
        self.focal_weight, self.dice_weight, self.iou_weight = focal_weight, dice_weight, iou_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @classmethod
    def preset(cls, name: str, iou_weight: float = 1.0) -> SamLoss:
        """The loss of :data:`LOSS_PRESETS` ``name`` (config ``loss=pretrained``: ``name`` is ``model.pretrain_loss``)."""
        if name not in LOSS_PRESETS:
            raise ValueError(f"model.pretrain_loss: unknown loss {name!r}; known: {', '.join(LOSS_PRESETS)}")
        return cls(iou_weight=iou_weight, **LOSS_PRESETS[name])

    def forward(
        self, logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, *, multimask: bool
    ) -> LossOutput:
        """Loss of N prompts.

        Args:
            logits: N x 4 x H x W mask logits (all decoder outputs), at the target's resolution.
            iou_pred: N x 4 predicted IoU.
            target: N x H x W ground-truth masks (bool or {0, 1}).
            multimask: True for ambiguous prompts (train the best of outputs 1..3), else output 0.

        Returns:
            :class:`LossOutput` with per-prompt values.
        """
        sl = slice(1, 4) if multimask else slice(0, 1)
        logits, iou_pred = logits[:, sl].float(), iou_pred[:, sl].float()
        tgt = target.unsqueeze(1).float()
        focal = sigmoid_focal_loss(logits, tgt, self.focal_alpha, self.focal_gamma)
        dice = dice_loss(logits, tgt)
        with torch.no_grad():
            true_iou = binary_iou(logits > 0, tgt.expand_as(logits) > 0.5)
        iou_mse = F.mse_loss(iou_pred, true_iou, reduction="none")
        mask_loss = self.focal_weight * focal + self.dice_weight * dice
        best = mask_loss.argmin(dim=1)
        rows = torch.arange(len(best), device=best.device)
        # The IoU head learns to rank every output it is asked about, not only the best one.
        total = mask_loss[rows, best] + self.iou_weight * iou_mse.mean(dim=1)
        return LossOutput(
            loss=total,
            focal=focal[rows, best],
            dice=dice[rows, best],
            iou=iou_mse.mean(dim=1),
            chosen=best + sl.start,
            true_iou=true_iou[rows, best],
        )
