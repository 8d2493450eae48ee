"""The ``cache`` config: whether a training run uses the embedding cache, and what that means for augmentation.

``cache.enabled``: ``auto`` (on when the image encoder is frozen, i.e. ``finetune=decoder_only``), ``true``
(the same, but an error with a trained encoder) or ``false``. ``cache.dir``: the cache folder.
``cache.views``: image-level augmentation changes the image and so its embedding; with the cache on, training
images come from ``views`` fixed views per image (1: the image as it is, no augmentation; K > 1: view 0 as
is and K - 1 augmentations seeded by image and view, each cached once). See README "Embedding cache".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from samtune.model.embedding_cache import EmbeddingCache
from samtune.model.promptable_sam import PromptableSam
from samtune.training.finetune_modes import finetune_mode

log = logging.getLogger(__name__)


def cache_enabled(value: Any) -> bool | None:
    """``cache.enabled`` as True, False or None (``auto``)."""
    text = str(value).strip().lower()
    if text in ("auto", "none", "null"):
        return None
    if text in ("true", "1", "on", "yes"):
        return True
    if text in ("false", "0", "off", "no"):
        return False
    raise ValueError(f"cache.enabled must be auto, true or false, got {value!r}")


def setup_embedding_cache(
    cache_cfg: Mapping | None,
    *,
    mode: str,
    model: PromptableSam,
    model_type: str,
    arch: Mapping | None,
    precision: str | int,
    augment: str,
    zoom_crop: Mapping | None,
) -> tuple[EmbeddingCache | None, int | None]:
    """The embedding cache of a training run and the number of fixed views per training image.

    Args:
        cache_cfg: The ``cache`` config (``enabled``, ``dir``, ``views``); None: off.
        mode: ``finetune.mode``.
        model: The model whose (frozen) image encoder is hashed into the cache's namespace.
        model_type: ``model.type``.
        arch: ``model.arch``.
        precision: The trainer's resolved precision.
        augment: ``data.augment``, for the note on augmentation.
        zoom_crop: ``data.zoom_crop``, likewise.

    Returns:
        (cache or None, views for :class:`samtune.data.dataset.SamDataset`: None without the cache).

    Raises:
        ValueError: ``cache.enabled=true`` with a trained image encoder, a missing ``cache.dir``, views < 1.
    """
    enabled = cache_enabled(cache_cfg.get("enabled", "auto")) if cache_cfg is not None else False
    if enabled is False:
        return None, None
    if not finetune_mode(mode).encoder_frozen:
        if enabled:
            raise ValueError(f"cache.enabled=true needs a frozen image encoder (finetune=decoder_only); finetune={mode} "
                             "trains it. Use cache.enabled=auto or false.")
        log.info("Embedding cache off: finetune=%s trains the image encoder", mode)
        return None, None
    if not cache_cfg.get("dir"):
        raise ValueError("cache.dir is not set: pass cache.dir=PATH or cache.enabled=false")
    views = int(cache_cfg.get("views") or 1)
    if views < 1:
        raise ValueError(f"cache.views must be >= 1, got {views}")
    cache = EmbeddingCache.for_model(os.path.abspath(str(cache_cfg["dir"])), model.sam.image_encoder,
                                     model_type=model_type, arch=arch, precision=str(precision))
    log.info("Embedding cache on: %s (each image embedded once, reused across epochs and runs)", cache.dir)
    changes_image = [k for k, on in (("data.augment=" + str(augment), augment != "none"),
                                     ("data.zoom_crop", bool(zoom_crop))) if on]
    if changes_image and views == 1:
        log.warning(
            "Embedding cache on: training images are NOT augmented (%s would change the image, hence its "
            "embedding). Set cache.views=K to train on K fixed augmented views per image (each embedded once), "
            "or cache.enabled=false to augment freely and run the encoder on every step.", " and ".join(changes_image),
        )
    elif changes_image:
        log.info("Embedding cache on: each training image is one of %d fixed views (view 0 as is, %d augmented with "
                 "%s, seeded by image and view)", views, views - 1, " and ".join(changes_image))
    return cache, views
