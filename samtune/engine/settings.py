"""The data engine's settings (config group ``engine``), read and checked once into typed values.

:func:`engine_settings` is called before anything runs (:func:`samtune.engine.runner.check_engine_config`) and again
by the runner, so a bad value stops the job at once with the key named, never after an hour of proposals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from samtune.engine.simulated import ReviewerSettings

STAGES = ("supervised", "semi_supervised", "pseudo_label")
# what a partial engine config (a test's, a user's Python call) leaves out: configs/engine/default.yaml's values
DEFAULTS = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95, "pseudo_weight": 0.5,
            "semi.prompt_iou_thresh": 0.5, "semi.prompt_stability_thresh": 0.7}


@dataclass(frozen=True)
class SemiSettings:
    """``engine.semi``: the semi-supervised round (an EMA teacher on the unlabelled images).

    Attributes:
        teacher: ``ema``, ``confidence``, ``feature_dropout``, ``weight`` (:class:`samtune.training.teacher.EmaTeacher`).
        prompt_iou_thresh: Predicted IoU a proposal needs to place a box prompt.
        prompt_stability_thresh: Stability a proposal needs to place a box prompt.
    """

    teacher: dict
    prompt_iou_thresh: float
    prompt_stability_thresh: float


@dataclass(frozen=True)
class EngineSettings:
    """``engine.*`` (``configs/engine/default.yaml`` says what each does).

    Attributes:
        stages: The stage of each round: ``supervised``, then ``semi_supervised`` (``semi`` set), then ``rounds``
            times ``pseudo_label``.
        amg: Automatic mask generation of the proposals (``engine.amg``).
        pred_iou_thresh: SAM's fixed predicted-IoU filter of pseudo-labels.
        stability_score_thresh: SAM's fixed stability filter of pseudo-labels.
        thresholds_from_val: True, False or ``"auto"`` (choose on val only when the fixed thresholds keep nothing).
        val_target_iou: Mean IoU with the labels the kept val proposals must reach (None: best F1).
        max_images_per_round: Unlabelled images proposed on per round (None: all).
        max_val_images: Validation images the thresholds are chosen on (None: all).
        keep_previous_if_worse: A round that does not beat its start on val keeps its start.
        pseudo_weight: Loss weight of pseudo-labels.
        measure_hidden_labels: Measure kept proposals against the unlabelled images' hidden labels, when present.
        semi: The semi-supervised round's settings (None: no such round).
        review: A reviews folder of ``scripts/annotate.py`` whose decisions enter the rounds
            (:mod:`samtune.engine.review`); None: none.
    """

    stages: tuple[str, ...]
    amg: dict
    pred_iou_thresh: float
    stability_score_thresh: float
    thresholds_from_val: bool | str
    val_target_iou: float | None
    max_images_per_round: int | None
    max_val_images: int | None
    keep_previous_if_worse: bool
    pseudo_weight: float
    measure_hidden_labels: bool
    semi: SemiSettings | None
    review: str | None = None
    simulated: ReviewerSettings | None = None


def _whole_or_none(engine: Mapping, key: str) -> int | None:
    value = engine.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"engine.{key} must be a whole number >= 1 or null, got {value!r}")
    return value


def _from_val(value) -> bool | str:
    """``engine.thresholds_from_val``: true, false or auto (only when the fixed thresholds keep nothing)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() == "auto":
        return "auto"
    raise ValueError(f"engine.thresholds_from_val must be true, false or auto, got {value!r}")


def stages(engine: DictConfig | Mapping) -> tuple[str, ...]:
    """The stage of each round: ``supervised``, ``semi_supervised`` (``engine.semi.enabled``), then
    ``engine.rounds`` times ``pseudo_label``."""
    rounds = int(engine.get("rounds", 0))
    if rounds < 0:
        raise ValueError(f"engine.rounds must be >= 0, got {rounds}")
    semi = (engine.get("semi") or {}).get("enabled", False)
    return ("supervised", *(("semi_supervised",) if semi else ()), *("pseudo_label",) * rounds)


def engine_settings(engine: DictConfig | Mapping) -> EngineSettings:
    """Read and check ``engine`` (the config group).

    Raises:
        ValueError: a value out of its range or of the wrong kind, naming the key.
    """
    order = stages(engine)
    semi_cfg = engine.get("semi") or {}
    semi = None
    if "semi_supervised" in order:
        semi = SemiSettings(
            teacher={key: semi_cfg[key] for key in ("ema", "confidence", "feature_dropout", "weight") if key in semi_cfg},
            prompt_iou_thresh=float(semi_cfg.get("prompt_iou_thresh", DEFAULTS["semi.prompt_iou_thresh"])),
            prompt_stability_thresh=float(semi_cfg.get("prompt_stability_thresh",
                                                       DEFAULTS["semi.prompt_stability_thresh"])))
    target = engine.get("val_target_iou")
    if target is not None and not 0.0 <= float(target) <= 1.0:
        raise ValueError(f"engine.val_target_iou must be in [0, 1] or null, got {target!r}")
    amg = engine.get("amg") or {}
    return EngineSettings(
        stages=order,
        amg=OmegaConf.to_container(amg, resolve=True) if isinstance(amg, DictConfig) else dict(amg),
        pred_iou_thresh=float(engine.get("pred_iou_thresh", DEFAULTS["pred_iou_thresh"])),
        stability_score_thresh=float(engine.get("stability_score_thresh", DEFAULTS["stability_score_thresh"])),
        thresholds_from_val=_from_val(engine.get("thresholds_from_val", "auto")),
        val_target_iou=None if target is None else float(target),
        max_images_per_round=_whole_or_none(engine, "max_images_per_round"),
        max_val_images=_whole_or_none(engine, "max_val_images"),
        keep_previous_if_worse=bool(engine.get("keep_previous_if_worse", True)),
        pseudo_weight=float(engine.get("pseudo_weight", DEFAULTS["pseudo_weight"])),
        measure_hidden_labels=bool(engine.get("measure_hidden_labels", True)),
        semi=semi,
        review=_review(engine.get("review")),
        simulated=_simulated(engine) if engine.get("review") == "simulated" else None,
    )


def _simulated(engine) -> ReviewerSettings:
    """``engine.simulated`` (the simulated reviewer of ``engine.review=simulated``)."""
    values = engine.get("simulated") or {}
    values = OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) else dict(values)
    unknown = sorted(set(values) - set(ReviewerSettings.__dataclass_fields__))
    if unknown:
        raise ValueError(f"engine.simulated: unknown keys {unknown}; valid: {sorted(ReviewerSettings.__dataclass_fields__)}")
    return ReviewerSettings(**values)


def _review(value) -> str | None:
    """``engine.review``: null, ``simulated`` or a reviews folder (checked to hold reviews/)."""
    if value in (None, ""):
        return None
    if value == "simulated":
        return "simulated"
    import hydra

    from samtune.engine.review import check_review_folder

    path = Path(hydra.utils.to_absolute_path(str(value)))
    check_review_folder(path)
    return str(path)
