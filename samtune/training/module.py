"""The LightningModule that fine-tunes SAM with simulated prompts.

``training_step`` reads in the order of the data flow: embed the images once, simulate prompts for
their instances, decode all prompts of an image in one batched call, compute SAM's loss, then run the
configured correction rounds (a click sampled from the error region plus the previous low-resolution
logits as mask prompt, or the logits alone), each with its own loss.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch

from samtune.losses import SamLoss
from samtune.metrics import InstanceMaskMetrics
from samtune.model.promptable_sam import PromptableSam
from samtune.prompts import PromptGroup, PromptSimulator, center_points, masks_to_boxes


class SamTuneModule(L.LightningModule):
    """Fine-tunes the parts of a :class:`PromptableSam` that the ``finetune`` config unfreezes.

    Args:
        model: The SAM to train.
        simulator: Prompt simulator applying the ``prompts`` policy.
        loss: SAM's loss.
        optimizer: Partial optimizer taking the trainable parameters.
        scheduler: Optional partial taking (optimizer, total_steps) and returning an LR scheduler.
        train_image_encoder: Whether the image encoder trains (``False``: frozen, run without grad).
        train_prompt_encoder: Whether the prompt encoder trains.
        train_mask_decoder: Whether the mask decoder trains.
        seed: Base seed of the per-step prompt generators.
    """

    def __init__(
        self,
        model: PromptableSam,
        *,
        simulator: PromptSimulator,
        loss: SamLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        train_image_encoder: bool = False,
        train_prompt_encoder: bool = False,
        train_mask_decoder: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.simulator = simulator
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.train_image_encoder = train_image_encoder
        self.seed = seed
        sam = model.sam
        for module, flag in (
            (sam.image_encoder, train_image_encoder),
            (sam.prompt_encoder, train_prompt_encoder),
            (sam.mask_decoder, train_mask_decoder),
        ):
            module.requires_grad_(flag)
        if not any(p.requires_grad for p in self.parameters()):
            raise ValueError("finetune: every part of the model is frozen; nothing would train")
        self.val_metrics = torch.nn.ModuleDict({"box": InstanceMaskMetrics(), "point1": InstanceMaskMetrics()})

    # ------------------------------------------------------------------ helpers
    def _generator(self, batch_idx: int, stage: str) -> torch.Generator:
        offset = {"train": 0, "val": 1}[stage]
        seed = hash((self.seed, offset, self.current_epoch, self.global_step, batch_idx, self.global_rank))
        return torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings; without autograd when the encoder is frozen."""
        if self.train_image_encoder:
            return self.model.embed(images)
        self.model.sam.image_encoder.eval()
        with torch.no_grad():
            return self.model.embed(images)

    def _decode(self, embedding: torch.Tensor, group: PromptGroup) -> tuple[torch.Tensor, torch.Tensor]:
        points = (group.points, group.labels) if group.points is not None else None
        return self.model.decode(embedding, points=points, boxes=group.boxes, mask_input=group.mask_input)

    def _valid_region(self, input_size: torch.Tensor) -> torch.Tensor:
        s = self.model.img_size
        region = torch.zeros(s, s, dtype=torch.bool)
        region[: int(input_size[0]), : int(input_size[1])] = True
        return region

    def _zero_loss(self) -> torch.Tensor:
        # Keeps every trainable parameter in the graph (DDP) when a batch has no instance at all.
        return sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        embeddings = self.embed(batch["image"])
        gen = self._generator(batch_idx, "train")
        losses, parts = [], {"focal": [], "dice": [], "iou": [], "true_iou": []}
        for b in range(len(embeddings)):
            gt = batch["masks"][b][batch["valid"][b]]
            if len(gt) == 0:
                continue
            gt_cpu = gt.cpu()
            region = self._valid_region(batch["input_size"][b])
            for group in self.simulator.initial(gt_cpu, generator=gen):
                idx = group.index
                gt_g, gt_g_cpu = gt[idx.to(gt.device)], gt_cpu[idx]
                group = group.to(self.device)
                pred = prev = None  # previous round's binary mask (input frame) and low-res logits
                for step in ["initial", *self.simulator.rounds()]:
                    if step == "click":
                        group = self.simulator.correct(group.to("cpu"), pred, gt_g_cpu, prev, generator=gen).to(self.device)
                    elif step == "mask":
                        group = self.simulator.mask_only(group, prev.to(self.device))
                    logits, iou = self._decode(embeddings[b : b + 1], group)
                    out = self.loss_fn(self.model.upscale_to_input(logits), iou, gt_g, multimask=group.multimask)
                    losses.append(out.loss)
                    for key in parts:
                        parts[key].append(getattr(out, key).detach())
                    # Next round starts from the mask SAM would hand back (highest predicted IoU).
                    chosen, _ = PromptableSam.select_output(logits.detach(), iou.detach(), group.multimask)
                    prev = chosen.float().cpu()
                    pred = (self.model.upscale_to_input(chosen)[:, 0] > 0).cpu() & region
        if not losses:
            loss = self._zero_loss()
            self.log("train/loss", loss, prog_bar=True, batch_size=1)
            return loss
        loss = torch.cat(losses).mean()
        n = sum(len(x) for x in losses)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        for key, values in parts.items():
            self.log(f"train/{key}", torch.cat(values).float().mean(), batch_size=n)
        return loss

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        embeddings = self.model.embed(batch["image"])
        for b in range(len(embeddings)):
            gt = batch["masks"][b][batch["valid"][b]]
            if len(gt) == 0:
                continue
            region = self._valid_region(batch["input_size"][b]).to(gt.device)
            gt_cpu = gt.cpu()
            prompts = {
                "box": PromptGroup(index=torch.arange(len(gt)), boxes=masks_to_boxes(gt_cpu), multimask=False),
                "point1": PromptGroup(
                    index=torch.arange(len(gt)),
                    points=center_points(gt_cpu),
                    labels=torch.ones(len(gt), 1, dtype=torch.long),
                    multimask=True,
                ),
            }
            for mode, group in prompts.items():
                logits, iou = self._decode(embeddings[b : b + 1], group.to(self.device))
                chosen, _ = PromptableSam.select_output(logits, iou, group.multimask)
                pred = (self.model.upscale_to_input(chosen)[:, 0] > 0) & region
                self.val_metrics[mode].update(pred, gt)

    def on_validation_epoch_end(self) -> None:
        values = {}
        for mode, metric in self.val_metrics.items():
            res = metric.compute()
            values[mode] = res["miou"].float()
            self.log(f"val/miou_{mode}", values[mode], sync_dist=False)
            metric.reset()
        self.log("val/miou", (values["box"] + values["point1"]) / 2, prog_bar=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
