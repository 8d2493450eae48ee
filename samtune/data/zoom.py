"""Prompt-focused crops: the geometry shared by zoomed evaluation and zoom-crop training.

Segmenting a small object inside a crop of ``context`` times its extent, resized to the model input,
shows the model the object at a useful scale. Evaluation (``eval.zoom``) crops around each prompt;
training (``data.zoom_crop``) samples the same kind of crops around random instances, so a model sees
at training time the views it is evaluated on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def zoom_window(
    extent_xyxy: tuple[float, float, float, float],
    image_size: tuple[int, int],
    *,
    context: float,
    min_side: float = 16.0,
    shift: tuple[float, float] = (0.0, 0.0),
) -> tuple[int, int, int, int]:
    """Square window ``(x0, y0, x1, y1)`` (x1, y1 exclusive) around an extent, inside the image.

    Args:
        extent_xyxy: Box (inclusive XYXY pixels) to centre on: a box prompt, or the points' extent.
        image_size: (H, W).
        context: Window side as a multiple of the extent's longer side.
        min_side: Smallest window side in pixels.
        shift: Offset of the window centre as a fraction of the side (training jitter).

    Returns:
        The window; a side larger than the image is clipped to it, otherwise the window is shifted
        (not shrunk) to lie inside the image.
    """
    h, w = image_size
    x1, y1, x2, y2 = extent_xyxy
    side = int(round(max(context * max(x2 - x1 + 1, y2 - y1 + 1), min_side)))
    cx = (x1 + x2 + 1) / 2 + shift[0] * side
    cy = (y1 + y2 + 1) / 2 + shift[1] * side

    def span(center: float, limit: int) -> tuple[int, int]:
        if side >= limit:
            return 0, limit
        start = min(max(int(round(center - side / 2)), 0), limit - side)
        return start, start + side

    xa, xb = span(cx, w)
    ya, yb = span(cy, h)
    return xa, ya, xb, yb


@dataclass(frozen=True)
class ZoomCropConfig:
    """Training-time zoom crops (config ``data.zoom_crop``).

    Attributes:
        prob: Chance that an item is a crop around a random instance instead of the whole image.
        context_min: Smallest context factor (crop side / instance extent).
        context_max: Largest context factor.
        max_shift: Largest offset of the crop centre, as a fraction of the crop side.
        min_side: Smallest crop side in pixels.
    """

    prob: float = 0.5
    context_min: float = 1.5
    context_max: float = 3.0
    max_shift: float = 0.15
    min_side: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.prob <= 1:
            raise ValueError(f"data.zoom_crop.prob must be in [0, 1], got {self.prob}")
        if not 1 <= self.context_min <= self.context_max:
            raise ValueError(
                f"data.zoom_crop needs 1 <= context_min <= context_max, got {self.context_min}, {self.context_max}"
            )


def sample_zoom_crop(
    image: np.ndarray, instances: np.ndarray, cfg: ZoomCropConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """With probability ``cfg.prob``, crop image and instance map around a random instance.

    Args:
        image: H x W x 3 uint8.
        instances: H x W int instance ids (0 = background).
        cfg: Crop settings.
        rng: Random generator.

    Returns:
        (image crop, instance crop); the inputs unchanged when no crop is drawn or no instance exists.
    """
    if rng.random() >= cfg.prob:
        return image, instances
    ids = np.unique(instances[instances > 0])
    if ids.size == 0:
        return image, instances
    target = instances == rng.choice(ids)
    ys, xs = np.nonzero(target)
    context = float(np.exp(rng.uniform(np.log(cfg.context_min), np.log(cfg.context_max))))
    shift = tuple(rng.uniform(-cfg.max_shift, cfg.max_shift, size=2))
    x0, y0, x1, y1 = zoom_window(
        (xs.min(), ys.min(), xs.max(), ys.max()), instances.shape, context=context, min_side=cfg.min_side, shift=shift
    )
    return np.ascontiguousarray(image[y0:y1, x0:x1]), np.ascontiguousarray(instances[y0:y1, x0:x1])
