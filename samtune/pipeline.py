"""``train(cfg) -> metrics``: the whole job that ``python train.py`` runs.

1. scan and validate the dataset (generating the built-in one on first use);
2. build the model and load its starting checkpoint;
3. fix the evaluation prompts (``prompts.json``) and evaluate the starting model ("zero_shot");
4. fine-tune with Lightning (resumable);
5. evaluate the fine-tuned model on the same prompts ("finetuned") and write the report.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from samtune.data.records import ImageRecord, load_record
from samtune.data.sources import build_records
from samtune.evaluation.evaluator import EvalResult, evaluate_model
from samtune.evaluation.report import save_overlays, write_report
from samtune.evaluation.zoom import ZoomConfig
from samtune.model.checkpoint import save_sam_weights
from samtune.model.factory import build_model
from samtune.model.promptable_sam import PromptableSam
from samtune.prompts import PromptPolicy, PromptSimulator, load_prompts, make_instance_prompts, save_prompts
from samtune.training.datamodule import SamDataModule
from samtune.training.module import SamTuneModule
from samtune.training.run_dir import find_resumable_run
from samtune.utils.io import atomic_write_json, atomic_write_text, read_json
from samtune.utils.progress import progress

log = logging.getLogger(__name__)


def resolve_precision(precision: str | int) -> str | int:
    """``auto``: bf16-mixed on GPUs that support it, 16-mixed on older GPUs, 32-true on CPU."""
    if str(precision) != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def prepare_data(cfg: DictConfig) -> tuple[Path, dict[str, list[ImageRecord]], list[dict]]:
    """Generate the built-in dataset if configured, then scan train/val/test records."""
    d = cfg.data
    if d.root is None or str(d.root) in ("", "???"):
        raise ValueError("data.root is not set: pass data.root=DIR (see README: your own dataset)")
    root = Path(hydra.utils.to_absolute_path(str(d.root)))
    if d.get("generator"):
        from samtune.data import synthetic_medical, synthetic_pcb

        makers = {"pcb": synthetic_pcb.ensure_pcb_dataset, "medical": synthetic_medical.ensure_medical_dataset}
        if d.generator not in makers:
            raise ValueError(f"data.generator={d.generator!r} is not one of {sorted(makers)}")
        makers[d.generator](root, **OmegaConf.to_container(d.get("generator_params") or {}))
    records: dict[str, list[ImageRecord]] = {}
    skipped: list[dict] = []
    for key in ("train_split", "val_split", "test_split"):
        split = d[key]
        if key == "val_split" and not (root / split).is_dir():
            log.warning("No %s split under %s: training runs without validation.", split, root)
            records[key] = []
            continue
        recs, bad = build_records(
            d.source, root, split, skip_invalid=bool(d.skip_invalid), binary_as_one_object=bool(d.binary_as_one_object)
        )
        records[key], skipped = recs, skipped + bad
        log.info("%s split %s: %d images%s", d.source, split, len(recs), f", {len(bad)} skipped" if bad else "")
    return root, records, skipped


def fixed_prompts(cfg: DictConfig, run_dir: Path, records: list[ImageRecord]) -> tuple[dict, Path]:
    """Prompts shared by every evaluated model: from ``eval.prompts_file``, the run's ``prompts.json``, or new."""
    if cfg.eval.get("prompts_file"):
        path = Path(hydra.utils.to_absolute_path(str(cfg.eval.prompts_file)))
        prompts = load_prompts(path)
        missing = [r.rel_path for r in records if r.rel_path not in prompts]
        if missing:
            raise ValueError(f"eval.prompts_file={path} has no prompts for {len(missing)} images, e.g. {missing[:3]}")
        return prompts, path
    path = run_dir / "prompts.json"
    if path.exists():
        return load_prompts(path), path
    prompts = {}
    for r in progress(records, desc="prompts"):
        _, instances = load_record(r, binary_as_one_object=bool(cfg.data.binary_as_one_object))
        prompts[r.rel_path] = make_instance_prompts(instances, seed=int(cfg.eval.prompt_seed), key=r.rel_path)
    save_prompts(path, prompts, seed=int(cfg.eval.prompt_seed))
    return prompts, path


def zoom_config(cfg: DictConfig) -> ZoomConfig | None:
    """``eval.zoom``: null (whole image), a context factor, or a mapping of :class:`ZoomConfig` fields."""
    z = cfg.eval.get("zoom")
    if z is None or z is False:
        return None
    if isinstance(z, (int, float)):
        return ZoomConfig(context=float(z), min_frac=float(cfg.eval.get("zoom_min_frac", 0.2)))
    return ZoomConfig(**OmegaConf.to_container(z))


