"""Build the model that a ``model`` config describes."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from samtune.model.build import build_seeded_sam, resolve_arch
from samtune.model.checkpoint import load_sam_weights
from samtune.model.promptable_sam import PromptableSam

log = logging.getLogger(__name__)


def build_model(
    model_type: str,
    *,
    checkpoint: str | Path | None = None,
    arch: dict | None = None,
    seed: int = 0,
    base_checkpoint: str | Path | None = None,
) -> PromptableSam:
    """Build a :class:`PromptableSam` and load its starting weights.

    Args:
        model_type: ``vit_b``, ``vit_l``, ``vit_h`` or ``sam_tiny`` (config key ``model.type``).
        checkpoint: Path of an official (or samtune-exported) state dict, or a samtune Lightning
            checkpoint. None starts from random weights (a warning says zero-shot means nothing then).
        arch: Overrides of architecture fields (``model.arch``).
        seed: Seed of the random initialisation (only matters without a checkpoint).
        base_checkpoint: For a samtune training checkpoint, which stores only the trained weights:
            the file the frozen weights come from, instead of the base checkpoint it records.
    """
    spec = resolve_arch(model_type, arch)
    sam = build_seeded_sam(spec, seed)
    if checkpoint is None or str(checkpoint) == "":
        log.warning(
            "model.checkpoint is not set: %s starts from RANDOM weights, so its zero-shot numbers mean nothing. "
            "Pass model.checkpoint=PATH (see README: official checkpoints).", model_type,
        )
    else:
        load_sam_weights(sam, checkpoint, model_type=model_type, base_checkpoint=base_checkpoint)
        log.info("Loaded %s weights from %s", model_type, checkpoint)
    return PromptableSam(sam)


def start_model(cfg: DictConfig) -> PromptableSam:
    """The model of ``cfg.model`` with its starting checkpoint."""
    return build_model(cfg.model.type, checkpoint=cfg.model.get("checkpoint"), arch=cfg.model.get("arch"),
                       seed=int(cfg.seed))
