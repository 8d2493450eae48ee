"""The data engine: supervised, then semi-supervised, then pseudo-label rounds (``python train.py experiment=pcb_data_engine``).

Rounds, each in ``<run dir>/engine/round_<k>/``:

* round 0, ``supervised``: fine-tune on the labelled images (``data.labeled_fraction`` / ``data.labeled_ids``);
* round 1, ``semi_supervised`` (``engine.semi.enabled``, ``finetune=decoder_only`` only): labelled and unlabelled
  images together; the current model proposes objects on the unlabelled images (``proposals.json``, only to place
  box prompts) and an EMA teacher supervises the student on its confident pixels (see ``SamTuneModule``);
* rounds 2.., ``pseudo_label`` (``engine.rounds`` of them): automatic mask generation on (``engine.max_images_per_round``
  of) the unlabelled images with the current model, kept by predicted IoU and stability (``pseudo_labels.json``, COCO
  RLE with provenance per mask), then retraining on labelled + pseudo-labelled masks (weighted ``engine.pseudo_weight``).
  Thresholds that keep nothing are chosen on the validation split instead (``engine.thresholds_from_val=auto``), for
  a mean IoU of the kept masks with the labels of ``engine.val_target_iou``.

Every round continues from the previous round's weights, writes ``model.pth`` and its test figures, and ends
with ``DONE.json``; a round that beats its starting weights on validation in no epoch, or a pseudo-label round with
no pseudo-label, keeps its starting weights (``engine.keep_previous_if_worse``). Starting the same command again
resumes after the last completed round (a round that was killed during training continues from its
``checkpoints/last.ckpt``); completed rounds are never rewritten and the labelled data is only read. The hidden
labels of the "unlabelled" images, when the data has them, are used only to measure the quality of the
pseudo-labels.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from samtune.annotate.store import ReviewStore
from samtune.data.records import ImageRecord
from samtune.engine.pseudo import (
    Thresholds,
    checkpoint_hash,
    choose_thresholds,
    hidden_label_quality,
    propose,
    pseudo_records,
    write_pseudo_labels,
)
from samtune.engine.review import drop_superseded, load_reviews
from samtune.engine.settings import EngineSettings, engine_settings
from samtune.engine.settings import stages as round_stages
from samtune.engine.simulated import simulate_review
from samtune.engine.split import split_labeled
from samtune.evaluation.job import MAIN, EvalJob
from samtune.model.checkpoint import load_sam_weights, save_sam_weights
from samtune.predict.segmenter import Segmenter
from samtune.predict.zoom import zoom_config
from samtune.training.finetune_modes import finetune_mode
from samtune.training.fit import fit
from samtune.training.run_dir import run_overrides
from samtune.utils.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

def plan(engine: DictConfig) -> list[str]:
    """The stage of each round (:func:`samtune.engine.settings.stages`)."""
    return list(round_stages(engine))


def check_engine_config(cfg: DictConfig) -> EngineSettings:
    """Refuse a bad engine configuration before anything runs (not after an hour of proposals); return the
    settings read."""
    settings = engine_settings(cfg.engine)
    mode = finetune_mode(cfg.finetune.get("mode"))
    if settings.semi is not None and not mode.encoder_frozen:
        raise ValueError(f"engine.semi.enabled=true needs finetune=decoder_only (got finetune={mode.name}): the EMA "
                         "teacher shares the student's frozen image encoder; set engine.semi.enabled=false to adapt "
                         "the encoder")
    return settings


def find_engine_run(current_dir: Path) -> Path:
    """The run directory to continue: ``current_dir`` if it holds an engine, else the newest sibling run of the
    same command (same overrides) with an unfinished engine, else ``current_dir``."""
    if (current_dir / "engine").is_dir():
        return current_dir
    wanted = run_overrides(current_dir)
    if current_dir.parent.is_dir():
        for run in sorted((p for p in current_dir.parent.iterdir() if p.is_dir() and p != current_dir), reverse=True):
            if (run / "engine").is_dir() and not (run / "engine" / "FINISHED.json").is_file() and run_overrides(run) == wanted:
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
    settings = check_engine_config(cfg)
    stages = list(settings.stages)
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
    # nor the stages its rounds were made as (more rounds after them may be added: engine.rounds raised)
    before = read_json(edir / "plan.json").get("stages") if (edir / "plan.json").is_file() else None
    if before is not None and before != stages[: len(before)]:
        raise ValueError(f"{edir / 'plan.json'}: this run's rounds were {before}, the configuration now gives "
                         f"{stages} (engine.rounds / engine.semi.enabled changed); start a new run (another "
                         "hydra.run.dir) instead of resuming this one")
    if before != stages:
        atomic_write_json(edir / "plan.json", {"stages": stages})
    binary = bool(d.binary_as_one_object)
    amg = settings.amg
    from_val = settings.thresholds_from_val
    keep_previous = settings.keep_previous_if_worse
    review_dir = None if settings.review is None else (
        edir / "reviews_simulated" if settings.review == "simulated" else Path(settings.review))
    if settings.review == "simulated":
        ReviewStore(review_dir)  # the simulated reviewer's folder, made before the first round reads it
    start_weights = edir / "start_model.pth"  # round 0's starting point, should round 0 not beat it on val
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
        elif keep_previous and not start_weights.is_file():
            save_sam_weights(model.sam, start_weights)
        info: dict = {"round": k, "stage": stage}
        train_records: list[ImageRecord] = list(labeled)
        module_kwargs: dict = {}
        # people's decisions so far (engine.review): reviewed images get no proposal; their masks train as labels
        reviews = load_reviews(review_dir, unlabeled) if review_dir is not None else None
        pool = [r for r in unlabeled if reviews is None or r.rel_path not in reviews.reviewed]
        if stage in ("semi_supervised", "pseudo_label"):
            model_hash = checkpoint_hash(weights) if weights is not None else "start"
            images = _round_images(pool, settings.max_images_per_round, seed=int(cfg.seed) + k)
            if stage == "pseudo_label":
                name, weight, kind = "pseudo_labels.json", settings.pseudo_weight, "pseudo"
            else:
                name, weight, kind = "proposals.json", 1.0, "teacher"
                module_kwargs["teacher"] = dict(settings.semi.teacher)
            path = rdir / name
            if not path.is_file():  # written once per round, then reused when the round is resumed
                proposals = propose(model, images, amg, desc=f"round {k}: proposals on {len(images)} images")
                if stage == "pseudo_label":
                    thresholds: Thresholds | None = Thresholds(settings.pred_iou_thresh,
                                                               settings.stability_score_thresh)
                    fixed_keep = sum(thresholds.keeps(m) for ms in proposals.values() for m in ms)
                    if from_val is True or (from_val == "auto" and fixed_keep == 0):
                        if from_val == "auto":
                            log.warning("Round %d: the fixed thresholds %s keep none of %d proposals; choosing them on "
                                        "the validation split (engine.thresholds_from_val=auto)", k,
                                        thresholds.as_dict(), sum(map(len, proposals.values())))
                        thresholds, info["threshold_choice"] = _thresholds_from_val(
                            model, records["val_split"], settings, k, binary, thresholds)
                else:
                    thresholds = Thresholds(settings.semi.prompt_iou_thresh, settings.semi.prompt_stability_thresh)
                kept = {p: [m for m in ms if thresholds is not None and thresholds.keeps(m)]
                        for p, ms in proposals.items()}
                n_prop, n_kept = sum(map(len, proposals.values())), sum(map(len, kept.values()))
                quality = hidden_label_quality(images, kept, binary) if settings.measure_hidden_labels else {}
                if settings.simulated is not None and stage == "pseudo_label":
                    # the simulated reviewer goes through this round's proposals (its own reviews folder)
                    was_training = model.training
                    model.eval()
                    effort = simulate_review(Segmenter(model, zoom_config(cfg.eval)), images, proposals,
                                             ReviewStore(review_dir), settings.simulated, binary_as_one_object=binary,
                                             model_sha256=model_hash)
                    model.train(was_training)
                    atomic_write_json(rdir / "simulated_review.json", effort)
                    log.info("Round %d: the simulated reviewer spent %d of %d actions: %s", k, effort["actions"],
                             effort["budget"], effort)
                write_pseudo_labels(path, images, kept, round_index=k, stage=stage, model_hash=model_hash,
                                    thresholds=thresholds, root=root)
                every = [m for ms in proposals.values() for m in ms]
                atomic_write_json(rdir / "pseudo_stats.json", {
                    "proposed": n_prop, "kept": n_kept, "rejected": n_prop - n_kept,
                    "thresholds": thresholds.as_dict() if thresholds is not None else None,
                    "threshold_choice": info.get("threshold_choice"),
                    "images_proposed": len(images), "images_with_masks": sum(1 for v in kept.values() if v),
                    # against the hidden labels of the unlabelled images (measured, never trained on)
                    "kept_hidden_iou": quality.get("mean_iou"), "kept_precision50": quality.get("precision"),
                    "hidden_objects": quality.get("objects"), "hidden_recall50": quality.get("recall"),
                    # the best scores any proposal reached: why a round keeps nothing
                    "best_pred_iou": max((m.predicted_iou for m in every), default=None),
                    "best_stability": max((m.stability_score for m in every), default=None),
                })
            info.update({key: v for key, v in read_json(rdir / "pseudo_stats.json").items() if v is not None})
            if info["kept"] == 0:
                log.warning("Round %d (%s) keeps no proposal: %s", k, stage,
                            _why_nothing({**info, "zoomed": amg.get("zoom") is not None}))
            extra = pseudo_records(path, images, weight=weight, kind=kind)
            if review_dir is not None:  # no pseudo-label where a person rejected or already gave that mask
                reviews = load_reviews(review_dir, unlabeled)
                extra, dropped = drop_superseded(extra, reviews.superseded)
                info["review"] = {**reviews.counts, "pseudo_dropped": dropped}
                if (rdir / "simulated_review.json").is_file():
                    info["review"]["simulated"] = read_json(rdir / "simulated_review.json")
            log.info("Round %d (%s): %d of %d proposed masks kept on %d images%s", k, stage, info["kept"],
                     info["proposed"], len(extra), _quality_note(info))
            train_records += extra
        if reviews is not None:
            train_records += reviews.labeled
            info.setdefault("review", dict(reviews.counts))
            log.info("Round %d: reviews in %s: %s (their masks train as labels)", k, review_dir, info["review"])
        if stage == "pseudo_label" and info["kept"] == 0 and keep_previous and not (reviews and reviews.labeled):
            # nothing beyond the labelled images, which the rounds before trained on to their best validation epoch
            log.warning("Round %d (%s): no pseudo-label to train on; the round keeps its starting weights", k, stage)
            info["kept_previous"] = True
            train_records = []
        else:
            last = rdir / "checkpoints" / "last.ckpt"
            metrics = fit(_round_cfg(cfg, rdir), rdir, model,
                          {"train_split": train_records, "val_split": records["val_split"]},
                          last if last.is_file() else None, module_kwargs=module_kwargs)
            gain = metrics.get("val/min_gain_best")
            if gain is not None:
                info["val_min_gain"] = gain
            if keep_previous and gain is not None and gain < 0:
                # no epoch of this round beat its starting weights on every validated prompt mode: keep those
                load_sam_weights(model.sam, weights if weights is not None else start_weights,
                                 model_type=cfg.model.type)
                info["kept_previous"] = True
                log.warning("Round %d (%s): no epoch beat the round's starting model on validation (best smallest "
                            "gain over the prompt modes %.4f); the round keeps its starting weights "
                            "(engine.keep_previous_if_worse)", k, stage, gain)
        save_sam_weights(model.sam, rdir / "model.pth")
        weights = rdir / "model.pth"
        result = job.evaluate(model, f"round_{k}")[MAIN]
        info["test"] = {m: v["miou"] for m, v in result.summary.items()}
        info["n_train_images"] = len(train_records)
        atomic_write_json(done, info)
        rounds.append(info)
    atomic_write_json(edir / "FINISHED.json", {"rounds": len(stages)})
    return {"rounds": rounds, "labeled": len(labeled), "unlabeled": len(unlabeled)}


def _round_images(unlabeled: list[ImageRecord], limit, *, seed: int) -> list[ImageRecord]:
    """The unlabelled images a round proposes on: all, or ``engine.max_images_per_round`` of them drawn with the
    round's seed (another draw each round), in their original order."""
    if limit is None or int(limit) >= len(unlabeled):
        return list(unlabeled)
    if int(limit) < 1:
        raise ValueError(f"engine.max_images_per_round must be >= 1 or null, got {limit}")
    chosen = set(random.Random(seed).sample(range(len(unlabeled)), int(limit)))
    return [r for i, r in enumerate(unlabeled) if i in chosen]


