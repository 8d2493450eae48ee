"""Prompt-geometry warm-up of SAM's prompt encoder and mask decoder, before pre-training from scratch.

A randomly initialised mask decoder trained on real scenes sits for hundreds of steps on a plateau
where every mask is empty: most pixels of a small object's mask are background, so "all background"
is a strong first answer, and leaving it requires the decoder to learn, at the same time, where a
prompt is (positional encodings of the prompt vs. the image) and what the object looks like (image
embedding). This warm-up teaches the first part alone, on random image embeddings (no image encoder,
a few hundred cheap steps): a box prompt's single-mask output learns to fill its box, a point's three
multimask outputs learn discs around the point (min-loss over the three, so they take different
sizes, like SAM's subpart / part / whole). Pre-training then starts from masks that already sit on
the prompted region and only has to learn to follow the image.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam

from samtune.losses import SamLoss

log = logging.getLogger(__name__)


@dataclass
class WarmupStats:
    """Mean true IoU of the trained outputs over the last logged window, per prompt kind."""

    steps: int
    box_iou: float
    point_iou: float


def _grid(mask_size: int, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell-centre coordinates (y, x) of a ``mask_size`` x ``mask_size`` low-resolution mask, in input pixels."""
    centres = (torch.arange(mask_size).float() + 0.5) * (img_size / mask_size)
    return torch.meshgrid(centres, centres, indexing="ij")


def sample_box_targets(n: int, img_size: int, mask_size: int, gen: torch.Generator, min_frac: float = 1 / 16):
    """``n`` random XYXY boxes (input pixels) and the masks that fill them (``n x mask_size x mask_size``).

    Sides are uniform in [min_frac, 1] of the input: mostly large boxes, whose masks are not dominated by
    background (with many small boxes the decoder sits on the all-background plateau this warm-up avoids).
    """
    side = img_size * (min_frac + torch.rand(n, 2, generator=gen) * (1 - min_frac))
    x0y0 = torch.rand(n, 2, generator=gen) * (img_size - side)
    boxes = torch.cat([x0y0, x0y0 + side], dim=1)
    ys, xs = _grid(mask_size, img_size)
    masks = (
        (xs[None] >= boxes[:, 0, None, None]) & (xs[None] <= boxes[:, 2, None, None])
        & (ys[None] >= boxes[:, 1, None, None]) & (ys[None] <= boxes[:, 3, None, None])
    )
    return boxes, masks.float()


def sample_point_targets(n: int, img_size: int, mask_size: int, gen: torch.Generator, min_frac: float = 1 / 16):
    """``n`` random points (input pixels) and discs around them, radius uniform in [min_frac, 1/2] of the input."""
    points = torch.rand(n, 2, generator=gen) * img_size
    radius = img_size * (min_frac + torch.rand(n, generator=gen) * (0.5 - min_frac))
    ys, xs = _grid(mask_size, img_size)
    d2 = (xs[None] - points[:, 0, None, None]) ** 2 + (ys[None] - points[:, 1, None, None]) ** 2
    return points, (d2 <= radius[:, None, None] ** 2).float()


def geometry_warmup(
    sam: Sam,
    *,
    steps: int = 600,
    prompts_per_step: int = 16,
    lr: float = 1e-3,
    embedding_scale: float = 0.5,
    seed: int = 0,
    log_every: int = 50,
) -> WarmupStats:
    """Train ``sam``'s prompt encoder and mask decoder in place on prompt geometry (see module doc).

    The first half of the steps uses box prompts only (output 0 fills the box), the second half
    alternates boxes and single points (best of outputs 1..3 against a disc around the point).
    Loss: BCE + dice + IoU-head MSE (``loss=bce_dice``). The image encoder is neither run nor changed.

    Args:
        sam: Model to warm up (modified in place).
        steps: Optimiser steps.
        prompts_per_step: Prompts per step, all against one random embedding.
        lr: AdamW learning rate.
        embedding_scale: Standard deviation of the random image embedding.
        seed: Seed of the prompts and embeddings (the model's own RNG use is unaffected).
        log_every: Steps between log lines.

    Returns:
        :class:`WarmupStats` of the last ``log_every`` steps.
    """
    if steps < 0 or prompts_per_step < 1 or lr <= 0:
        raise ValueError(f"geometry warm-up needs steps >= 0, prompts_per_step >= 1, lr > 0; got {steps}, "
                         f"{prompts_per_step}, {lr}")
    pe, decoder = sam.prompt_encoder, sam.mask_decoder
    img_size = pe.input_image_size[0]
    grid = pe.image_embedding_size[0]
    mask_size = 4 * grid
    dim = decoder.transformer_dim
    params = [p for p in list(pe.parameters()) + list(decoder.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = SamLoss(focal_weight=1.0, dice_weight=1.0, iou_weight=1.0, focal_alpha=-1.0, focal_gamma=0.0)
    gen = torch.Generator().manual_seed(seed)
    device = next(decoder.parameters()).device
    window = {"box": [], "point": []}
    pe.train(), decoder.train()
    for step in range(steps):
        emb = (torch.randn(1, dim, grid, grid, generator=gen) * embedding_scale).to(device)
        # boxes alone first (filling a box is the harder geometry: two corners), then boxes and points alternate
        if step < steps // 2 or step % 2 == 0:
            kind = "box"
            boxes, target = sample_box_targets(prompts_per_step, img_size, mask_size, gen)
            sparse, dense = pe(points=None, boxes=boxes.to(device), masks=None)
        else:
            kind = "point"
            points, target = sample_point_targets(prompts_per_step, img_size, mask_size, gen)
            labels = torch.ones(prompts_per_step, 1, dtype=torch.long, device=device)
            sparse, dense = pe(points=(points[:, None].to(device), labels), boxes=None, masks=None)
        logits, iou_pred = decoder.predict_masks(
            image_embeddings=emb, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        out = loss_fn(logits, iou_pred, target.to(device), multimask=kind == "point")
        loss = out.loss.mean()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"geometry warm-up: loss became {loss.item()} at step {step}; lower its lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window[kind].append(out.true_iou.mean().item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            stats = _stats(step + 1, window, log_every)
            log.info("geometry warm-up step %d/%d: box IoU %.3f, point IoU %.3f", step + 1, steps,
                     stats.box_iou, stats.point_iou)
    return _stats(steps, window, log_every)


def _stats(steps: int, window: dict[str, list[float]], last: int) -> WarmupStats:
    def mean(values: list[float]) -> float:
        tail = values[-max(1, last // 2):]
        return float(sum(tail) / len(tail)) if tail else float("nan")

    return WarmupStats(steps=steps, box_iou=mean(window["box"]), point_iou=mean(window["point"]))


__all__ = ["WarmupStats", "geometry_warmup", "sample_box_targets", "sample_point_targets"]
