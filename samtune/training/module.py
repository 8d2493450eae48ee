"""The LightningModule that fine-tunes SAM with simulated prompts.

``training_step`` reads in the order of the data flow: embed the images once, simulate prompts for
their instances, decode all prompts of an image in one batched call, compute SAM's loss, then run the
configured correction rounds (a click sampled from the error region plus the previous low-resolution
logits as mask prompt, or the logits alone), each with its own loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import lightning as L
import torch

from samtune.losses import LossOutput, SamLoss
from samtune.metrics import InstanceMaskMetrics
from samtune.model.embedding_cache import EmbeddingCache
from samtune.model.lora import LoraSettings, apply_lora
from samtune.model.promptable_sam import PromptableSam
from samtune.model.training_checkpoint import (
    META_FORMAT,
    META_KEY,
    SAM_PREFIX,
    check_saved_mode,
    complete_partial_state,
    fingerprint,
    frozen_state_keys,
    strip_frozen,
)
from samtune.prompts import PromptGroup, PromptSimulator, center_points, masks_to_boxes
from samtune.training.finetune_modes import finetune_mode
from samtune.training.param_groups import (
    IOU_HEAD_GROUP,
    apply_lr_scales,
    build_param_groups,
    reinitialise,
    restrict_trainable,
)
from samtune.training.teacher import EmaTeacher

log = logging.getLogger(__name__)



class SamTuneModule(L.LightningModule):
    """Fine-tunes the parts of a :class:`PromptableSam` that the ``finetune`` config unfreezes.

    Modes (``finetune.mode``):

    * ``decoder_only``: the image encoder is frozen and runs without gradients;
    * ``lora``: LoRA adapters (peft) on the encoder's attention projections train, its base weights
      stay frozen (:func:`samtune.model.lora.apply_lora` is applied to ``model`` here);
    * ``full``: the image encoder trains too, with ``encoder_lr_mult`` and ``layer_decay``
      (:mod:`samtune.training.param_groups`).

    Frozen parameters get no gradient and are left out of the Lightning checkpoints; the checkpoint
    records where they come from (:mod:`samtune.model.training_checkpoint`), and loading a checkpoint
    into this module takes them from the live model (built from ``model.checkpoint``).

    Args:
        model: The SAM to train (changed in place: requires_grad flags, LoRA adapters).
        simulator: Prompt simulator applying the ``prompts`` policy.
        loss: SAM's loss.
        optimizer: Partial optimizer taking ``params=`` (a list of param groups).
        scheduler: Optional partial taking (optimizer, total_steps) and returning an LR scheduler.
        mode: ``decoder_only``, ``lora`` or ``full``; None: ``full`` if ``train_image_encoder`` else
            ``decoder_only``.
        train_image_encoder: Legacy switch; must agree with ``mode`` when both are given.
        train_prompt_encoder: Whether the prompt encoder trains.
        train_mask_decoder: Whether the mask decoder trains.
        lora: ``finetune.lora`` settings (:class:`samtune.model.lora.LoraSettings` fields), for ``lora``.
        encoder_lr_mult: Factor on the image encoder's learning rate.
        layer_decay: Layer-wise learning-rate decay over the ViT blocks (1: none).
        iou_head_lr_mult: Factor on the learning rate of the mask decoder's IoU head.
        gradient_checkpointing: Recompute encoder block activations in backward (``lora``/``full``).
        only: Train only the parameters, among those the mode trains, whose :class:`Sam` names start with
            one of these prefixes (``finetune.only``, e.g. ``[mask_decoder.iou_prediction_head]`` to
            calibrate the IoU head on a domain while every mask stays as it was); None: all of them.
        reinit: Submodules (:class:`Sam` names, e.g. ``[mask_decoder.iou_prediction_head]``) that start
            from fresh, seeded weights instead of the checkpoint's (``finetune.reinit``); they must train.
        checkpoint_meta: Where the starting weights come from (``model_type``, ``arch``, ``seed``,
            ``base_checkpoint``), recorded in checkpoints so that frozen weights can be found again.
        seed: Base seed of the per-step prompt generators.
        embedding_cache: Read/write image embeddings here instead of running the frozen encoder on every
            step (``decoder_only`` only; batches must carry ``cache_key``, see :class:`SamDataset`).
        teacher: Semi-supervised training of the data engine (``engine.semi``: ``ema``, ``confidence``,
            ``feature_dropout``, ``weight``): images of kind ``teacher`` are then supervised by an
            :class:`~samtune.training.teacher.EmaTeacher`; None: no teacher.
    """

    def __init__(
        self,
        model: PromptableSam,
        *,
        simulator: PromptSimulator,
        loss: SamLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        mode: str | None = None,
        train_image_encoder: bool | None = None,
        train_prompt_encoder: bool = False,
        train_mask_decoder: bool = True,
        lora: Mapping | None = None,
        encoder_lr_mult: float = 1.0,
        layer_decay: float = 1.0,
        iou_head_lr_mult: float = 1.0,
        gradient_checkpointing: bool = False,
        only: Sequence[str] | None = None,
        reinit: Sequence[str] | None = None,
        checkpoint_meta: Mapping | None = None,
        seed: int = 0,
        embedding_cache: EmbeddingCache | None = None,
        teacher: Mapping | None = None,
    ) -> None:
        super().__init__()
        mode = mode or ("full" if train_image_encoder else "decoder_only")
        kind = finetune_mode(mode)
        if train_image_encoder is not None and bool(train_image_encoder) != kind.encoder_weights_train:
            raise ValueError(
                f"finetune.train_image_encoder={train_image_encoder} contradicts finetune.mode={mode}: the image "
                "encoder trains fully only with finetune=full (finetune=lora trains adapters on it)"
            )
        if lora is not None and not kind.uses_adapters:
            raise ValueError(f"finetune.lora is set but finetune.mode={mode}; use finetune=lora")
        if embedding_cache is not None and not kind.encoder_frozen:
            raise ValueError(f"the embedding cache needs a frozen image encoder (finetune=decoder_only); "
                             f"finetune={mode} trains it: set cache.enabled=false or auto")
        self.model = model
        self.simulator = simulator
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.mode = mode
        self.finetune_mode = kind
        self.seed = seed
        self.encoder_lr_mult, self.layer_decay = float(encoder_lr_mult), float(layer_decay)
        self.iou_head_lr_mult = float(iou_head_lr_mult)
        self.checkpoint_meta = dict(checkpoint_meta or {})
        self.embedding_cache = embedding_cache
        sam = model.sam
        sam.image_encoder.requires_grad_(kind.encoder_weights_train)
        sam.prompt_encoder.requires_grad_(train_prompt_encoder)
        sam.mask_decoder.requires_grad_(train_mask_decoder)
        self.lora = LoraSettings.from_config(lora) if kind.uses_adapters else None
        if self.lora is not None:
            apply_lora(sam, self.lora)
        if only:
            restrict_trainable(sam, only)
        if reinit:
            fresh = reinitialise(sam, reinit, seed=seed)
            params = dict(sam.named_parameters())
            frozen = [n for n in fresh if not params[n].requires_grad]
            if frozen:
                raise ValueError(f"finetune.reinit: {frozen[0]} would be re-initialised but not trained; "
                                 "re-initialise only parts that train (finetune.mode, finetune.only)")
            log.info("finetune.reinit: %d parameters of %s start from fresh weights", len(fresh), list(reinit))
        self.train_image_encoder = not kind.encoder_frozen  # runs with gradients (all weights or adapters)
        model.gradient_checkpointing = bool(gradient_checkpointing) and self.train_image_encoder
        if not any(p.requires_grad for p in self.parameters()):
            raise ValueError("finetune: every part of the model is frozen; nothing would train")
        self.teacher: EmaTeacher | None = None
        if teacher:
            if not kind.encoder_frozen:
                raise ValueError("engine.semi: the EMA teacher shares the frozen image encoder; use finetune=decoder_only")
            self.teacher = EmaTeacher(sam, teacher)
        self.val_metrics = torch.nn.ModuleDict({"box": InstanceMaskMetrics(), "point1": InstanceMaskMetrics()})
        self.zoomed_val: tuple | None = None  # see use_zoomed_validation
        # Fingerprint of the weights left out of checkpoints, to recognise their base later.
        own = self.state_dict()
        sam_state = {k[len(SAM_PREFIX):]: v for k, v in own.items() if k.startswith(SAM_PREFIX)}
        self._base_fingerprint = fingerprint(sam_state, [k[len(SAM_PREFIX):] for k in self.frozen_state_keys()])

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

    def image_embeddings(self, batch: dict) -> torch.Tensor:
        """``B x C x h x w`` embeddings of the batch's images: from the embedding cache when there is one
        (the encoder runs only on the images not cached yet), else from the encoder."""
        if self.embedding_cache is None:
            return self.embed(batch["image"])
        if "cache_key" not in batch:
            raise ValueError("the embedding cache is on but the batch has no cache_key (SamDataset(cache_keys=True))")
        return self.embedding_cache.embed_batch(batch["cache_key"], batch["image"], self.embed)

    def _loss(self, logits: torch.Tensor, iou: torch.Tensor, gt: torch.Tensor, multimask: bool) -> LossOutput:
        """SAM's loss at input resolution, upscaling only the outputs it reads: output 0 for unambiguous
        prompts (the others are passed as views of it and ignored), all four for ambiguous ones."""
        if multimask:
            return self.loss_fn(self.model.upscale_to_input(logits), iou, gt, multimask=True)
        single = self.model.upscale_to_input(logits[:, :1])
        return self.loss_fn(single.expand(-1, logits.shape[1], -1, -1), iou, gt, multimask=False)

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
        embeddings = self.image_embeddings(batch)
        gen = self._generator(batch_idx, "train")
        losses, parts = [], {"focal": [], "dice": [], "iou": [], "true_iou": []}
        weights = batch.get("weight")
        for b in range(len(embeddings)):
            gt = batch["masks"][b][batch["valid"][b]]
            if len(gt) == 0:
                continue
            weight = float(weights[b]) if weights is not None else 1.0
            if batch.get("kind", ["labeled"] * len(embeddings))[b] == "teacher":
                if self.teacher is None:
                    raise ValueError("a batch holds unlabelled (teacher) images but the module has no teacher")
                out = self.teacher.loss(self.model, embeddings[b : b + 1], gt.cpu(), gen)
                if out is not None:
                    losses.append(out * weight * self.teacher.weight)
                    self.log("train/teacher_loss", out.mean().detach(), batch_size=len(out))
                continue
            gt_cpu = gt.cpu()
            region = self._valid_region(batch["input_size"][b])
            for group in self.simulator.initial(gt_cpu, generator=gen):
                idx = group.index
                gt_g, gt_g_cpu = gt[idx.to(gt.device)], gt_cpu[idx]
                group = group.to(self.device)
                pred = prev = None  # previous round's binary mask (input frame) and low-res logits
                steps = ["initial", *self.simulator.rounds()]
                for i, step in enumerate(steps):
                    if step == "click":
                        group = self.simulator.correct(group.to("cpu"), pred, gt_g_cpu, prev, generator=gen).to(self.device)
                    elif step == "mask":
                        group = self.simulator.mask_only(group, prev.to(self.device))
                    logits, iou = self._decode(embeddings[b : b + 1], group)
                    out = self._loss(logits, iou, gt_g, group.multimask)
                    losses.append(out.loss * weight)
                    for key in parts:
                        parts[key].append(getattr(out, key).detach())
                    if i + 1 == len(steps):
                        break
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
            if values:
                self.log(f"train/{key}", torch.cat(values).float().mean(), batch_size=n)
        return loss

    def on_train_start(self) -> None:
        if self.teacher is not None and self.global_step > 0:
            self.teacher.reset_from(self.model.sam)  # resumed: checkpoints hold no teacher

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.teacher is not None:
            self.teacher.update(self.model.sam)

    def on_train_epoch_end(self) -> None:
        if self.embedding_cache is not None:
            stats = self.embedding_cache.stats()
            log.info("Embedding cache (rank %d, since start): %d embeddings read, %d computed, %d corrupt recomputed",
                     self.global_rank, stats["hits"], stats["computed"], stats["corrupt"])

    # ------------------------------------------------------------------ validation
    def use_zoomed_validation(self, records: Sequence, prompts: Mapping[str, list[dict]], zoom,
                              *, binary_as_one_object: bool = False, modes: Sequence[str] = ("box", "point1"),
                              start: Mapping[str, float] | None = None) -> None:
        """Validate the way the final evaluation runs with ``eval.zoom``.

        Plain validation segments whole images with tight boxes and centre points; a model evaluated with
        prompt-focused zoom would then be chosen (best checkpoint) on views it is not reported on. Here each
        validation instead runs the evaluation itself (:func:`samtune.evaluation.evaluator.evaluate_model`) on
        ``records`` with the fixed ``prompts`` in each of ``modes`` and ``zoom`` (a ``ZoomConfig``), and logs its
        mIoU as ``val/miou_<mode>`` and their mean ``val/miou``. With ``start`` (the starting model's mIoU per
        mode on the same prompts) it also logs ``val/gain_<mode>`` and ``val/min_gain``, the smallest gain over
        the modes: the score by which no mode can pay for another (``eval.select=min_gain``). The sanity check
        before training is skipped.
        """
        modes = list(modes)
        if start is not None and set(start) != set(modes):
            raise ValueError(f"start figures are for modes {sorted(start)}, validation runs {modes}")
        self.zoomed_val = (list(records), dict(prompts), zoom, bool(binary_as_one_object), modes,
                           dict(start) if start is not None else None)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.zoomed_val is not None:
            return  # on_validation_epoch_end evaluates the zoomed views
        embeddings = self.image_embeddings(batch)
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
        if self.zoomed_val is not None:
            if self.trainer.sanity_checking:
                return
            from samtune.evaluation.evaluator import evaluate_model

            records, prompts, zoom, binary, modes, start = self.zoomed_val
            result = evaluate_model(self.model, records, prompts, name="val", modes=modes,
                                    zoom=zoom, binary_as_one_object=binary)
            values = {mode: float(result.summary[mode]["miou"]) for mode in modes}
            for mode, value in values.items():
                self.log(f"val/miou_{mode}", torch.tensor(value), sync_dist=False)
            self.log("val/miou", torch.tensor(sum(values.values()) / len(values)), prog_bar=True)
            if start is not None:
                gains = {mode: values[mode] - float(start[mode]) for mode in modes}
                for mode, gain in gains.items():
                    self.log(f"val/gain_{mode}", torch.tensor(gain), sync_dist=False)
                self.log("val/min_gain", torch.tensor(min(gains.values())), prog_bar=True)
            return
        values = {}
        for mode, metric in self.val_metrics.items():
            res = metric.compute()
            values[mode] = res["miou"].float()
            self.log(f"val/miou_{mode}", values[mode], sync_dist=False)
            metric.reset()
        self.log("val/miou", (values["box"] + values["point1"]) / 2, prog_bar=True)

    # ------------------------------------------------------------------ optimisation
    def _param_groups(self) -> list[dict]:
        return build_param_groups(
            self.model.sam.named_parameters(), depth=len(self.model.sam.image_encoder.blocks),
            encoder_lr_mult=self.encoder_lr_mult, layer_decay=self.layer_decay,
            iou_head_lr_mult=self.iou_head_lr_mult,
        )

    def configure_optimizers(self):
        groups = self._param_groups()
        optimizer = self.optimizer_factory(params=groups)
        apply_lr_scales(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def frozen_state_keys(self) -> set[str]:
        """State-dict keys left out of checkpoints (:func:`samtune.model.training_checkpoint.frozen_state_keys`)."""
        return frozen_state_keys(self, SAM_PREFIX)

    def checkpoint_record(self) -> dict:
        """What ``checkpoint["samtune"]`` records (see :mod:`samtune.model.training_checkpoint`)."""
        return {
            "format": META_FORMAT,
            "base": dict(self.checkpoint_meta),
            "finetune": {"mode": self.mode, **({"lora": self.lora.to_dict()} if self.lora else {})},
            "base_fingerprint": self._base_fingerprint,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave frozen weights out (they come from ``model.checkpoint``) and record their origin."""
        strip_frozen(checkpoint, self.frozen_state_keys(), self.checkpoint_record())

    def check_optimizer_layout(self, checkpoint: dict) -> None:
        """Refuse to resume an optimizer state whose parameter groups this run's settings would not make.

        PyTorch would only say that the group sizes differ; this names the groups and the settings behind them.

        Raises:
            ValueError: the checkpoint's optimizer groups differ from this run's.
        """
        states = checkpoint.get("optimizer_states") or []
        if not states:
            return
        saved = [g.get("name") for g in states[0].get("param_groups", [])]
        if not saved or None in saved:  # groups without names: nothing to compare by
            return
        here = [g["name"] for g in self._param_groups()]
        if saved == here:
            return
        hint = ""
        head = IOU_HEAD_GROUP
        if (head in saved) != (head in here):
            was = "1"
            if head in saved:  # the head's rate over the decoder's (both groups keep their lr_scale)
                scales = {g.get("name"): g.get("lr_scale") for g in states[0]["param_groups"]}
                ratio = (scales.get(head) or 0) / (scales.get("mask_decoder") or float("nan"))
                was = f"{ratio:g}" if ratio == ratio else "a value other than 1"
            hint = (f" The IoU head has groups of its own only when finetune.iou_head_lr_mult != 1: the checkpoint was "
                    f"saved with finetune.iou_head_lr_mult={was}, this run uses {self.iou_head_lr_mult:g} instead: "
                    f"resume with finetune.iou_head_lr_mult={was}.")
        raise ValueError(
            "cannot resume the optimizer state: its parameter groups are not the ones this run's settings make "
            f"(only in the checkpoint: {sorted(set(saved) - set(here))}; only in this run: "
            f"{sorted(set(here) - set(saved))}; they follow finetune.mode, finetune.only, finetune.encoder_lr_mult, "
            f"finetune.layer_decay and finetune.iou_head_lr_mult).{hint}"
        )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Complete a checkpoint that leaves frozen weights out with the live model's frozen weights.

        Raises:
            ValueError: the checkpoint was trained in another mode, lacks trained weights, its
                frozen weights came from a different base than this run's ``model.checkpoint``, or (when
                resuming) its optimizer state has other parameter groups than this run's settings make.
        """
        meta = checkpoint.get(META_KEY) or {}
        check_saved_mode(meta, self.mode)
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.state.fn == "fit":  # resuming: the optimizer state comes next
            self.check_optimizer_layout(checkpoint)
        complete_partial_state(checkpoint["state_dict"], meta, self.state_dict(), self.frozen_state_keys(), SAM_PREFIX)

    def load_training_checkpoint(self, path: str | Path) -> None:
        """Load a Lightning checkpoint's weights (partial ones included) into this module."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        self.on_load_checkpoint(checkpoint)
        self.load_state_dict(checkpoint["state_dict"])
