"""Prompt-sampling primitives: pure functions from instance masks to SAM prompts.

Conventions shared by every function here:

* masks are ``torch.BoolTensor`` of shape ``N x H x W`` (``N`` instances, possibly ``N = 0``);
* points are XY pixel coordinates (``x`` = column, ``y`` = row) in the frame of the masks, returned
  as integer-valued floats of shape ``N x K x 2``;
* boxes are XYXY with an inclusive maximum (``x2`` is the last column of the mask), as
  ``segment_anything.utils.amg.batched_mask_to_box``;
* randomness comes only from an explicit CPU ``torch.Generator``; random numbers are drawn on
  the CPU and results are returned on the masks' device, so a seed gives the same prompts on
  every device.

Empty masks never raise: where a function needs a pixel that does not exist it falls back to the
image centre ``(W // 2, H // 2)`` (or the corner ``(0, 0)`` for background that does not exist);
each docstring says which.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from scipy import ndimage
from segment_anything.utils.amg import batched_mask_to_box

# Below this distance (px) a float32 distance squared and rounded is the exact integer it stands for.
_EXACT_BELOW = 512.0


def _check_masks(masks: torch.Tensor, name: str = "masks") -> None:
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or masks.ndim != 3:
        got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else type(masks)
        raise ValueError(f"{name} must be a bool tensor of shape N x H x W, got {got}")


def _check_pair(pred: torch.Tensor, gt: torch.Tensor) -> None:
    _check_masks(pred, "pred")
    _check_masks(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")


def _image_centre(n: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """N x 2 tensor filled with the XY centre pixel ``(W // 2, H // 2)``."""
    return torch.tensor([[w // 2, h // 2]], dtype=torch.float32, device=device).repeat(n, 1)


def _draw_ranks(counts: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``k`` ranks per row, uniform in ``[0, count)``, distinct where ``count >= k``.

    Distinct draws use Floyd's subset algorithm (batched over rows, looped over ``k``) followed
    by a random shuffle, so every ordered k-tuple of distinct ranks is equally likely.

    Args:
        counts: N, long, CPU: number of candidate pixels per row.
        k: ranks per row.
        generator: CPU random generator.

    Returns:
        N x k long CPU tensor (rows with ``count == 0`` hold zeros).
    """
    n = counts.shape[0]
    cnt = counts.clamp(min=1).double()
    distinct = counts >= k
    ranks = torch.zeros(n, k, dtype=torch.long)
    for i in range(k):
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        top = cnt - k + i  # Floyd: draw t in [0, top], take `top` itself if t was already chosen
        floyd = torch.minimum(torch.floor(u * (top + 1)), top).long()
        floyd = torch.where((ranks[:, :i] == floyd[:, None]).any(1), top.long(), floyd)
        repeat = torch.minimum(torch.floor(u * cnt), cnt - 1).long()
        ranks[:, i] = torch.where(distinct, floyd, repeat)
    if k > 1:
        ranks = ranks.gather(1, torch.rand(n, k, generator=generator).argsort(1))
    return ranks


def _sample_in_regions(
    regions: torch.Tensor, k: int, generator: torch.Generator, fallback: torch.Tensor
) -> torch.Tensor:
    """Uniform random pixels of each region (without replacement unless the region is too small).

    Args:
        regions: N x H x W bool.
        k: points per region.
        generator: CPU random generator.
        fallback: N x 2 XY point used (repeated ``k`` times) for empty regions.

    Returns:
        N x k x 2 float XY points on the regions' device.
    """
    n, _, w = regions.shape
    flat = regions.flatten(1)
    counts = flat.sum(1)
    ranks = _draw_ranks(counts.cpu(), k, generator).to(regions.device)
    nz = flat.nonzero()[:, 1]  # flat indices, grouped by row in row order
    out = fallback.to(regions.device, torch.float32)[:, None, :].repeat(1, k, 1)
    if nz.numel() == 0:
        return out
    offsets = counts.cumsum(0) - counts
    idx = nz[(offsets[:, None] + ranks).clamp(max=nz.numel() - 1)]
    xy = torch.stack([idx % w, idx // w], dim=-1).float()
    return torch.where((counts > 0)[:, None, None], xy, out)


def _farthest_from_boundary(region: np.ndarray) -> tuple[int, int] | None:
    """XY pixel of ``region`` farthest from its boundary, or None if the region is empty.

    Exact Euclidean distance transform of the region padded with a one-pixel background border
    (so the image edge counts as boundary); ties go to the lowest row-major index. Only the
    region's bounding box (plus the border) is transformed, which gives the same distances.

    OpenCV's exact transform returns float32 square roots whose last bit can vary from call to call
    (seen with OpenCV 5.1, one thread or two), so two pixels at the same distance can come out unequal
    and the tie go either way: the same mask then got a different prompt in another run. Squared distances are integers, so the comparison is made on
    them, rounded (exact while the distance is below ``_EXACT_BELOW`` px; beyond, SciPy's transform,
    slower but exact, decides).

    Args:
        region: H x W bool numpy array.
    """
    rows, cols = np.nonzero(region.any(1))[0], np.nonzero(region.any(0))[0]
    if rows.size == 0:
        return None
    r0, r1, c0, c1 = rows[0], rows[-1], cols[0], cols[-1]
    crop = np.pad(region[r0 : r1 + 1, c0 : c1 + 1].astype(np.uint8), 1)
    dist = cv2.distanceTransform(crop, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    if float(dist.max()) < _EXACT_BELOW:
        key = np.rint(np.square(dist, dtype=np.float64))
    else:
        key = ndimage.distance_transform_edt(crop)
    y, x = np.unravel_index(int(np.argmax(key)), key.shape)
    return int(c0 + x - 1), int(r0 + y - 1)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (inclusive max) around masks.

    Args:
        masks: N x H x W bool.

    Returns:
        N x 4 float ``(x1, y1, x2, y2)``; an empty mask gives ``(0, 0, 0, 0)``.
    """
    _check_masks(masks)
    return batched_mask_to_box(masks).float()


def jitter_boxes(
    boxes: torch.Tensor,
    *,
    noise: float = 0.1,
    max_px: float = 20.0,
    image_size: tuple[int, int],
    generator: torch.Generator,
) -> torch.Tensor:
    """Add clamped Gaussian noise to each box coordinate (SAM 2's box-prompt recipe).

    Each coordinate moves by ``N(0, (noise * side)^2)``, ``side`` being the box's pixel width
    ``x2 - x1 + 1`` for x and height ``y2 - y1 + 1`` for y; each shift is clamped to
    ``[-max_px, max_px]``. The result is clipped to the image and each coordinate pair is sorted,
    so ``x1 <= x2`` and ``y1 <= y2``; every coordinate stays within ``max_px`` of the input box.

    Args:
        boxes: N x 4 XYXY (inclusive max).
        noise: noise std as a fraction of the box side.
        max_px: largest shift of one coordinate, in pixels.
        image_size: ``(H, W)`` of the image the boxes live in.
        generator: CPU random generator.

    Returns:
        N x 4 float XYXY boxes on the input's device.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape N x 4, got {tuple(boxes.shape)}")
    boxes = boxes.float()
    h, w = image_size
    sides = (boxes[:, 2:] - boxes[:, :2] + 1).clamp(min=0).repeat(1, 2)
    gauss = torch.randn(boxes.shape[0], 4, generator=generator).to(boxes.device)
    out = boxes + (gauss * noise * sides).clamp(-max_px, max_px)
    upper = torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=torch.float32, device=boxes.device)
    out = out.clamp(min=0).minimum(upper)
    lo, hi = torch.minimum(out[:, :2], out[:, 2:]), torch.maximum(out[:, :2], out[:, 2:])
    return torch.cat([lo, hi], dim=1)


def sample_points_in_masks(masks: torch.Tensor, k: int, *, generator: torch.Generator) -> torch.Tensor:
    """Uniform random foreground pixels of each mask.

    Points of one mask are distinct when the mask has at least ``k`` pixels, drawn with
    replacement otherwise; their order is random, so the first point alone is uniform too.

    Args:
        masks: N x H x W bool.
        k: points per mask.
        generator: CPU random generator.

    Returns:
        N x k x 2 float XY points; an empty mask gets the image centre ``k`` times.
    """
    _check_masks(masks)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n, h, w = masks.shape
    return _sample_in_regions(masks, k, generator, _image_centre(n, h, w, masks.device))


def center_points(masks: torch.Tensor) -> torch.Tensor:
    """The interior point of each mask farthest from its boundary (SAM's single-point prompt).

    Maximum of the exact Euclidean distance transform of the mask padded with a background
    border; ties go to the lowest row-major index. Runs cv2 on the CPU, one mask at a time.

    Args:
        masks: N x H x W bool.

    Returns:
        N x 1 x 2 float XY points; an empty mask gets the image centre ``(W // 2, H // 2)``.
    """
    _check_masks(masks)
    n, h, w = masks.shape
    out = _image_centre(n, h, w, torch.device("cpu"))
    for i, mask in enumerate(masks.cpu().numpy()):
        xy = _farthest_from_boundary(mask)
        if xy is not None:
            out[i] = torch.tensor(xy, dtype=torch.float32)
    return out[:, None, :].to(masks.device)


def sample_negative_points(
    masks: torch.Tensor, k: int, *, generator: torch.Generator, margin: float = 0.25
) -> torch.Tensor:
    """Uniform random background pixels near each instance.

    Candidates are the background pixels inside the instance's tight box enlarged on every side
    by ``margin`` times its pixel width (x) or height (y), clipped to the image. If there are
    none (or the mask is empty), any background pixel of the image; if the mask covers the whole
    image, the corner ``(0, 0)``.

    Args:
        masks: N x H x W bool.
        k: points per mask.
        generator: CPU random generator.
        margin: box enlargement as a fraction of the box side.

    Returns:
        N x k x 2 float XY points.
    """
    _check_masks(masks)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n, h, w = masks.shape
    boxes = masks_to_boxes(masks)
    pad = margin * (boxes[:, 2:] - boxes[:, :2] + 1)
    lo, hi = boxes[:, :2] - pad, boxes[:, 2:] + pad
    cols = torch.arange(w, device=masks.device, dtype=torch.float32)
    rows = torch.arange(h, device=masks.device, dtype=torch.float32)
    in_x = (cols >= lo[:, :1]) & (cols <= hi[:, :1])  # N x W
    in_y = (rows >= lo[:, 1:]) & (rows <= hi[:, 1:])  # N x H
    background = ~masks
    near = background & in_y[:, :, None] & in_x[:, None, :] & masks.flatten(1).any(1)[:, None, None]
    regions = torch.where(near.flatten(1).any(1)[:, None, None], near, background)
    corner = torch.zeros(n, 2, device=masks.device)
    return _sample_in_regions(regions, k, generator, corner)


def sample_correction_clicks(
    pred: torch.Tensor, gt: torch.Tensor, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random correction click per instance, as SAM / SAM 2 simulate during training.

    Picking the false-negative region (label 1) or the false-positive region (label 0) with
    probability proportional to its size and then a uniform pixel of it is the same as drawing
    a uniform pixel of the whole error region ``pred ^ gt`` and labelling it with ``gt`` there,
    which is what is done. On a perfect prediction the click is a uniform pixel of ``gt``
    (label 1); if ``gt`` and ``pred`` are both empty, the image centre with label 0. In every
    case ``label == gt[y, x]``.

    Args:
        pred: N x H x W bool predicted masks.
        gt: N x H x W bool ground-truth masks.
        generator: CPU random generator.

    Returns:
        coords: N x 1 x 2 float XY points.
        labels: N x 1 long (1 = positive / false negative, 0 = negative / false positive).
    """
    _check_pair(pred, gt)
    n, h, w = gt.shape
    error = pred ^ gt
    regions = torch.where(error.flatten(1).any(1)[:, None, None], error, gt)
    coords = _sample_in_regions(regions, 1, generator, _image_centre(n, h, w, gt.device))
    xy = coords[:, 0].long()
    labels = gt[torch.arange(n, device=gt.device), xy[:, 1], xy[:, 0]].long()[:, None]
    return coords, labels


def largest_error_click(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic correction click: the standard interactive-segmentation evaluation click.

    Connected components (8-connectivity) of the false-negative and false-positive maps are
    computed separately; the click is the point farthest from the boundary (distance-transform
    maximum, image edge counting as boundary) of the largest component. Ties on area prefer the
    false negatives, then the lowest component label. A perfect prediction gets
    ``center_points(gt)`` with label 1 (image centre with label 0 if ``gt`` is empty).

    Args:
        pred: N x H x W bool predicted masks.
        gt: N x H x W bool ground-truth masks.

    Returns:
        coords: N x 1 x 2 float XY points.
        labels: N x 1 long (1 = false negative, 0 = false positive).
    """
    _check_pair(pred, gt)
    coords = center_points(gt).cpu()
    labels = gt.flatten(1).any(1).long()[:, None].cpu()
    for i, (p, g) in enumerate(zip(pred.cpu().numpy(), gt.cpu().numpy(), strict=True)):
        best: tuple[int, int, np.ndarray] | None = None  # (area, label, component map)
        for label, err in ((1, g & ~p), (0, p & ~g)):
            if not err.any():
                continue
            _, comps, stats, _ = cv2.connectedComponentsWithStats(err.astype(np.uint8), connectivity=8)
            j = int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) + 1
            if best is None or stats[j, cv2.CC_STAT_AREA] > best[0]:
                best = (int(stats[j, cv2.CC_STAT_AREA]), label, comps == j)
        if best is not None:
            coords[i, 0] = torch.tensor(_farthest_from_boundary(best[2]), dtype=torch.float32)
            labels[i, 0] = best[1]
    return coords.to(gt.device), labels.to(gt.device)
