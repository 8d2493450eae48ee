"""Procedurally generated generic scenes: the pre-training data of the ``sam_tiny`` generalist.

SAM's zero-shot ability comes from pre-training on a huge, diverse set of masks. This generator gives
the small CPU model the same kind of start without any domain imagery (no boards, no cells, nothing from
a benchmark): many objects per image, from tiny to large — blobs, polygons, rotated rectangles, rings
with holes, crescents, thin and elongated curves, touching clusters and overlapping objects — filled
with flat colours, gradients, stripes or noise textures, on flat, gradient, textured or cluttered
backgrounds, under blur, noise, low contrast, inverted polarity and colour casts. A share of the objects
(``soft_edges``) fades into the background towards its boundary (glowing, translucent or out-of-focus
objects), and its mask still covers it up to that faint edge.

Every object painted as an instance is a mask to segment; background clutter is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from samtune.data.synthetic_common import (
    Canvas,
    ensure_generated,
    linear_gradient,
    smooth_noise,
    split_counts,
    write_dataset,
)

GENERATOR = "samtune.data.synthetic_scenes"
VERSION = 1


# ---------------------------------------------------------------- colours and fills
def _color(rng: np.random.Generator, avoid: np.ndarray | None = None, min_dist: float = 60.0) -> np.ndarray:
    """A random RGB colour, at least ``min_dist`` away from ``avoid`` when possible."""
    for _ in range(8):
        c = rng.uniform(0, 255, 3)
        if rng.random() < 0.3:  # greys and desaturated colours are common in real images
            c = np.full(3, rng.uniform(0, 255)) + rng.normal(0, 12, 3)
        if avoid is None or np.linalg.norm(c - avoid) >= min_dist:
            break
    return np.clip(c, 0, 255).astype(np.float32)


def _fill(rng: np.random.Generator, shape: tuple[int, int], base: np.ndarray) -> np.ndarray:
    """An H x W x 3 fill: flat, gradient, stripes or noise texture around ``base``."""
    h, w = shape
    kind = rng.choice(["flat", "gradient", "stripes", "noise", "flat"])
    if kind == "flat":
        return np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    if kind == "gradient":
        other = _color(rng)
        t = (linear_gradient(rng, shape, 1.0) - 0.5)[..., None]
        return (base * (1 - t) + other * t).astype(np.float32)
    if kind == "stripes":
        other = _color(rng, base, 40)
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 14)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0)[..., None]
        return np.where(t, base, other).astype(np.float32)
    tex = smooth_noise(rng, shape, int(rng.integers(2, 12)))[..., None]
    return np.clip(base + tex * rng.uniform(10, 40), 0, 255).astype(np.float32)


def _background(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    base = _color(rng)
    img = _fill(rng, shape, base)
    if rng.random() < 0.5:
        img = img + smooth_noise(rng, shape, int(rng.integers(8, 64)))[..., None] * rng.uniform(5, 30)
    return np.clip(img, 0, 255)


# ---------------------------------------------------------------- shapes
def _blob(rng: np.random.Generator, center: np.ndarray, radius: float, roughness: float) -> np.ndarray:
    """Closed polygon: a circle with smooth random radial perturbations, elongated and rotated."""
    n = 48
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 6):
        r += roughness * rng.normal(0, 1.0 / k) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.3, 2.0) * radius
    aspect = rng.uniform(0.4, 1.0) if rng.random() < 0.6 else 1.0
    x, y = r * np.cos(t), r * np.sin(t) * aspect
    a = rng.uniform(0, np.pi)
    pts = np.stack([x * np.cos(a) - y * np.sin(a), x * np.sin(a) + y * np.cos(a)], 1) + center
    return pts.astype(np.int32)


def _polygon(rng: np.random.Generator, center: np.ndarray, radius: float) -> np.ndarray:
    n = int(rng.integers(3, 9))
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = radius * rng.uniform(0.5, 1.0, n) if rng.random() < 0.5 else np.full(n, radius)
    return (np.stack([r * np.cos(t), r * np.sin(t)], 1) + center).astype(np.int32)


def _rect(rng: np.random.Generator, center: np.ndarray, radius: float) -> np.ndarray:
    w, h = radius * rng.uniform(0.4, 1.4), radius * rng.uniform(0.4, 1.4)
    box = cv2.boxPoints(((float(center[0]), float(center[1])), (2 * w, 2 * h), float(rng.uniform(0, 180))))
    return box.astype(np.int32)


def _curve(rng: np.random.Generator, center: np.ndarray, length: float) -> np.ndarray:
    n = int(rng.integers(4, 12))
    heading = rng.uniform(0, 2 * np.pi)
    step = length / n
    pts = [center - 0.5 * length * np.array([np.cos(heading), np.sin(heading)])]
    for _ in range(n):
        heading += rng.normal(0, 0.35)
        pts.append(pts[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    return np.array(pts).astype(np.int32)


def _shape_mask(rng: np.random.Generator, shape: tuple[int, int], center: np.ndarray, radius: float) -> np.ndarray:
    """One object's mask (uint8) of a random kind, roughly ``radius`` in size."""
    m = np.zeros(shape, np.uint8)
    kind = rng.choice(["blob", "blob", "polygon", "rect", "ellipse", "ring", "crescent", "curve", "line"])
    if kind == "blob":
        cv2.fillPoly(m, [_blob(rng, center, radius, rng.uniform(0.05, 0.6))], 1)
    elif kind == "polygon":
        cv2.fillPoly(m, [_polygon(rng, center, radius)], 1)
    elif kind == "rect":
        cv2.fillPoly(m, [_rect(rng, center, radius)], 1)
    elif kind == "ellipse":
        axes = (max(1, int(radius)), max(1, int(radius * rng.uniform(0.3, 1.0))))
        cv2.ellipse(m, (int(center[0]), int(center[1])), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif kind == "ring":
        cv2.fillPoly(m, [_blob(rng, center, radius, 0.15)], 1)
        inner = np.zeros_like(m)
        cv2.fillPoly(inner, [_blob(rng, center, radius * rng.uniform(0.3, 0.7), 0.1)], 1)
        m[inner > 0] = 0
    elif kind == "crescent":
        cv2.circle(m, (int(center[0]), int(center[1])), max(2, int(radius)), 1, -1)
        off = rng.normal(0, 1, 2)
        off = off / (np.linalg.norm(off) + 1e-6) * radius * rng.uniform(0.4, 0.8)
        cv2.circle(m, (int(center[0] + off[0]), int(center[1] + off[1])), max(1, int(radius * 0.9)), 0, -1)
    else:
        thick = int(np.clip(radius * rng.uniform(0.05, 0.25), 1, 12))
        pts = _curve(rng, center, 2.5 * radius) if kind == "curve" else _curve(rng, center, 2.5 * radius)[[0, -1]]
        cv2.polylines(m, [pts], False, 1, thickness=thick)
    return m


def _soften(canvas: Canvas, rng: np.random.Generator, sub: np.ndarray, box: tuple[int, int, int, int],
            fill: np.ndarray) -> np.ndarray:
    """Blend ``fill`` into what lies beneath it towards the object's boundary (opacity 0.1-0.5 at the edge)."""
    x, y, w, h = box
    dist = cv2.distanceTransform(np.pad(sub, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    width = max(1.5, rng.uniform(0.2, 0.6) * float(dist.max()))
    edge_alpha = rng.uniform(0.1, 0.5)
    alpha = (edge_alpha + (1 - edge_alpha) * (1 - np.exp(-(dist - 1).clip(0) / width)))[..., None]
    return canvas.image[y : y + h, x : x + w] * (1 - alpha) + fill * alpha


def _paint_object(canvas: Canvas, rng: np.random.Generator, mask: np.ndarray, bg_color: np.ndarray,
                  soft_edges: float = 0.0) -> None:
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0 or h == 0:
        return
    sub = mask[y : y + h, x : x + w]
    contrast = rng.choice([60.0, 40.0, 20.0]) if rng.random() < 0.25 else 70.0
    base = _color(rng, bg_color, contrast)
    fill = _fill(rng, (h, w), base)
    if rng.random() < 0.3:  # shading: a soft radial darkening towards the edge
        dist = cv2.distanceTransform(np.pad(sub, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
        shade = 1 - 0.35 * np.exp(-dist / max(2.0, 0.15 * max(w, h)))
        fill = fill * shade[..., None]
    if soft_edges > 0 and rng.random() < soft_edges:
        fill = _soften(canvas, rng, sub, (x, y, w, h), fill)
    canvas.paint(sub.astype(bool), fill, instance=True, box=(x, y, w, h))
    if rng.random() < 0.2:  # a dark or light outline, part of the object
        edge = cv2.morphologyEx(sub, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) & sub
        canvas.paint(edge.astype(bool), _color(rng), instance=False, box=(x, y, w, h))


def _clutter(canvas: Canvas, rng: np.random.Generator) -> None:
    """Background clutter that is not an instance: faint lines and specks."""
    h, w = canvas.shape
    for _ in range(int(rng.integers(0, 12))):
        m = canvas.blank()
        p = rng.uniform(0, [w, h], size=(2, 2)).astype(np.int32)
        cv2.line(m, tuple(map(int, p[0])), tuple(map(int, p[1])), 1, int(rng.integers(1, 3)))
        canvas.paint(m.astype(bool), _color(rng), instance=False, alpha=float(rng.uniform(0.1, 0.4)))


def render_scene(rng: np.random.Generator, size_range: tuple[int, int] = (256, 448),
                 soft_edges: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Render one generic scene.

    Args:
        rng: Random generator (the scene depends on it and the options alone).
        size_range: Range of the image height and width.
        soft_edges: Share of objects that fade into the background towards their boundary (0 draws no extra
            random numbers, so scenes are those of generator version 1).

    Returns:
        (image H x W x 3 uint8, instances H x W int32).
    """
    _check_soft_edges(soft_edges)
    h, w = (int(rng.integers(size_range[0], size_range[1] + 1)) for _ in range(2))
    shape = (h, w)
    bg = _background(rng, shape)
    canvas = Canvas(bg)
    bg_mean = bg.reshape(-1, 3).mean(0)
    if rng.random() < 0.5:
        _clutter(canvas, rng)
    n = int(rng.integers(4, 36))
    side = min(h, w)
    # log-uniform sizes from a few pixels to half the image; large objects first, so small ones stay visible
    radii = np.sort(np.exp(rng.uniform(np.log(3), np.log(side * 0.45), n)))[::-1]
    cluster = None
    for radius in radii:
        if cluster is not None and rng.random() < 0.5:  # touching neighbours of a previous object
            center = cluster + rng.normal(0, 1, 2) * radius * 1.6
        else:
            center = rng.uniform([0, 0], [w, h])
        mask = _shape_mask(rng, shape, center, float(radius))
        _paint_object(canvas, rng, mask, bg_mean, soft_edges)
        cluster = center if rng.random() < 0.4 else None
    canvas.image *= linear_gradient(rng, shape, float(rng.uniform(0.0, 0.4)))[..., None]
    if rng.random() < 0.15:  # inverted polarity
        canvas.image = 255.0 - canvas.image
    if rng.random() < 0.15:  # grey-level images
        canvas.image[:] = canvas.image.mean(-1, keepdims=True)
    if rng.random() < 0.2:  # low global contrast
        canvas.image = canvas.image * rng.uniform(0.3, 0.6) + rng.uniform(0, 120)
    return canvas.finish(rng, noise=float(rng.uniform(0, 10)), blur=float(rng.choice([0, 0.5, 1.0, 1.8])), min_area=6)


def _check_soft_edges(value: Any) -> float:
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = float("nan")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"data.generator_params.soft_edges must be a share in [0, 1], got {value!r}")
    return share


def generate_scenes_dataset(out_dir: str | Path, *, n_train: int = 2000, n_val: int = 32, n_test: int = 64,
                            seed: int = 0, soft_edges: float = 0.0) -> Path:
    """Write generic scenes in the ``folder`` layout (byte-identical for one seed and options)."""
    return write_dataset(out_dir, render_scene, generator=GENERATOR, version=VERSION,
                         counts=split_counts(n_train, n_val, n_test), seed=seed,
                         options={"soft_edges": _check_soft_edges(soft_edges)})


def ensure_scenes_dataset(out_dir: str | Path, **params: float) -> Path:
    """Generate the scenes unless ``out_dir/DONE.json`` records the same parameters."""
    if "soft_edges" in params:  # checked before any work, not per rendered scene
        params = {**params, "soft_edges": _check_soft_edges(params["soft_edges"])}
    return ensure_generated(out_dir, render_scene, generator=GENERATOR, version=VERSION,
                            defaults={"n_train": 2000, "n_val": 32, "n_test": 64, "seed": 0, "soft_edges": 0.0},
                            params=params)