def _thresholds_from_val(model, val: list[ImageRecord], settings: EngineSettings, k: int, binary: bool,
                         fixed: Thresholds) -> tuple[Thresholds | None, dict | None]:
    """Thresholds chosen on (up to ``engine.max_val_images`` of) the validation images' proposals."""
    if not val:
        log.warning("Round %d: no validation split to choose thresholds on; keeping %s", k, fixed.as_dict())
        return fixed, None
    limit, target_iou = settings.max_val_images, settings.val_target_iou
    val = val if limit is None else val[:limit]
    props = propose(model, val, settings.amg, desc=f"round {k}: proposals on {len(val)} validation images")
    thresholds, choice = choose_thresholds(props, val, binary_as_one_object=binary, target_iou=target_iou)
    if thresholds is None:
        log.warning("Round %d: no thresholds keep validation proposals of mean IoU >= %g with the labels (the best "
                    "any pair reached: %s); the round keeps no pseudo-label", k, target_iou, _fmt(choice["best_mean_iou"]))
    else:
        log.info("Round %d: thresholds chosen on %d validation images: %s (kept there %d, mean IoU %s, precision %s "
                 "at IoU %g)", k, len(val), thresholds.as_dict(), choice["kept"], _fmt(choice["mean_iou"]),
                 _fmt(choice["precision"]), choice["good_iou"])
    return thresholds, {**choice, "val_images": len(val)}


