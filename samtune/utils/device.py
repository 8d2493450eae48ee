"""The device evaluation and prediction run on."""

from __future__ import annotations

import torch
from omegaconf import DictConfig


def eval_device(eval_cfg: DictConfig) -> torch.device:
    """``eval.device``: ``auto`` (the GPU when there is one), or a torch device string."""
    dev = str(eval_cfg.get("device") or "auto")
    if dev == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(dev)