def run_eval(cfg: DictConfig, run_dir: Path, model: PromptableSam, name: str, records, prompts) -> EvalResult:
    """Evaluate and cache the result in ``eval/<name>.json`` so a resumed run does not redo it."""
    cache = run_dir / "eval" / f"{name}.json"
    if cache.exists():
        data = read_json(cache)
        log.info("Reusing %s evaluation from %s", name, cache)
        return EvalResult(summary=data["summary"], rows=data["rows"])
    keep = [r.rel_path for r in records[: int(cfg.eval.overlays)]]
    result = evaluate_model(
        model, records, prompts, name=name, modes=list(cfg.eval.modes),
        binary_as_one_object=bool(cfg.data.binary_as_one_object), save_masks=bool(cfg.eval.save_masks),
        keep_masks=keep, zoom=zoom_config(cfg),
    )
    atomic_write_json(cache, {"summary": result.summary, "rows": result.rows})
    log.info("%s: %s", name, {m: round(v["miou"], 4) for m, v in result.summary.items()})
    return result


def fit(cfg: DictConfig, run_dir: Path, model: PromptableSam, records: dict, resume_ckpt: Path | None) -> dict:
    """Fine-tune ``model`` in place; return the best validation score and checkpoint paths."""
    datamodule = SamDataModule(
        records["train_split"], records["val_split"], img_size=model.img_size, augment=cfg.data.augment,
        batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, max_instances=cfg.data.max_instances,
        binary_as_one_object=bool(cfg.data.binary_as_one_object),
    )
    module = SamTuneModule(
        model,
        simulator=PromptSimulator(PromptPolicy(**OmegaConf.to_container(cfg.prompts))),
        loss=hydra.utils.instantiate(cfg.loss),
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        seed=int(cfg.seed),
        **OmegaConf.to_container(cfg.finetune),
    )
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not records["val_split"]:
        for c in callbacks:
            if isinstance(c, L.pytorch.callbacks.ModelCheckpoint):
                c.monitor = None
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=resolve_precision(cfg.trainer.precision),
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    ckpt_cb = trainer.checkpoint_callback
    best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb else ""
    score = getattr(ckpt_cb, "best_model_score", None) if ckpt_cb else None
    if cfg.eval.use_best and best and not cfg.trainer.get("fast_dev_run"):
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
        log.info("Evaluating the best validation checkpoint %s (val/miou=%s)", best, score)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if score is not None:
        metrics["val/miou_best"] = float(score)
    return metrics


def train(cfg: DictConfig) -> dict:
    """Run the job that ``cfg`` describes; return its metrics (``val/miou`` for sweepers)."""
    run_dir = Path(cfg.paths.output_dir)
    resume_ckpt = None
    if cfg.get("resume"):
        found = find_resumable_run(cfg.resume, run_dir)
        if found is not None:
            run_dir, resume_ckpt = found
            # Checkpoints, logs and the report continue in the run being resumed.
            OmegaConf.update(cfg, "paths.output_dir", str(run_dir))
            log.info("Resuming in %s from %s", run_dir, resume_ckpt)
            atomic_write_text(Path(cfg.paths.output_dir) / "RESUMED_INTO.txt", f"{run_dir}\n")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(int(cfg.seed), workers=True)

    root, records, skipped = prepare_data(cfg)
    split_keys = {cfg.data[k]: k for k in ("train_split", "val_split", "test_split")}
    if cfg.eval.split not in split_keys:
        raise ValueError(f"eval.split={cfg.eval.split!r} is none of the data splits {sorted(split_keys)}")
    test_records = records[split_keys[cfg.eval.split]]
    model = build_model(cfg.model.type, checkpoint=cfg.model.get("checkpoint"), arch=cfg.model.get("arch"), seed=int(cfg.seed))
    prompts, prompts_path = fixed_prompts(cfg, run_dir, test_records)

    results = {"zero_shot": run_eval(cfg, run_dir, model, "zero_shot", test_records, prompts)}
    metrics: dict = {}
    if cfg.train:
        metrics = fit(cfg, run_dir, model, records, resume_ckpt)
        save_sam_weights(model.sam, run_dir / "checkpoints" / "finetuned_sam.pth")
        results["finetuned"] = run_eval(cfg, run_dir, model, "finetuned", test_records, prompts)

    overlays = save_overlays(
        run_dir / "overlays", test_records[: int(cfg.eval.overlays)],
        {k: v for k, v in results.items() if v.masks}, binary_as_one_object=bool(cfg.data.binary_as_one_object),
    )
    meta = {
        "experiment": cfg.get("task_name"), "data_root": str(root), "split": cfg.eval.split,
        "n_images": len(test_records), "model_type": cfg.model.type, "checkpoint": cfg.model.get("checkpoint"),
        "prompts_file": str(prompts_path), "prompt_seed": int(cfg.eval.prompt_seed),
        "eval_note": zoom_config(cfg).describe() if zoom_config(cfg) else "whole image, SamPredictor preprocessing", "run_dir": str(run_dir),
    }
    report = write_report(run_dir, results, skipped_files=skipped, meta=meta, overlays=overlays)
    for name in ("zero_shot", "finetuned"):
        for mode, v in report.get(name, {}).items():
            metrics[f"test/{name}/{mode}_miou"] = v["miou"]
    metrics.setdefault("val/miou", metrics.get("val/miou_best", float("nan")))
    log.info("Report written to %s", run_dir / "report.md")
    return metrics
