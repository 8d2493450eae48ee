"""The Lightning side of a run: ``fit(cfg, ...)`` wires the model, data, module, zoomed validation, callbacks,
loggers and trainer from the config and fine-tunes (resumable); ``start_run`` makes (or finds) the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from samtune.evaluation.evaluator import evaluate_model
from samtune.evaluation.job import validation_prompts
from samtune.losses import loss_preset_name
from samtune.model.lora import has_lora, merge_lora
from samtune.model.promptable_sam import PromptableSam
from samtune.predict.modes import FIXED_MODES
from samtune.predict.zoom import zoom_config
from samtune.prompts import PromptPolicy, PromptSimulator
from samtune.training.cache_setup import setup_embedding_cache
from samtune.training.datamodule import SamDataModule
from samtune.training.distributed import is_global_zero
from samtune.training.module import SamTuneModule
from samtune.training.run_dir import find_resumable_run
from samtune.utils.io import atomic_write_text

log = logging.getLogger(__name__)


def resolve_precision(precision: str | int) -> str | int:
    """``auto``: bf16-mixed on GPUs that support it, 16-mixed on older GPUs, 32-true on CPU."""
    if str(precision) != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def check_loss(cfg: DictConfig) -> str | None:
    """Warn when fine-tuning with another loss than the starting weights were trained with (``model.pretrain_loss``).

    Returns the warning (None when the losses agree, or when either is unknown).
    """
    pretrain = cfg.model.get("pretrain_loss")
    loss = cfg.get("loss")
    if not pretrain or loss is None or not cfg.model.get("checkpoint"):
        return None
    used = str(loss.name) if "name" in loss else loss_preset_name(loss)
    if used is None or used == str(pretrain):
        return None
    message = (f"fine-tuning with loss '{used}' but the starting weights of model={cfg.model.type} were trained with "
               f"'{pretrain}' (model.pretrain_loss): the first steps move every mask's edge (with sam's focal alpha "
               f"0.25 masks shrink) before anything is learned; loss=pretrained (or loss={pretrain}) uses their loss")
    log.warning(message)
    return message


def fit(cfg: DictConfig, run_dir: Path, model: PromptableSam, records: dict, resume_ckpt: Path | None,
        module_kwargs: dict | None = None) -> dict:
    """Fine-tune ``model`` in place; return the best validation score and checkpoint paths.

    With ``finetune=lora`` the adapters are merged into the base weights at the end, so ``model`` is a
    plain SAM again: what is evaluated is exactly what ``finetuned_sam.pth`` holds.

    Under DDP every rank runs this; ranks other than global rank 0 return right after training.
    """
    precision = resolve_precision(cfg.trainer.precision)
    check_loss(cfg)
    zoom_crop = OmegaConf.to_container(cfg.data.zoom_crop) if cfg.data.get("zoom_crop") else None
    # Frozen encoder: each image's embedding is computed once and read from disk afterwards (cache.*).
    cache, views = setup_embedding_cache(
        cfg.get("cache"), mode=str(cfg.finetune.get("mode", "decoder_only")), model=model,
        model_type=str(cfg.model.type), arch=cfg.model.get("arch"), precision=precision,
        augment=str(cfg.data.augment), zoom_crop=zoom_crop,
    )
    datamodule = SamDataModule(
        records["train_split"], records["val_split"], img_size=model.img_size, augment=cfg.data.augment,
        batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, max_instances=cfg.data.max_instances,
        binary_as_one_object=bool(cfg.data.binary_as_one_object), zoom_crop=zoom_crop,
        cache_keys=cache is not None, views=views,
    )
    # Where the starting weights come from: recorded in the training checkpoints, which leave frozen weights out.
    base = cfg.model.get("checkpoint")
    base_record = {
        "model_type": str(cfg.model.type), "arch": OmegaConf.to_container(cfg.model.arch) if cfg.model.get("arch") else {},
        "seed": int(cfg.seed),
        "base_checkpoint": str(Path(hydra.utils.to_absolute_path(str(base))).resolve()) if base else None,
    }
    module = SamTuneModule(
        model,
        simulator=PromptSimulator(PromptPolicy(**OmegaConf.to_container(cfg.prompts))),
        loss=hydra.utils.instantiate(cfg.loss),
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        seed=int(cfg.seed),
        checkpoint_meta=base_record,
        embedding_cache=cache,
        **OmegaConf.to_container(cfg.finetune),
        **(module_kwargs or {}),
    )
    zoom = zoom_config(cfg.eval)
    select = str(cfg.eval.get("select", "miou"))
    if select not in ("miou", "min_gain"):
        raise ValueError(f"eval.select must be 'miou' or 'min_gain', got {select!r}")
    if zoom is not None and records["val_split"]:
        # choose the best checkpoint on the views the report evaluates, not on whole images
        binary = bool(cfg.data.binary_as_one_object)
        per_image = int(cfg.data.max_instances)
        val_prompts = validation_prompts(records["val_split"], seed=int(cfg.eval.prompt_seed),
                                         binary_as_one_object=binary, max_per_image=per_image)
        # the report's fixed-prompt modes, each validated (a mode not validated could fall unseen)
        val_modes = [m for m in FIXED_MODES if m in list(cfg.eval.modes)] or ["box", "point1"]
        start = None
        if select == "min_gain":
            # the starting weights on the same val prompts: `model` is still the start here (a resume loads its
            # checkpoint inside trainer.fit), so a resumed run compares against the same figures
            start_eval = evaluate_model(model, records["val_split"], val_prompts, name="start", modes=val_modes,
                                        zoom=zoom, binary_as_one_object=binary)
            start = {m: float(start_eval.summary[m]["miou"]) for m in val_modes}
            log.info("Starting model on val: %s", ", ".join(f"{m} {v:.4f}" for m, v in start.items()))
        module.use_zoomed_validation(records["val_split"], val_prompts, zoom, binary_as_one_object=binary,
                                     modes=val_modes, start=start)
        log.info("Validation evaluates %s prompts with %s (up to %d instances per val image)",
                 "/".join(val_modes), zoom.describe(), per_image)
    elif select == "min_gain" and records["val_split"]:
        log.warning("eval.select=min_gain needs zoomed validation (eval.zoom); choosing by val/miou instead")
        select = "miou"
    callback_cfgs = dict(cfg.get("callbacks") or {})
    # nothing to monitor without a val split: model_checkpoint keeps the latest epoch and writes last.ckpt itself
    merge_last = not records["val_split"] and bool(callback_cfgs.get("model_checkpoint"))
    if merge_last:
        callback_cfgs.pop("last_checkpoint", None)
    callbacks = {k: hydra.utils.instantiate(c) for k, c in callback_cfgs.items() if c}
    if not records["val_split"]:
        for c in callbacks.values():
            if isinstance(c, L.pytorch.callbacks.ModelCheckpoint):
                c.monitor = None
    if merge_last:
        callbacks["model_checkpoint"].save_last = True
    if select == "min_gain" and records["val_split"] and "model_checkpoint" in callbacks:
        callbacks["model_checkpoint"].monitor = "val/min_gain"
    callbacks = list(callbacks.values())
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=precision,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # DDP ends here: rank 0 evaluates alone (torchmetrics would wait for ranks that have returned).
        torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    ckpt_cb = trainer.checkpoint_callback
    best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb else ""
    score = getattr(ckpt_cb, "best_model_score", None) if ckpt_cb else None
    if cfg.eval.use_best and best and not cfg.trainer.get("fast_dev_run"):
        module.load_training_checkpoint(best)  # completes checkpoints that leave frozen weights out
        if score is None:  # nothing monitored (no val split or no validation run): the latest checkpoint
            log.info("Evaluating the final checkpoint %s (no validation score to choose by)", best)
        else:
            log.info("Evaluating the best validation checkpoint %s (%s=%s)", best, ckpt_cb.monitor, score)
    if has_lora(model.sam):
        merge_lora(model.sam)
        log.info("Merged the LoRA adapters into the image encoder's weights")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if score is not None:
        metrics[f"{ckpt_cb.monitor}_best"] = float(score)
    return metrics


def start_run(cfg: DictConfig, *, allow_resume: bool = True) -> tuple[Path, Path | None]:
    """Create the run directory (or find the run that ``resume`` continues), save the resolved config, seed.

    Returns:
        (run directory, Lightning checkpoint to resume from or None).
    """
    run_dir = Path(cfg.paths.output_dir)
    resume_ckpt = None
    if allow_resume and cfg.get("resume"):
        found = find_resumable_run(cfg.resume, run_dir)
        if found is not None:
            run_dir, resume_ckpt = found
            # Checkpoints, logs and the report continue in the run being resumed.
            OmegaConf.update(cfg, "paths.output_dir", str(run_dir))
            log.info("Resuming in %s from %s", run_dir, resume_ckpt)
            atomic_write_text(Path(cfg.paths.output_dir) / "RESUMED_INTO.txt", f"{run_dir}\n")
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    resolved = run_dir / "config_resolved.yaml"
    if is_global_zero():  # DDP ranks started together (torchrun, srun) leave the run's record to rank 0
        if resume_ckpt is not None and resolved.exists() and resolved.read_text() != text:
            # a resume with other settings (a later trainer.max_steps, ...) keeps the record of the earlier ones
            k = 1
            while (kept := run_dir / f"config_resolved.{k}.yaml").exists():
                k += 1
            resolved.replace(kept)
            log.info("The run's earlier resolved config is kept as %s", kept)
        atomic_write_text(resolved, text)
    L.seed_everything(int(cfg.seed), workers=True)
    return run_dir, resume_ckpt
