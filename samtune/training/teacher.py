"""The data engine's mean teacher (``engine.semi``): an exponential moving average of the student's prompt encoder
and mask decoder that supervises it on unlabelled images.

The teacher shares the student's frozen image encoder (so only ``finetune=decoder_only`` can have one) and its
embeddings: it decodes the proposals' exact boxes on the clean embedding, the student decodes jittered boxes on a
dropped-out embedding and learns the teacher's binarised mask on the pixels where the teacher is confident. It is
not a submodule of the LightningModule: never optimised, never checkpointed (a resumed run restarts it from the
restored student).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from samtune.model.promptable_sam import PromptableSam
from samtune.prompts import masks_to_boxes

PARTS = ("prompt_encoder", "mask_decoder")
# engine.semi keys -> (low, high) of their valid range; absent keys take 0.5 when checked
RANGES = {"ema": (0, 1), "confidence": (0, 1), "feature_dropout": (0, 0.95)}


class EmaTeacher:
    """The mean teacher of a student ``sam``.

    Args:
        sam: The student's segment_anything model (its prompt encoder and mask decoder are copied).
        cfg: ``engine.semi``: ``ema`` (decay per step), ``confidence`` (teacher pixels trusted where ``|2p - 1|``
            reaches it), ``feature_dropout`` (the student's perturbed view), ``weight`` (loss weight of unlabelled
            images).

    Raises:
        ValueError: a setting out of its range, naming the key.
    """

    def __init__(self, sam: Sam, cfg: Mapping) -> None:
        self.cfg = dict(cfg)
        for key, (lo, hi) in RANGES.items():
            if not lo <= float(self.cfg.get(key, 0.5)) <= hi:
                raise ValueError(f"engine.semi.{key} must be in [{lo}, {hi}], got {self.cfg[key]}")
        self.parts = copy.deepcopy(torch.nn.ModuleDict({name: getattr(sam, name) for name in PARTS}))
        self.parts.requires_grad_(False)

    @property
    def decay(self) -> float:
        return float(self.cfg.get("ema", 0.99))

    @property
    def weight(self) -> float:
        """Loss weight of the unlabelled images."""
        return float(self.cfg.get("weight", 1.0))

    def reset_from(self, sam: Sam) -> None:
        """The teacher becomes the student (a resumed run: checkpoints hold no teacher)."""
        for name, module in self.parts.items():
            module.load_state_dict(getattr(sam, name).state_dict())

    @torch.no_grad()
    def update(self, sam: Sam) -> None:
        """One EMA step towards the student: ``teacher = decay * teacher + (1 - decay) * student``."""
        decay = self.decay
        for name, module in self.parts.items():
            for t, s in zip(module.parameters(), getattr(sam, name).parameters(), strict=True):
                t.mul_(decay).add_(s.detach().to(t.device), alpha=1 - decay)

    def loss(self, model: PromptableSam, embedding: torch.Tensor, proposals: torch.Tensor,
             gen: torch.Generator) -> torch.Tensor | None:
        """Per-prompt loss of the student ``model`` against the teacher on one unlabelled image.

        Args:
            model: The student.
            embedding: 1 x C x h x w embedding of the image (the shared frozen encoder's).
            proposals: n x H x W masks the engine proposed for the image (input frame); they only place the boxes.
            gen: The step's random generator (box jitter).

        Returns:
            n' losses (BCE + Dice on trusted pixels) of the proposals whose teacher mask is not empty; None if none is.
        """
        teacher = self.parts.to(embedding.device)
        boxes = masks_to_boxes(proposals).float()
        with torch.no_grad():
            sparse, dense = teacher["prompt_encoder"](points=None, boxes=boxes.to(embedding.device), masks=None)
            t_logits, _ = teacher["mask_decoder"].predict_masks(
                image_embeddings=embedding, image_pe=teacher["prompt_encoder"].get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
            prob = model.upscale_to_input(t_logits[:, :1]).sigmoid()[:, 0]
            target = (prob > 0.5).float()
            trusted = ((2 * prob - 1).abs() >= float(self.cfg.get("confidence", 0.5))).float()
        keep = target.flatten(1).sum(-1) > 0
        if not bool(keep.any()):
            return None
        side = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1).repeat(1, 2)
        noise = torch.randn(boxes.shape, generator=gen) * 0.05 * side
        jittered = (boxes + noise).clamp(0, model.img_size - 1)
        dropped = F.dropout(embedding, p=float(self.cfg.get("feature_dropout", 0.5)), training=True)
        logits, _ = model.decode(dropped, boxes=jittered[keep].to(embedding.device))
        student = model.upscale_to_input(logits[:, :1])[:, 0]
        target, trusted = target[keep], trusted[keep]
        bce = F.binary_cross_entropy_with_logits(student, target, reduction="none")
        bce = (bce * trusted).flatten(1).sum(-1) / trusted.flatten(1).sum(-1).clamp(min=1)
        probs = student.sigmoid() * trusted
        overlap = (probs * target).flatten(1).sum(-1)
        dice = 1 - (2 * overlap + 1) / (probs.flatten(1).sum(-1) + (target * trusted).flatten(1).sum(-1) + 1)
        return bce + dice
