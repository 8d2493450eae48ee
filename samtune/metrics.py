"""Metrics, built on torchmetrics so that they aggregate across DDP ranks.

mIoU is the mean over instances of each instance's mask IoU, the number SAM papers report for
prompted segmentation; Dice likewise.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric


def instance_iou_dice(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance IoU and Dice of boolean masks.

    Args:
        pred: N x H x W predicted masks.
        gt: N x H x W ground-truth masks.

    Returns:
        (IoU N, Dice N); an empty prediction of an empty truth counts as 1.
    """
    pred, gt = pred.bool().flatten(1), gt.bool().flatten(1)
    inter = (pred & gt).sum(1).double()
    union = (pred | gt).sum(1).double()
    total = pred.sum(1).double() + gt.sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    return iou.float(), dice.float()


class InstanceMaskMetrics(Metric):
    """Mean per-instance IoU and Dice (mIoU, mDice), summed across processes.

    ``update(pred, gt)`` takes N x H x W boolean masks of N instances.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("dice_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:  # type: ignore[override]
        iou, dice = instance_iou_dice(pred, gt)
        self.update_values(iou, dice)

    def update_values(self, iou: torch.Tensor, dice: torch.Tensor) -> None:
        """Add already computed per-instance IoU and Dice values (N each)."""
        self.iou_sum += iou.double().sum().to(self.iou_sum.device)
        self.dice_sum += dice.double().sum().to(self.dice_sum.device)
        self.count += int(iou.numel())

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        n = self.count.clamp(min=1).double()
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        has = self.count > 0
        return {
            "miou": torch.where(has, self.iou_sum / n, nan),
            "dice": torch.where(has, self.dice_sum / n, nan),
            "n": self.count.clone(),
        }


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (nan with fewer than 3 values or no spread)."""
    from torchmetrics.functional import spearman_corrcoef

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearman_corrcoef(torch.from_numpy(x), torch.from_numpy(y)))


def expected_calibration_error(pred: np.ndarray, true: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error between predicted and true IoU, in equal-width bins of [0, 1]."""
    pred, true = np.clip(np.asarray(pred, float), 0, 1), np.asarray(true, float)
    if pred.size == 0:
        return float("nan")
    idx = np.minimum((pred * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            err += sel.mean() * abs(pred[sel].mean() - true[sel].mean())
    return float(err)
