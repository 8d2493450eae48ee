"""``train(cfg) -> metrics``: the whole job that ``python train.py`` runs.

1. scan and validate the dataset (generating the built-in one on first use);
2. build the model and load its starting checkpoint;
3. fix the evaluation prompts (``prompts.json``) and evaluate the starting model ("zero_shot"), on the
   evaluation split and on the ``eval.extra_sets``;
4. fine-tune with Lightning (resumable);
5. evaluate the fine-tuned model on the same prompts ("finetuned") and write the report.

``evaluate(cfg)`` (``scripts/evaluate.py``) is the same without step 4: it evaluates ``model.checkpoint`` and,
with ``finetuned=PATH``, a second checkpoint on the same prompts.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from samtune.data.records import ImageRecord
from samtune.data.sources import build_records
from samtune.evaluation.evaluator import evaluate_model
from samtune.evaluation.job import MAIN, EvalJob, EvalSet, report_metrics, validation_prompts
from samtune.losses import loss_preset_name
from samtune.model.checkpoint import load_sam_weights, save_sam_weights
from samtune.model.factory import build_model
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
from samtune.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def resolve_precision(precision: str | int) -> str | int:
    """``auto``: bf16-mixed on GPUs that support it, 16-mixed on older GPUs, 32-true on CPU."""
    if str(precision) != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def dataset_root(d: DictConfig, where: str = "data") -> Path:
    """The root of the dataset that data config ``d`` describes, generating the built-in one on first use.

    Args:
        d: A data config (``root``, optional ``generator`` and ``generator_params``).
        where: Its config path, for error messages (``data``, ``eval.extra_sets[0]``).
    """
    if OmegaConf.is_missing(d, "root") or d.get("root") is None or str(d.root) == "":
        raise ValueError(f"{where}.root is not set: pass {where}.root=DIR (see README: your own dataset)")
    root = Path(hydra.utils.to_absolute_path(str(d.root)))
    if d.get("generator"):
        from samtune.data import (
            synthetic_large,
            synthetic_medical,
            synthetic_pcb,
            synthetic_scenes,
            synthetic_volumes,
        )

        makers = {
            "pcb": synthetic_pcb.ensure_pcb_dataset,
            "medical": synthetic_medical.ensure_medical_dataset,
            "large": synthetic_large.ensure_large_dataset,
            "scenes": synthetic_scenes.ensure_scenes_dataset,
            "volumes": synthetic_volumes.ensure_volume_dataset,
        }
        if d.generator not in makers:
            raise ValueError(f"{where}.generator={d.generator!r} is not one of {sorted(makers)}")
        makers[d.generator](root, **OmegaConf.to_container(d.get("generator_params") or {}))
    if d.get("source") == "volume":
        return sliced_volumes(d, root, where)
    return root


def sliced_volumes(d: DictConfig, root: Path, where: str) -> Path:
    """Slice the volumes under ``root`` (once) and return the root of the resulting folder dataset."""
    from samtune.data.volumes import SliceSettings, ensure_volume_slices

    if not d.get("binary_as_one_object", False):
        raise ValueError(f"{where}.binary_as_one_object must be true for volumes: each label value of a slice is "
                         "one object, which the per-volume 3-D Dice relies on")
    v = OmegaConf.to_container(d.volume, resolve=True) if d.get("volume") else {}
    slices_dir = Path(hydra.utils.to_absolute_path(str(v.pop("slices_dir", "data/volume_slices"))))
    unknown = sorted(set(v) - set(SliceSettings.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{where}.volume: unknown keys {unknown}; valid: "
                         f"{sorted(SliceSettings.__dataclass_fields__) + ['slices_dir']}")
    if "percentiles" in v:
        v["percentiles"] = tuple(v["percentiles"])
    splits = sorted(p.name for p in root.iterdir() if (p / "images").is_dir()) if root.is_dir() else []
    return ensure_volume_slices(root, splits or [str(d.get("train_split", "train"))], SliceSettings(**v), slices_dir,
                                train_split=str(d.get("train_split", "train")))


def scan_split(d: DictConfig, root: Path, split: str) -> tuple[list[ImageRecord], list[dict]]:
    """Records of one split of the dataset that data config ``d`` describes, and the files skipped."""
    source = "folder" if d.source == "volume" else d.source  # volumes are read as their sliced folder dataset
    recs, bad = build_records(
        source, root, split, skip_invalid=bool(d.skip_invalid), binary_as_one_object=bool(d.binary_as_one_object)
    )
    log.info("%s split %s of %s: %d images%s", d.source, split, root, len(recs), f", {len(bad)} skipped" if bad else "")
    return recs, bad


def prepare_data(cfg: DictConfig, *, training: bool = True) -> tuple[Path, dict[str, list[ImageRecord]], list[dict]]:
    """Generate the built-in dataset if configured, then scan its splits.

    Returns:
        (root, records, skipped files): records under ``train_split`` / ``val_split`` / ``test_split`` (only when
        ``training``) and ``eval`` (the ``eval.split`` split, any folder of the dataset).
    """
    d = cfg.data
    root = dataset_root(d)
    records: dict[str, list[ImageRecord]] = {}
    skipped: list[dict] = []
    keys = ("train_split", "val_split", "test_split") if training else ()
    for key in keys:
        split = d[key]
        if key == "val_split" and (not split or not (root / split).is_dir()):
            log.warning("No %s split under %s: training runs without validation.", split or "val", root)
            records[key] = []
            continue
        records[key], bad = scan_split(d, root, split)
        skipped += bad
    scanned = {d[k]: k for k in keys if d[k] and (root / d[k]).is_dir()}
    if cfg.eval.split in scanned:
        records["eval"] = records[scanned[cfg.eval.split]]
    else:
        records["eval"], bad = scan_split(d, root, str(cfg.eval.split))
        skipped += bad
    return root, records, skipped


EXTRA_SET_DEFAULTS = {
    "name": None, "source": "folder", "root": None, "split": "test", "generator": None, "generator_params": {},
    "binary_as_one_object": False, "skip_invalid": False, "modes": None, "prompts_file": None, "volume": None,
}


def eval_sets(cfg: DictConfig, root: Path, records: dict, skipped: list[dict]) -> list[EvalSet]:
    """The evaluation split of ``data`` (first), then each ``eval.extra_sets`` entry (the forgetting check)."""
    ev = cfg.eval
    prompts_file = Path(hydra.utils.to_absolute_path(str(ev.prompts_file))) if ev.get("prompts_file") else None
    sets = [EvalSet(MAIN, root, str(ev.split), records["eval"], skipped, bool(cfg.data.binary_as_one_object),
                    list(ev.modes), prompts_file)]
    for i, spec in enumerate(ev.get("extra_sets") or []):
        where = f"eval.extra_sets[{i}]"
        if not isinstance(spec, DictConfig):
            raise ValueError(f"{where} must be a mapping like {{name: scenes, source: folder, root: DIR, split: test}}")
        unknown = sorted(set(spec) - set(EXTRA_SET_DEFAULTS))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; valid: {sorted(EXTRA_SET_DEFAULTS)}")
        d = OmegaConf.merge(EXTRA_SET_DEFAULTS, spec)
        name = str(d.name or "")
        if not name.replace("_", "").replace("-", "").isalnum() or name == MAIN or name in {s.name for s in sets}:
            raise ValueError(f"{where}.name={d.name!r}: give each extra set a unique name of letters, digits, - or _")
        set_root = dataset_root(d, where)
        recs, bad = scan_split(d, set_root, str(d.split))
        pf = Path(hydra.utils.to_absolute_path(str(d.prompts_file))) if d.prompts_file else None
        sets.append(EvalSet(name, set_root, str(d.split), recs, bad, bool(d.binary_as_one_object),
                            list(d.modes) if d.modes else list(ev.modes), pf))
    return sets


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


def start_model(cfg: DictConfig) -> PromptableSam:
    """The model of ``cfg.model`` with its starting checkpoint."""
    return build_model(cfg.model.type, checkpoint=cfg.model.get("checkpoint"), arch=cfg.model.get("arch"),
                       seed=int(cfg.seed))


def finish_run(run_dir: Path, job: EvalJob, metrics: dict, meta: dict | None = None) -> dict:
    """Write the report and ``metrics.json`` (what ``scripts/summarize.py`` reads); return all metrics."""
    report = job.write_report(meta)
    metrics = {**metrics, **report_metrics(report)}
    atomic_write_json(run_dir / "metrics.json", {k: (None if v != v else v) for k, v in metrics.items()})
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()  # the next job of a multirun must not log into this run
    log.info("Report written to %s", run_dir / "report.md")
    return metrics


def train(cfg: DictConfig) -> dict:
    """Run the job that ``cfg`` describes; return its metrics (``val/miou`` for sweepers).

    Under DDP (``trainer=ddp``) only global rank 0 evaluates and writes the report; other ranks only train.
    """
    if cfg.get("engine"):
        return train_engine(cfg)
    run_dir, resume_ckpt = start_run(cfg)
    root, records, skipped = prepare_data(cfg)
    if cfg.data.get("labeled_fraction") is not None or cfg.data.get("labeled_ids") is not None:
        from samtune.engine.split import split_labeled

        records["train_split"], unlabeled = split_labeled(
            records["train_split"], fraction=cfg.data.get("labeled_fraction"), ids=cfg.data.get("labeled_ids"),
            seed=int(cfg.seed))
        log.info("Training on the %d labelled images only (%d left unlabelled; the data engine uses them: "
                 "engine=default)", len(records["train_split"]), len(unlabeled))
    model = start_model(cfg)
    if not is_global_zero():  # a DDP rank > 0 (started by Lightning's launcher, srun or torchrun)
        return fit(cfg, run_dir, model, records, resume_ckpt) if cfg.train else {}
    job = EvalJob(cfg, run_dir, eval_sets(cfg, root, records, skipped))
    job.evaluate(model, "zero_shot")
    metrics: dict = {}
    if cfg.train:
        metrics = fit(cfg, run_dir, model, records, resume_ckpt)
        if not is_global_zero():  # Lightning's launcher on another node: known only once DDP is set up
            return metrics
        save_sam_weights(model.sam, run_dir / "checkpoints" / "finetuned_sam.pth")
        job.evaluate(model, "finetuned")
    metrics.setdefault("val/miou", metrics.get("val/miou_best", float("nan")))
    return finish_run(run_dir, job, metrics)


def train_engine(cfg: DictConfig) -> dict:
    """The data engine (``engine=...``): zero-shot evaluation, then its rounds (resumed after the last completed
    one), then the report with the final round as ``finetuned`` and a per-round table."""
    from samtune.engine.runner import check_engine_config, find_engine_run, run_engine

    check_engine_config(cfg)
    if int(cfg.trainer.get("devices", 1) or 1) > 1 or int(cfg.trainer.get("num_nodes", 1) or 1) > 1:
        raise ValueError("engine: the data engine runs on one device (trainer.devices=1); its rounds alternate "
                         "mask generation and training, which DDP would repeat on every rank")
    run_dir, _ = start_run(cfg, allow_resume=False)
    target = find_engine_run(run_dir)
    if target != run_dir:
        atomic_write_text(run_dir / "RESUMED_INTO.txt", f"{target}\n")
        OmegaConf.update(cfg, "paths.output_dir", str(target))
        run_dir = target
    root, records, skipped = prepare_data(cfg)
    model = start_model(cfg)
    job = EvalJob(cfg, run_dir, eval_sets(cfg, root, records, skipped))
    job.evaluate(model, "zero_shot")
    if not cfg.train:
        return finish_run(run_dir, job, {})
    engine = run_engine(cfg, run_dir, model, records, job, root)
    last = f"round_{len(engine['rounds']) - 1}"
    for results in job.results.values():
        if last in results:
            results["finetuned"] = results.pop(last)
        for name in [n for n in results if n.startswith("round_")]:
            results.pop(name)
    if last in job.volumes:
        job.volumes["finetuned"] = job.volumes.pop(last)
    job.volumes = {n: v for n, v in job.volumes.items() if not n.startswith("round_")}
    job.engine = engine
    save_sam_weights(model.sam, run_dir / "checkpoints" / "finetuned_sam.pth")
    return finish_run(run_dir, job, {"val/miou": float("nan")})


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate ``model.checkpoint`` (as ``zero_shot``) and optionally ``finetuned=PATH`` (as ``finetuned``) on
    ``eval.split`` and the extra sets; write the same report as training. Returns the test figures."""
    run_dir, _ = start_run(cfg, allow_resume=False)
    root, records, skipped = prepare_data(cfg, training=False)
    model = start_model(cfg)
    job = EvalJob(cfg, run_dir, eval_sets(cfg, root, records, skipped))
    job.evaluate(model, "zero_shot")
    meta = {}
    if cfg.get("finetuned"):
        path = Path(hydra.utils.to_absolute_path(str(cfg.finetuned)))
        load_sam_weights(model.sam, path, model_type=cfg.model.type)
        log.info("Loaded the fine-tuned weights %s", path)
        job.evaluate(model, "finetuned")
        meta["finetuned_checkpoint"] = str(path)
    return finish_run(run_dir, job, {}, meta)
