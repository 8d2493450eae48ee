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
        self._accumulate(*instance_iou_dice(pred, gt))

    def update_values(self, iou: torch.Tensor, dice: torch.Tensor) -> None:
        """Add already computed per-instance IoU and Dice values (N each)."""
        self._accumulate(iou, dice)
        # what torchmetrics' wrapper of ``update`` does: count the update (no "compute before update" warning)
        # and drop a cached result
        self._update_count += 1
        self._computed = None

    def _accumulate(self, iou: torch.Tensor, dice: torch.Tensor) -> None:
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


def calibration(pred_iou: np.ndarray, true_iou: np.ndarray, bins: int = 10) -> dict[str, float | int | None]:
    """How well the IoU head predicts the true IoU: ``{"spearman", "ece", "n"}`` (None where undefined)."""
    pred_iou, true_iou = np.asarray(pred_iou, float), np.asarray(true_iou, float)
    rho, ece = spearman(pred_iou, true_iou), expected_calibration_error(pred_iou, true_iou, bins)
    return {
        "spearman": None if np.isnan(rho) else rho,
        "ece": None if np.isnan(ece) else ece,
        "n": int(pred_iou.size),
    }


def clicks_to_reach(ious: torch.Tensor, threshold: float, cap: int) -> torch.Tensor:
    """Number of clicks (NoC) each instance needs to reach ``threshold`` IoU.

    Args:
        ious: N x K IoU after click 1..K.
        threshold: IoU to reach, e.g. 0.85 or 0.9.
        cap: NoC of an instance that never reaches it (also the largest possible value).

    Returns:
        N long: the first k (1-based) with ``ious[:, k-1] >= threshold``, else ``cap``.
    """
    reached = ious >= threshold
    first = reached.float().argmax(dim=1) + 1
    return torch.where(reached.any(dim=1), first.clamp(max=cap), torch.full_like(first, cap)).long()


class ClickMetrics(Metric):
    """Interactive segmentation with iterative clicks: mIoU after k clicks, NoC@85, NoC@90.

    ``update(ious, dices)`` takes N x K per-instance IoU and Dice after clicks 1..K. An instance that
    never reaches a threshold within the K clicks counts as K clicks (``noc_cap``) and as a failure
    (``nof85`` / ``nof90``).

    Args:
        max_clicks: K, the number of clicks per instance.
    """

    full_state_update = False
    higher_is_better = True
    THRESHOLDS = {"85": 0.85, "90": 0.90}

    def __init__(self, max_clicks: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if max_clicks < 1:
            raise ValueError(f"max_clicks must be >= 1, got {max_clicks}")
        self.max_clicks = max_clicks
        zeros = torch.zeros(max_clicks, dtype=torch.float64)
        self.add_state("iou_sum", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("dice_sum", default=zeros.clone(), dist_reduce_fx="sum")
        for t in self.THRESHOLDS:
            self.add_state(f"noc{t}_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"nof{t}", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ious: torch.Tensor, dices: torch.Tensor) -> None:  # type: ignore[override]
        if ious.ndim != 2 or ious.shape[1] != self.max_clicks or dices.shape != ious.shape:
            raise ValueError(f"expected N x {self.max_clicks} IoU and Dice, got {tuple(ious.shape)}, {tuple(dices.shape)}")
        ious, dices = ious.double().cpu(), dices.double().cpu()
        self.iou_sum += ious.sum(0).to(self.iou_sum.device)
        self.dice_sum += dices.sum(0).to(self.dice_sum.device)
        for t, thr in self.THRESHOLDS.items():
            noc = clicks_to_reach(ious, thr, self.max_clicks)
            getattr(self, f"noc{t}_sum").add_(noc.double().sum().to(self.count.device))
            getattr(self, f"nof{t}").add_(int((ious < thr).all(dim=1).sum()))
        self.count += ious.shape[0]

    def compute(self) -> dict:  # type: ignore[override]
        n = int(self.count)
        if n == 0:
            nan = float("nan")
            return {"miou_at": [nan] * self.max_clicks, "dice_at": [nan] * self.max_clicks, "noc85": nan,
                    "noc90": nan, "nof85": 0, "nof90": 0, "n": 0}
        out = {"miou_at": (self.iou_sum / n).tolist(), "dice_at": (self.dice_sum / n).tolist(), "n": n}
        for t in self.THRESHOLDS:
            out[f"noc{t}"] = float(getattr(self, f"noc{t}_sum")) / n
            out[f"nof{t}"] = int(getattr(self, f"nof{t}"))
        return out


def mask_iou_matrix(pred_rles: list[dict], gt_rles: list[dict]) -> np.ndarray:
    """P x G IoU between predicted and ground-truth masks given as COCO RLEs (pycocotools)."""
    from pycocotools import mask as mask_utils

    if not pred_rles or not gt_rles:
        return np.zeros((len(pred_rles), len(gt_rles)))
    return np.asarray(mask_utils.iou(pred_rles, gt_rles, [0] * len(gt_rles)), dtype=np.float64).reshape(
        len(pred_rles), len(gt_rles)
    )


def match_one_to_one(iou: np.ndarray, threshold: float = 0.5) -> list[tuple[int, int]]:
    """Pairs (pred, gt) of a one-to-one matching with IoU >= ``threshold``, as many as possible.

    The assignment (scipy's Hungarian solver) maximises the number of matched pairs, then their IoU.

    Args:
        iou: P x G IoU matrix.
        threshold: Minimum IoU of a match.
    """
    from scipy.optimize import linear_sum_assignment

    if iou.size == 0:
        return []
    gain = (iou >= threshold).astype(np.float64) + 1e-3 * iou
    rows, cols = linear_sum_assignment(gain, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if iou[r, c] >= threshold]
