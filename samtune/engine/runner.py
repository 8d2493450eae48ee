"""The data engine: supervised, then semi-supervised, then pseudo-label rounds (``python train.py experiment=pcb_data_engine``).

Rounds, each in ``<run dir>/engine/round_<k>/``:

* round 0, ``supervised``: fine-tune on the labelled images (``data.labeled_fraction`` / ``data.labeled_ids``);
* round 1, ``semi_supervised`` (``engine.semi.enabled``): labelled and unlabelled images together; the current
  model proposes objects on the unlabelled images (``proposals.json``, only to place box prompts) and an EMA
  teacher supervises the student on its confident pixels (see ``SamTuneModule``);
* rounds 2.., ``pseudo_label`` (``engine.rounds`` of them): automatic mask generation on the unlabelled
  images with the current model, kept by predicted IoU and stability (``pseudo_labels.json``, COCO RLE with
  provenance per mask), then retraining on labelled + pseudo-labelled masks (weighted ``engine.pseudo_weight``).

Every round continues from the previous round's weights, writes ``model.pth`` and its test figures, and ends
with ``DONE.json``. Starting the same command again resumes after the last completed round (a round that was
killed during training continues from its ``checkpoints/last.ckpt``); completed rounds are never rewritten and
the labelled data is only read. The hidden labels of the "unlabelled" images, when the data has them, are used
only to measure the quality of the pseudo-labels.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from samtune.data.records import ImageRecord
from samtune.engine.pseudo import (
    Thresholds,
    checkpoint_hash,
    choose_thresholds,
    hidden_label_iou,
    propose,
    pseudo_records,
    write_pseudo_labels,
)
from samtune.engine.split import split_labeled
from samtune.evaluation.job import MAIN, EvalJob
from samtune.model.checkpoint import load_sam_weights, save_sam_weights
from samtune.utils.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

STAGES = ("supervised", "semi_supervised", "pseudo_label")


def plan(engine: DictConfig) -> list[str]:
    """The stage of each round."""
    rounds = int(engine.rounds)
    if rounds < 0:
        raise ValueError(f"engine.rounds must be >= 0, got {rounds}")
    semi = engine.get("semi") or {}
    return ["supervised", *(["semi_supervised"] if semi.get("enabled", False) else []), *["pseudo_label"] * rounds]


def find_engine_run(current_dir: Path) -> Path:
    """The run directory to continue: ``current_dir`` if it holds an engine, else the newest sibling run of the
    same command (same overrides) with an unfinished engine, else ``current_dir``."""
    from samtune.training.run_dir import _overrides

    if (current_dir / "engine").is_dir():
        return current_dir
    wanted = _overrides(current_dir)
    if current_dir.parent.is_dir():
        for run in sorted((p for p in current_dir.parent.iterdir() if p.is_dir() and p != current_dir), reverse=True):
            if (run / "engine").is_dir() and not (run / "engine" / "FINISHED.json").is_file() and _overrides(run) == wanted:
                log.info("Continuing the data engine of %s", run)
                return run
    return current_dir


def _round_cfg(cfg: DictConfig, round_dir: Path) -> DictConfig:
    """``cfg`` with checkpoints and logs of the round in its own folder."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    OmegaConf.update(c, "paths.output_dir", str(round_dir))
    return c