def _why_nothing(info: dict) -> str:
    """Why a round kept no proposal: the thresholds, the best scores seen, what validation said."""
    choice = info.get("threshold_choice")
    seen = (f"of {info['proposed']}, the best predicted IoU was {_fmt(info.get('best_pred_iou'))} and the best "
            f"stability {_fmt(info.get('best_stability'))}")
    if choice and choice.get("target_iou") is not None:
        chosen = info.get("thresholds") or ("none reach it, the best any pair reached was "
                                            + _fmt(choice.get("best_mean_iou")))
        return (f"{seen}; thresholds chosen on the validation split for kept masks of mean IoU >= "
                f"{choice['target_iou']:g} with the labels ({chosen}); engine.val_target_iou lowers the bar"
                + ("" if info.get("zoomed") else ", engine.amg.zoom segments each proposal again in prompt-focused "
                   "zoom"))
    if choice:
        return (f"{seen} against thresholds {info.get('thresholds')} chosen on the validation split, where the best F1 "
                f"of any pair was {_fmt(choice.get('f1'))} (precision {_fmt(choice.get('precision'))}, recall "
                f"{_fmt(choice.get('recall'))} at IoU {choice['good_iou']:g})"
                + ("" if info.get("zoomed") else "; engine.amg.zoom segments each proposal again in prompt-focused "
                   "zoom"))
    return (f"{seen} against thresholds {info.get('thresholds')}; lower them, or engine.thresholds_from_val=true "
            "chooses them on the validation split")


def _quality_note(info: dict) -> str:
    if info.get("kept_hidden_iou") is None:
        return ""
    return (f"; against the hidden labels: mean IoU {_fmt(info['kept_hidden_iou'])}, precision "
            f"{_fmt(info.get('kept_precision50'))} and recall {_fmt(info.get('hidden_recall50'))} at IoU 0.5")


def _fmt(v: float | None) -> str:
    return "none" if v is None else f"{v:.3f}"
