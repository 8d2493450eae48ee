"""Segment new images: prompted (boxes or point sets) or everything (automatic mask generation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from samtune.data.io import IMAGE_EXTENSIONS
from samtune.model.promptable_sam import PromptableSam
from samtune.predict.auto import MaskGenerator, ZoomedMaskGenerator, encode_masks, generate_masks
from samtune.predict.modes import prompt_mode
from samtune.predict.segmenter import Segmenter
from samtune.predict.zoom import ZoomConfig


@dataclass
class MaskPrediction:
    """One predicted mask, kept as COCO RLE: an image's masks are collected until its outputs are written, and
    hundreds of full-size boolean masks of a large image would take gigabytes.

    Attributes:
        rle: The mask as COCO RLE (compressed, counts as str; ``pycocotools.mask``).
        predicted_iou: The IoU head's estimate.
        stability_score: IoU of the mask thresholded at +-offset logits around SAM's threshold.
        prompt: What produced it: ``{"box": [...]}``, ``{"points": [...], "labels": [...]}`` or, in auto mode,
            ``{"point": [x, y]}`` (the grid point).
        prompt_index: Index of the prompt in the image's prompt list (None in auto mode).
    """

    rle: dict
    predicted_iou: float
    stability_score: float
    prompt: dict
    prompt_index: int | None = None

    @classmethod
    def from_mask(cls, mask: np.ndarray, predicted_iou: float, stability_score: float, prompt: dict,
                  prompt_index: int | None = None) -> MaskPrediction:
        """From an H x W boolean mask."""
        return cls(encode_masks([mask])[0], predicted_iou, stability_score, prompt, prompt_index)

    @property
    def mask(self) -> np.ndarray:
        """H x W bool (decoded on each access)."""
        return mask_utils.decode(self.rle).astype(bool)

    @property
    def area(self) -> int:
        return int(mask_utils.area(self.rle))

    @property
    def bbox(self) -> list[int]:
        """XYWH of the mask's pixels ([0, 0, 0, 0] when empty)."""
        return [int(v) for v in mask_utils.toBbox(self.rle)]


def list_images(input_path: Path) -> list[tuple[Path, str]]:
    """(path, key) of the input image, or of every image under the input folder (recursively, sorted).

    The key is the path relative to the folder (posix), or the file name for a single image.

    Raises:
        FileNotFoundError: the input does not exist or holds no image.
    """
    if input_path.is_file():
        return [(input_path, input_path.name)]
    if not input_path.is_dir():
        raise FileNotFoundError(f"input={input_path}: no such file or folder")
    found = sorted(p for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        raise FileNotFoundError(f"input={input_path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return [(p, p.relative_to(input_path).as_posix()) for p in found]


@torch.no_grad()
def segment_prompts(
    model: PromptableSam,
    image: np.ndarray,
    prompts: list[dict],
    mode: str,
    *,
    zoom: ZoomConfig | None = None,
    stability_offset: float = 1.0,
) -> list[MaskPrediction]:
    """One mask per prompt, in prompt order.

    Boxes and point sets of several points use SAM's single-mask output, a single point the best of the
    multimask outputs (as evaluation does); prompts are decoded in batches of equal size.

    Args:
        model: The model (in eval mode).
        image: H x W x 3 uint8 RGB.
        prompts: ``{"box": [x1, y1, x2, y2]}`` (mode ``box``) or ``{"points": {"points", "labels"}}`` (mode
            ``points``), original pixels.
        mode: ``box`` or ``points``.
        zoom: Segment each prompt in a zoomed crop (None: the whole image).
        stability_offset: Logit offset of the stability score.
    """
    if not prompts:
        return []
    kind = prompt_mode(mode)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(0 if kind.is_box else len(p[kind.key]["points"]), []).append(i)
    segmenter = Segmenter(model, zoom, stability_offset=stability_offset)
    embedded = segmenter.embed(image) if zoom is None else None
    out: list[MaskPrediction | None] = [None] * len(prompts)
    for k, idx in groups.items():
        group = [prompts[i] for i in idx]
        for pred in segmenter.segment(image, group, kind.key, multimask=kind.multimask_for(k), embedded=embedded):
            for j, i in enumerate(idx[pred.index]):
                p = prompts[i]
                prompt = {"box": p["box"]} if kind.is_box else dict(p[kind.key])
                out[i] = MaskPrediction.from_mask(pred.masks[j].numpy(), float(pred.pred_iou[j]),
                                                  float(pred.stability[j]), prompt, i)
    return [m for m in out if m is not None]


def segment_everything(generator: MaskGenerator | ZoomedMaskGenerator, image: np.ndarray) -> list[MaskPrediction]:
    """All masks the automatic mask generator keeps for ``image``, largest first (``generator`` from
    :func:`samtune.predict.auto.build_mask_generator`: masks as COCO RLE)."""
    return [
        MaskPrediction(m["segmentation"], float(m["predicted_iou"]), float(m["stability_score"]),
                       {"point": [float(v) for v in m["point_coords"][0]]})
        for m in generate_masks(generator, image)
    ]