def run_engine(cfg: DictConfig, run_dir: Path, model, records: dict, job: EvalJob, root: Path) -> dict:
    """Run (or continue) the engine in ``run_dir``; return the flat metrics of the final model."""
    from samtune.pipeline import fit

    engine = cfg.engine
    stages = plan(engine)
    d = cfg.data
    labeled, unlabeled = split_labeled(records["train_split"], fraction=d.get("labeled_fraction"),
                                       ids=d.get("labeled_ids"), seed=int(cfg.seed))
    log.info("Data engine: %d labelled and %d unlabelled training images; rounds %s", len(labeled), len(unlabeled),
             list(enumerate(stages)))
    if not unlabeled and len(stages) > 1:
        raise ValueError("the data engine needs unlabelled images: set data.labeled_fraction < 1 (or "
                         "data.labeled_ids) so that part of the training split is treated as unlabelled")
    edir = run_dir / "engine"
    edir.mkdir(parents=True, exist_ok=True)
    split = {"labeled": [r.rel_path for r in labeled], "unlabeled": [r.rel_path for r in unlabeled]}
    if (edir / "split.json").is_file():  # a resumed engine must keep the split its rounds were made with
        if read_json(edir / "split.json") != split:
            raise ValueError(f"{edir / 'split.json'}: the labelled/unlabelled split of this run differs from the one "
                             "now computed (training images or data.labeled_fraction/labeled_ids/seed changed); "
                             "start a new run (another hydra.run.dir) instead of resuming this one")
    else:
        atomic_write_json(edir / "split.json", split)
    binary = bool(d.binary_as_one_object)
    amg = OmegaConf.to_container(engine.amg, resolve=True)
    weights = None  # path of the latest round's model
    rounds: list[dict] = []
    for k, stage in enumerate(stages):
        rdir = edir / f"round_{k}"
        done = rdir / "DONE.json"
        if done.is_file():
            rounds.append(read_json(done))
            weights = rdir / "model.pth"
            log.info("Round %d (%s) is complete; skipping it", k, stage)
            continue
        rdir.mkdir(parents=True, exist_ok=True)
        if weights is not None:
            load_sam_weights(model.sam, weights, model_type=cfg.model.type)
        info: dict = {"round": k, "stage": stage}
        train_records: list[ImageRecord] = list(labeled)
        module_kwargs: dict = {}
        if stage in ("semi_supervised", "pseudo_label"):
            model_hash = checkpoint_hash(weights) if weights is not None else "start"
            if stage == "pseudo_label":
                thresholds = Thresholds(float(engine.pred_iou_thresh), float(engine.stability_score_thresh))
                if engine.get("thresholds_from_val") and records["val_split"]:
                    val_props = propose(model, records["val_split"], amg, desc=f"round {k}: validation proposals")
                    thresholds, info["threshold_choice"] = choose_thresholds(val_props, records["val_split"],
                                                                             binary_as_one_object=binary)
                    log.info("Round %d: thresholds chosen on validation: %s (%s)", k, thresholds.as_dict(),
                             info["threshold_choice"])
                name, weight, kind = "pseudo_labels.json", float(engine.pseudo_weight), "pseudo"
            else:
                thresholds = Thresholds(float(engine.semi.prompt_iou_thresh), float(engine.semi.prompt_stability_thresh))
                name, weight, kind = "proposals.json", 1.0, "teacher"
                module_kwargs["teacher"] = {key: engine.semi[key] for key in ("ema", "confidence", "feature_dropout", "weight")}
            path = rdir / name
            if not path.is_file():  # written once per round, then reused when the round is resumed
                proposals = propose(model, unlabeled, amg, desc=f"round {k}: proposals")
                kept = {p: [m for m in ms if thresholds.keeps(m)] for p, ms in proposals.items()}
                n_prop, n_kept = sum(map(len, proposals.values())), sum(map(len, kept.values()))
                quality = hidden_label_iou(unlabeled, kept, binary) if engine.get("measure_hidden_labels", True) else []
                write_pseudo_labels(path, unlabeled, kept, round_index=k, stage=stage, model_hash=model_hash,
                                    thresholds=thresholds, root=root)
                every = [m for ms in proposals.values() for m in ms]
                atomic_write_json(rdir / "pseudo_stats.json", {
                    "proposed": n_prop, "kept": n_kept, "rejected": n_prop - n_kept, "thresholds": thresholds.as_dict(),
                    "kept_hidden_iou": (sum(quality) / len(quality)) if quality else None,
                    "images_with_masks": sum(1 for v in kept.values() if v),
                    # the best scores any proposal reached: why a round keeps nothing
                    "best_pred_iou": max((m.predicted_iou for m in every), default=None),
                    "best_stability": max((m.stability_score for m in every), default=None),
                })
            info.update(read_json(rdir / "pseudo_stats.json"))
            if info["kept"] == 0:
                choice = info.get("threshold_choice")
                how = ("engine.thresholds_from_val=true chooses them on the validation split" if choice is None else
                       f"chosen on the validation split, where the best F1 of any pair was {_fmt(choice['f1'])} "
                       f"(precision {_fmt(choice['precision'])}, recall {_fmt(choice['recall'])} at IoU "
                       f"{choice['good_iou']:g}); engine.amg.zoom segments each proposal again in prompt-focused zoom)")
                log.warning("Round %d (%s) keeps no proposal: of %d, the best predicted IoU was %s and the best "
                            "stability %s against thresholds %s; %s", k, stage, info["proposed"],
                            _fmt(info.get("best_pred_iou")), _fmt(info.get("best_stability")), thresholds.as_dict(),
                            how if choice is not None else "lower them, or " + how)
            extra = pseudo_records(path, unlabeled, weight=weight, kind=kind)
            log.info("Round %d (%s): %d of %d proposed masks kept on %d images", k, stage, info["kept"],
                     info["proposed"], len(extra))
            train_records += extra
        last = rdir / "checkpoints" / "last.ckpt"
        fit(_round_cfg(cfg, rdir), rdir, model, {"train_split": train_records, "val_split": records["val_split"]},
            last if last.is_file() else None, module_kwargs=module_kwargs)
        save_sam_weights(model.sam, rdir / "model.pth")
        weights = rdir / "model.pth"
        result = job.evaluate(model, f"round_{k}")[MAIN]
        info["test"] = {m: v["miou"] for m, v in result.summary.items()}
        info["n_train_images"] = len(train_records)
        atomic_write_json(done, info)
        rounds.append(info)
    atomic_write_json(edir / "FINISHED.json", {"rounds": len(stages)})
    return {"rounds": rounds, "labeled": len(labeled), "unlabeled": len(unlabeled)}


def _fmt(v: float | None) -> str:
    return "none" if v is None else f"{v:.3f}"
