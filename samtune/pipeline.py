"""``train(cfg) -> metrics``: the whole job that ``python train.py`` runs.

1. scan and validate the dataset (generating the built-in one on first use);
2. build the model and load its starting checkpoint;
3. fix the evaluation prompts (``prompts.json``) and evaluate the starting model ("zero_shot"), on the
   evaluation split and on the ``eval.extra_sets``;
4. fine-tune with Lightning (resumable);
5. evaluate the fine-tuned model on the same prompts ("finetuned") and write the report.

``evaluate(cfg)`` (``scripts/evaluate.py``) is the same without step 4: it evaluates ``model.checkpoint`` and,
with ``finetuned=PATH``, a second checkpoint on the same prompts. ``train_engine(cfg)`` is the data engine's job.

This module is only the order of the steps: the dataset is resolved in :mod:`samtune.data.resolve`, the
evaluation sets and report in :mod:`samtune.evaluation.job`, the Lightning wiring in :mod:`samtune.training.fit`
and the engine's rounds in :mod:`samtune.engine.runner`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from samtune.data.resolve import prepare_data
from samtune.engine.runner import check_engine_config, find_engine_run, run_engine
from samtune.evaluation.job import EvalJob, eval_sets, report_metrics
from samtune.model.checkpoint import load_sam_weights, save_sam_weights
from samtune.model.factory import start_model
from samtune.training.distributed import is_global_zero
from samtune.training.fit import fit, start_run
from samtune.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


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
    job.set_engine(engine, final=f"round_{len(engine['rounds']) - 1}")
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
