"""Prompt-focused zoom: segment each prompt inside a crop of its neighbourhood.

A 1024-px SAM sees a 10-px solder defect of a 4,000-px board as a few pixels; cropping a square of
``context`` times the prompt's extent around it, resizing the crop to the model input, segmenting and
pasting the mask back gives the model the object at a useful scale. Zero-shot and fine-tuned models are
always evaluated the same way, and the report says which.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from segment_anything.utils.transforms import ResizeLongestSide

from samtune.data.zoom import zoom_window
from samtune.model.memory import crops_per_call
from samtune.model.promptable_sam import PromptableSam
from samtune.predict.decoding import PromptPrediction, decode_prompts, finish_logits

log = logging.getLogger(__name__)

# one_point_whole: a one-point answer is cut by its crop when it covers more than CUT_BORDER_SHARE of the crop's edges
# inside the image; a crop holds it when it covers at most HOLD_BORDER_SHARE (both chosen on the val splits of the
# generated large objects, pcb and medical boards, pcb_defects and nuclei)
CUT_BORDER_SHARE = 0.3
HOLD_BORDER_SHARE = 0.2


@dataclass(frozen=True)
class ZoomConfig:
    """Zoom settings (config ``eval.zoom``).

    Attributes:
        context: Crop side as a multiple of the prompt's extent (box side, or the points' spread).
        min_frac: Smallest crop side as a fraction of the image's longest side (used for point
            prompts, whose object size is unknown, and for tiny boxes).
        min_px: Smallest crop side in pixels.
        refine: Re-crop rounds for point prompts. A point says nothing of its object's size, so its first crop
            is ``min_frac`` of the image: too coarse for a small object, too tight for a large one. Each round
            crops again around the extent of the mask just predicted (with the positive points), ``context``
            times it, and segments the points again there. 0: the first crop only.
        refine_one_point: Re-crop rounds for prompts of a single point (``point1``; a one-point prompt of
            ``scripts/predict.py``), the least telling of their object's size; None: ``refine``.
        one_point_whole: Let a one-point prompt's object widen its crop (``eval.zoom_one_point_whole``). Where
            the answer in the ``min_frac`` crop is cut by it (covers more than :data:`CUT_BORDER_SHARE` of the
            crop's border inside the image: the object goes on past the crop), the point is decoded on the whole
            image (one embedding per call, only when a prompt needs it) and segmented again in a crop of
            ``context`` times the extent of that whole-image mask (:func:`point_window`). Where that crop would be
            the whole image, the whole image is the coarsest view of the object, so first one step as a ``refine``
            round takes (``context`` times the extent of the cut answer); its answer is kept where that crop holds
            it (at most :data:`HOLD_BORDER_SHARE` of its border), the whole-image answer otherwise. Answers inside
            their crop are kept: small objects keep today's crop and answer. False: every point prompt keeps its
            ``min_frac`` crop.
        memory_budget_gb: Memory (GB) the crops embedded in one encoder call may take (``eval.memory_budget_gb``);
            None: a share of what the model's device has free (:func:`samtune.model.memory.crops_per_call`).
            Only the batching follows it, never a mask.
    """

    context: float = 2.0
    min_frac: float = 0.2
    min_px: int = 16
    refine: int = 0
    refine_one_point: int | None = None
    one_point_whole: bool = True
    memory_budget_gb: float | None = None

    def __post_init__(self) -> None:
        if self.context < 1:
            raise ValueError(f"eval.zoom.context must be >= 1, got {self.context}")
        if not 0 <= self.min_frac <= 1:
            raise ValueError(f"eval.zoom.min_frac must be in [0, 1], got {self.min_frac}")
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise ValueError(f"eval.zoom.refine must be a whole number >= 0, got {self.refine!r}")
        one = self.refine_one_point
        if one is not None and (isinstance(one, bool) or not isinstance(one, int) or one < 0):
            raise ValueError(f"eval.zoom.refine_one_point must be null or a whole number >= 0, got {one!r}")
        if not isinstance(self.one_point_whole, bool):
            raise ValueError(f"eval.zoom.one_point_whole must be true or false, got {self.one_point_whole!r}")
        budget = self.memory_budget_gb
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
            raise ValueError(f"eval.memory_budget_gb must be null or a number of GB > 0, got {budget!r}")

    def rounds(self, mode: str, n_points: int) -> int:
        """Re-crop rounds of a prompt: none for a box, ``refine_one_point`` (if set) for a single point."""
        if mode == "box":
            return 0
        if n_points == 1 and self.refine_one_point is not None:
            return self.refine_one_point
        return self.refine

    def describe(self) -> str:
        text = (f"prompt-focused zoom: crop of {self.context:g}x the prompt's extent (at least "
                f"{self.min_frac:g} of the longest image side) around each prompt, resized to the model input")
        if self.one_point_whole:
            text += (f"; a single point whose answer the crop cuts is cropped again {self.context:g}x the extent of "
                     "its whole-image mask (the whole-image answer where that crop is the image)")
        one = self.refine if self.refine_one_point is None else self.refine_one_point
        if self.refine or one:
            if one == self.refine:
                rounds = f"{self.refine}x"
            else:
                rounds = f"{self.refine}x ({one}x for a single point)"
            text += (f"; point prompts re-cropped {rounds} around {self.context:g}x the extent of the mask "
                     "just predicted")
        return text


@dataclass
class ZoomedLogits:
    """Answers segmented in their own crops: what a next interactive step needs (the ``low_res`` of a zoomed
    :class:`~samtune.predict.decoding.PromptPrediction`, the mask input a zoomed click passes on).

    Attributes:
        windows: Each answer's crop, ``(x0, y0, x1, y1)`` in image pixels (the whole image when the whole-image
            answer was kept).
        logits: n x 1 x h x w chosen low-resolution logits, each in its crop's input frame (CPU).
        masks: n x H x W bool answers at the image size (what the crop must hold for a next click to keep it).
        embeddings: Crop embeddings by window, kept for the next click in the same crop.
    """

    windows: list[tuple[int, int, int, int]]
    logits: torch.Tensor
    masks: torch.Tensor
    embeddings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.windows)


def prompt_window(
    prompt_xyxy: tuple[float, float, float, float], image_size: tuple[int, int], cfg: ZoomConfig, *, is_box: bool
) -> tuple[int, int, int, int]:
    """Square crop window around a prompt (points get at least ``min_frac`` of the longest image side)."""
    floor = 0.0 if is_box else cfg.min_frac * max(image_size)
    return zoom_window(prompt_xyxy, image_size, context=cfg.context, min_side=max(floor, cfg.min_px))


def crop_enlargement(model: PromptableSam, crop_size: tuple[int, int]) -> tuple[float, float]:
    """How much wider and taller than one input pixel a crop pixel becomes: ``(max(sx - 1, 0), max(sy - 1, 0))``.

    Prompts are inclusive pixel indices (a box from a mask ends at its last row and column; pixel ``i``
    covers ``[i, i + 1)``). ``ResizeLongestSide`` maps a coordinate by ``x * s``, which puts a box's last
    column at the *start* of the ``s`` input pixels that column becomes, so a crop enlarged ``s`` times
    loses ``s - 1`` input pixels of its object at the box's right and bottom edges. Training never sees that:
    its boxes are drawn from masks already resized into the input frame. Adding this enlargement to a box's
    far edges (and half of it to points, the centre of their enlarged pixel) maps prompts by pixel extent.
    A crop that is shrunk (``s <= 1``) is mapped exactly as ``SamPredictor`` maps it.
    """
    h, w = crop_size
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(h, w, model.img_size)
    return max(new_w / w - 1.0, 0.0), max(new_h / h - 1.0, 0.0)


def _extent(prompt: dict, mode: str) -> tuple[float, float, float, float]:
    if mode == "box":
        return tuple(float(v) for v in prompt["box"])
    pts = np.asarray(prompt[mode]["points"], dtype=float)
    labels = np.asarray(prompt[mode]["labels"])
    pos = pts[labels == 1] if (labels == 1).any() else pts
    return float(pos[:, 0].min()), float(pos[:, 1].min()), float(pos[:, 0].max()), float(pos[:, 1].max())


def _refined_window(prompt: dict, mode: str, mask: torch.Tensor, image_size: tuple[int, int],
                    cfg: ZoomConfig) -> tuple[int, int, int, int]:
    """The crop of a re-crop round: ``context`` times the extent of the predicted mask and the positive points
    (the points' own crop when the mask is empty)."""
    px0, py0, px1, py1 = _extent(prompt, mode)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        return prompt_window((px0, py0, px1, py1), image_size, cfg, is_box=False)
    extent = (min(px0, float(xs.min())), min(py0, float(ys.min())), max(px1, float(xs.max())), max(py1, float(ys.max())))
    return zoom_window(extent, image_size, context=cfg.context, min_side=cfg.min_px)


def _side(extent: tuple[float, float, float, float], context: float, min_side: float) -> float:
    """The side of :func:`zoom_window` around ``extent`` before it is clipped to the image."""
    x0, y0, x1, y1 = extent
    return max(context * max(x1 - x0 + 1, y1 - y0 + 1), min_side)


def point_window(prompt: dict, mode: str, whole_mask: torch.Tensor, image_size: tuple[int, int],
                 cfg: ZoomConfig) -> tuple[int, int, int, int] | None:
    """The crop of a point prompt sized by ``whole_mask``, its answer on the whole image (``one_point_whole``).

    The prompt's own window (:func:`prompt_window`, ``min_frac`` of the image) unless ``context`` times the
    extent of ``whole_mask`` and the positive points is larger: then that window around them, and None (keep the
    whole-image answer) when that window is the whole image. An empty mask keeps the prompt's window.
    """
    h, w = image_size
    points = _extent(prompt, mode)
    default = prompt_window(points, image_size, cfg, is_box=False)
    if not bool(whole_mask.any()):
        return default
    ys, xs = torch.nonzero(whole_mask, as_tuple=True)
    px0, py0, px1, py1 = points
    extent = (min(px0, float(xs.min())), min(py0, float(ys.min())), max(px1, float(xs.max())), max(py1, float(ys.max())))
    floor = max(cfg.min_frac * max(h, w), cfg.min_px)
    if _side(extent, cfg.context, cfg.min_px) <= _side(points, cfg.context, floor):
        return default
    window = zoom_window(extent, image_size, context=cfg.context, min_side=cfg.min_px)
    return None if window == (0, 0, w, h) else window


def border_share(mask: torch.Tensor, window: tuple[int, int, int, int], image_size: tuple[int, int]) -> float:
    """Share of the pixels along ``window``'s edges that lie inside the image (not on its border) which ``mask``
    (at the image size) covers: how much the crop cuts the answer (0 when the window is the whole image)."""
    x0, y0, x1, y1 = window
    h, w = image_size
    sub = mask[y0:y1, x0:x1]
    edges = [e for e, inside in ((sub[:, 0], x0 > 0), (sub[0, :], y0 > 0), (sub[:, -1], x1 < w), (sub[-1, :], y1 < h))
             if inside]
    return float(torch.cat(edges).float().mean()) if edges and sub.numel() else 0.0


def _first_round(model: PromptableSam, image: np.ndarray, items: list[dict], mode: str, multimask: bool,
                 cfg: ZoomConfig, stability_offset: float, output: int | None, whole: dict, keep: dict,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list, torch.Tensor]:
    """First answers of ``items`` (masks, predicted IoU, stability, the window and low-res logits of each): each in its prompt window; under ``one_point_whole`` a one-point prompt whose
    answer that crop cuts is segmented again in the crop :func:`point_window` sizes by its whole-image answer, or,
    where that crop is the image, in a crop of ``context`` times the cut answer's extent if that crop holds the new
    answer, else it keeps the whole-image answer (see :class:`ZoomConfig`). ``whole`` caches the image's embedding
    for the call."""
    h, w = image.shape[:2]
    windows = [prompt_window(_extent(p, mode), (h, w), cfg, is_box=mode == "box") for p in items]
    masks, scores, stability, low = _segment_in_windows(model, image, items, windows, mode, multimask,
                                                        stability_offset, output, keep)
    final = list(windows)
    if mode == "box" or not cfg.one_point_whole:
        return masks, scores, stability, final, low
    cut = [i for i, p in enumerate(items)
           if len(p[mode]["points"]) == 1 and border_share(masks[i], windows[i], (h, w)) > CUT_BORDER_SHARE]
    if not cut:
        return masks, scores, stability, final, low
    if not whole:  # one embedding of the whole image for all the prompts of the call, made when first needed
        x, input_size, original_size = model.prepare_image(image)
        whole.update(embedding=model.embed(x), input_size=input_size, original_size=original_size)
    (first,) = decode_prompts(model, whole["embedding"], [items[i] for i in cut], mode, input_size=whole["input_size"],
                              original_size=whole["original_size"], multimask=multimask,
                              stability_offset=stability_offset, chunk=len(cut), output=output)
    again, again_windows, on_whole = [], [], {}
    for j, i in enumerate(cut):
        window = point_window(items[i], mode, first.masks[j], (h, w), cfg)
        if window is None:  # the whole image: first a step around the cut answer
            on_whole[i] = j
            window = _refined_window(items[i], mode, masks[i], (h, w), cfg)
        if window != windows[i]:
            again.append(i)
            again_windows.append(window)
        elif i in on_whole:
            del on_whole[i]
    if again:
        new = _segment_in_windows(model, image, [items[i] for i in again], again_windows, mode, multimask,
                                  stability_offset, output, keep)
        for k, (i, window) in enumerate(zip(again, again_windows, strict=True)):
            j = on_whole.get(i)
            if j is None or border_share(new[0][k], window, (h, w)) <= HOLD_BORDER_SHARE:
                masks[i], scores[i], stability[i], low[i] = new[0][k], new[1][k], new[2][k], new[3][k]
                final[i] = window
            else:
                masks[i], scores[i], stability[i] = first.masks[j], first.pred_iou[j], first.stability[j]
                low[i], final[i] = first.low_res[j].float().cpu(), (0, 0, w, h)
                keep[(0, 0, w, h)] = whole["embedding"]  # the whole image is the crop (0, 0, w, h)
    return masks, scores, stability, final, low


@torch.no_grad()
def decode_prompts_zoomed(
    model: PromptableSam,
    image: np.ndarray,
    prompts: list[dict],
    mode: str,
    *,
    multimask: bool,
    cfg: ZoomConfig,
    stability_offset: float = 1.0,
    chunk: int | None = None,
    output: int | None = None,
) -> Iterator[PromptPrediction]:
    """Like ``decode_prompts`` but each prompt is segmented in its own zoomed crop.

    Args:
        model: The model.
        image: H x W x 3 uint8 RGB, the whole image.
        prompts: Per-instance prompt dicts (original image pixels): ``"box"``, or ``mode: {"points", "labels"}``.
        mode: ``box``, or the key of the point prompt (``point1``, ``point3``, ``points``).
        multimask: Whether to pick the best multimask output (ambiguous prompts).
        cfg: Zoom settings.
        stability_offset: Logit offset of the stability score.
        chunk: Crops embedded per encoder call; None: as many as ``cfg.memory_budget_gb`` (or the device's free
            memory) holds for this model and image (:func:`samtune.model.memory.crops_per_call`). Only the batching
            depends on it: the masks are the same for any value.
        output: Take this decoder output for every prompt, in every round (see ``finish_logits``).

    Yields:
        Chunks with masks n x H x W bool at the image size; ``low_res`` is a :class:`ZoomedLogits` (each answer's
        crop and its logits in that crop's frame).
    """
    h, w = image.shape[:2]
    if chunk is None:
        chunk = crops_per_call(model, (h, w), cfg.memory_budget_gb)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    whole: dict = {}
    for start in range(0, len(prompts), chunk):
        sl = slice(start, start + chunk)
        items = prompts[sl]
        keep: dict = {}
        masks, scores, stability, final, low = _first_round(model, image, items, mode, multimask, cfg,
                                                            stability_offset, output, whole, keep)
        rounds = [cfg.rounds(mode, 0 if mode == "box" else len(p[mode]["points"])) for p in items]
        for r in range(max(rounds, default=0)):
            active = [i for i, n in enumerate(rounds) if n > r]
            sub = [items[i] for i in active]
            windows = [_refined_window(p, mode, masks[i], (h, w), cfg) for p, i in zip(sub, active, strict=True)]
            keep = {wnd: e for wnd, e in keep.items() if wnd in final}
            masks[active], scores[active], stability[active], low[active] = _segment_in_windows(
                model, image, sub, windows, mode, multimask, stability_offset, output, keep)
            for i, window in zip(active, windows, strict=True):
                final[i] = window
        keep = {wnd: e for wnd, e in keep.items() if wnd in final}
        yield PromptPrediction(sl, masks, scores, stability, ZoomedLogits(final, low, masks, keep))


def _remap_logits(model: PromptableSam, low: torch.Tensor, old: tuple[int, int, int, int],
                  new: tuple[int, int, int, int]) -> torch.Tensor:
    """Low-res logits ``low`` (1 x h x w) of crop ``old`` moved into the input frame of crop ``new``: brought to
    ``old``'s pixels, pasted where the two crops overlap (the rest takes their lowest logit: background), then
    resized and padded as an image crop of ``new`` is, and brought down to the low-res size."""
    ox0, oy0, ox1, oy1 = old
    nx0, ny0, nx1, ny1 = new
    old_size = (oy1 - oy0, ox1 - ox0)
    old_input = ResizeLongestSide.get_preprocess_shape(*old_size, model.img_size)
    full = model.postprocess(low[None].float().to(model.device), old_input, old_size)[0, 0].cpu()
    fill = float(full.min())
    canvas = torch.full((ny1 - ny0, nx1 - nx0), fill)
    x0, y0, x1, y1 = max(ox0, nx0), max(oy0, ny0), min(ox1, nx1), min(oy1, ny1)
    if x1 > x0 and y1 > y0:
        canvas[y0 - ny0 : y1 - ny0, x0 - nx0 : x1 - nx0] = full[y0 - oy0 : y1 - oy0, x0 - ox0 : x1 - ox0]
    new_input = ResizeLongestSide.get_preprocess_shape(ny1 - ny0, nx1 - nx0, model.img_size)
    resized = F.interpolate(canvas[None, None], new_input, mode="bilinear", align_corners=False)
    padded = torch.full((1, 1, model.img_size, model.img_size), fill)
    padded[..., : new_input[0], : new_input[1]] = resized
    side = model.low_res_size
    return F.interpolate(padded, (side, side), mode="bilinear", align_corners=False)[0]


def click_window(coords: torch.Tensor, labels: torch.Tensor, previous: ZoomedLogits, i: int,
                 image_size: tuple[int, int], cfg: ZoomConfig) -> tuple[int, int, int, int]:
    """The crop of object ``i``'s next interactive step: its previous crop while that crop holds its answer (at most
    :data:`HOLD_BORDER_SHARE` of the crop's border covered) and every click lies inside it; otherwise a crop of
    ``context`` times the extent of its answer and positive clicks (:func:`_refined_window`)."""
    old = previous.windows[i]
    x0, y0, x1, y1 = old
    xy = coords[i]
    inside = bool(((xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)).all())
    if inside and border_share(previous.masks[i], old, image_size) <= HOLD_BORDER_SHARE:
        return old
    prompt = {"points": {"points": xy.tolist(), "labels": labels[i].tolist()}}
    return _refined_window(prompt, "points", previous.masks[i], image_size, cfg)


@torch.no_grad()
def click_step_zoomed(
    model: PromptableSam,
    image: np.ndarray,
    coords: torch.Tensor,
    labels: torch.Tensor,
    previous: ZoomedLogits,
    *,
    multimask: bool,
    cfg: ZoomConfig,
    stability_offset: float = 1.0,
) -> tuple[torch.Tensor, ZoomedLogits, torch.Tensor]:
    """One step of SAM's interactive loop in prompt-focused zoom, after a first answer (``previous``).

    Each object is segmented with all its clicks in its crop (:func:`click_window`), with its previous low-res
    logits as mask input (moved into the new crop's frame when the crop changes, :func:`_remap_logits`). Crops
    are embedded once and reused while they stay.

    Args:
        model: The model.
        image: H x W x 3 uint8 RGB.
        coords: N x K x 2 XY clicks (image pixels).
        labels: N x K click labels (1 positive, 0 negative).
        previous: The objects' previous answers (from the first answer or the step before).
        multimask: Pick the best multimask output (SAM's interactive loop: False after the first click).
        cfg: Zoom settings.
        stability_offset: Logit offset of the stability score.

    Returns:
        (masks N x H x W bool, the state of the next step, predicted IoU N).
    """
    h, w = image.shape[:2]
    n = len(coords)
    if len(previous) != n:
        raise ValueError(f"{n} objects clicked but the previous step had {len(previous)}")
    windows = [click_window(coords, labels, previous, i, (h, w), cfg) for i in range(n)]
    embeddings = {wnd: e for wnd, e in previous.embeddings.items() if wnd in windows}
    todo = sorted({wnd for wnd in windows if wnd not in embeddings})
    prepared = {wnd: model.prepare_image(np.ascontiguousarray(image[wnd[1] : wnd[3], wnd[0] : wnd[2]]))
                for wnd in windows}
    per_call = crops_per_call(model, (h, w), cfg.memory_budget_gb)
    for start in range(0, len(todo), per_call):
        batch = todo[start : start + per_call]
        embedded = model.embed(torch.cat([prepared[wnd][0] for wnd in batch]))
        embeddings.update({wnd: embedded[j : j + 1] for j, wnd in enumerate(batch)})
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    scores = torch.zeros(n)
    side = model.low_res_size
    low = torch.zeros(n, 1, side, side)
    dev = model.device
    for i, wnd in enumerate(windows):
        x0, y0, x1, y1 = wnd
        _, in_size, crop_size = prepared[wnd]
        old = previous.windows[i]
        mask_input = previous.logits[i] if wnd == old else _remap_logits(model, previous.logits[i], old, wnd)
        offset = torch.tensor([x0, y0], dtype=torch.float)
        grow = torch.tensor(crop_enlargement(model, crop_size))
        points = ((model.coords_to_input(coords[i : i + 1].float() - offset, crop_size) + grow / 2).to(dev),
                  labels[i : i + 1].to(dev))
        logits, iou = model.decode(embeddings[wnd], points=points, mask_input=mask_input[None].to(dev))
        crop_mask, pred_iou, _, chosen = finish_logits(
            model, logits, iou, multimask=multimask, input_size=in_size, original_size=crop_size,
            stability_offset=stability_offset,
        )
        masks[i, y0:y1, x0:x1] = crop_mask[0]
        scores[i] = float(pred_iou[0])
        low[i] = chosen[0].float().cpu()
    return masks, ZoomedLogits(windows, low, masks, embeddings), scores


def _segment_in_windows(
    model: PromptableSam,
    image: np.ndarray,
    items: list[dict],
    windows: list[tuple[int, int, int, int]],
    mode: str,
    multimask: bool,
    stability_offset: float,
    output: int | None = None,
    keep: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segment each prompt in its window; masks pasted back at the image size, predicted IoU, stability, and the
    chosen low-resolution logits in each window's input frame (n x 1 x h x w, CPU)."""
    h, w = image.shape[:2]
    dev = model.device
    prepared = [model.prepare_image(np.ascontiguousarray(image[y0:y1, x0:x1])) for x0, y0, x1, y1 in windows]
    embeddings = model.embed(torch.cat([x for x, _, _ in prepared]))
    if keep is not None:  # each window's embedding, for a next click in the same crop
        keep.update({window: embeddings[i : i + 1] for i, window in enumerate(windows)})
    masks = torch.zeros(len(items), h, w, dtype=torch.bool)
    scores = torch.zeros(len(items))
    stability = torch.zeros(len(items))
    side = model.low_res_size
    low = torch.zeros(len(items), 1, side, side)
    for i, (p, (x0, y0, x1, y1), (_, in_size, crop_size)) in enumerate(zip(items, windows, prepared)):
        offset = torch.tensor([x0, y0], dtype=torch.float)
        grow = torch.tensor(crop_enlargement(model, crop_size))
        kwargs = {}
        if mode == "box":
            box = torch.tensor([p["box"]], dtype=torch.float) - offset.repeat(2)
            box_in = model.boxes_to_input(box, crop_size) + torch.cat([torch.zeros(2), grow])
            kwargs["boxes"] = box_in.to(dev)
        else:
            coords = torch.tensor([p[mode]["points"]], dtype=torch.float) - offset
            labels = torch.tensor([p[mode]["labels"]], dtype=torch.int)
            kwargs["points"] = ((model.coords_to_input(coords, crop_size) + grow / 2).to(dev), labels.to(dev))
        logits, iou = model.decode(embeddings[i : i + 1], **kwargs)
        crop_mask, pred_iou, stab, chosen = finish_logits(
            model, logits, iou, multimask=multimask, input_size=in_size, original_size=crop_size,
            stability_offset=stability_offset, output=output,
        )
        masks[i, y0:y1, x0:x1] = crop_mask[0]
        scores[i] = float(pred_iou[0])
        stability[i] = float(stab[0])
        low[i] = chosen[0].float().cpu()
    return masks, scores, stability, low


# the flat keys that came before the nested eval.zoom mapping -> its field (still read, with a deprecation warning)
FLAT_ALIASES = {"zoom_min_frac": "min_frac", "zoom_one_point_whole": "one_point_whole", "zoom_refine": "refine",
                "zoom_refine_one_point": "refine_one_point"}


def zoom_config(eval_cfg: DictConfig, where: str = "eval") -> ZoomConfig | None:
    """The zoom settings of config node ``eval_cfg`` (``eval`` in training, the top level of ``predict.yaml``).

    ``zoom`` is null (the whole image), a context factor (``eval.zoom=2``: that context, the other fields at their
    defaults), or a mapping of :class:`ZoomConfig` fields (``configs/prompt_zoom/default.yaml``; ``context: null`` is the
    whole image). ``memory_budget_gb`` beside it bounds the memory of the crops embedded per encoder call (a mapping's
    own ``memory_budget_gb`` wins). The flat keys of :data:`FLAT_ALIASES` (``eval.zoom_refine=1``...) still set their
    field, with a deprecation warning naming the new key.

    Raises:
        ValueError: ``zoom`` of another type, or a field out of range (naming ``eval.zoom.<field>``).
    """
    key = f"{where}." if where else ""
    z = eval_cfg.get("zoom")
    if z is None or z is False:
        return None
    if isinstance(z, (int, float)) and not isinstance(z, bool):
        fields: dict = {"context": float(z)}
    elif isinstance(z, (DictConfig, dict)):
        fields = OmegaConf.to_container(z, resolve=True) if isinstance(z, DictConfig) else dict(z)
        if fields.get("context") is None:
            return None
        unknown = sorted(set(fields) - set(ZoomConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{key}zoom: unknown keys {unknown}; valid: {sorted(ZoomConfig.__dataclass_fields__)}")
    else:
        raise ValueError(f"{key}zoom must be null, a number >= 1 or a mapping of zoom settings, got {z!r}")
    for old, new in FLAT_ALIASES.items():
        value = eval_cfg.get(old)
        if value is not None:
            message = f"{key}{old} is deprecated: use {key}zoom.{new}"
            warnings.warn(message, FutureWarning, stacklevel=2)
            log.warning(message)
            fields[new] = value
    fields.setdefault("memory_budget_gb", eval_cfg.get("memory_budget_gb"))
    return ZoomConfig(**fields)
