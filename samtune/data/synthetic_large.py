"""Procedural images of large objects with instance masks: lesions and tiles.

Made to measure prompts on objects that cover much of the image (a point's zoom crop is a fraction of the image,
so it cuts them), with smaller objects beside them so that one set spans every size:

* lesions: a skin/tissue-like textured background with one to three large irregular lesions (radii 20-45 % of
  the shorter side, darker, mottled, with a soft rim) and a few small spots;
* tiles: a board-like background with one to three large rectangles (tiles, chips, panels: sides 35-90 % of the
  image, metallic or dark, with a bevel) and small pads.

Large objects are drawn first, so the small ones occlude them. One instance per object; instances under 16 px
are dropped. Sizes vary from 192 to 320 px per side.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from samtune.data.synthetic_common import (
    Canvas,
    ensure_generated,
    linear_gradient,
    random_size,
    smooth_noise,
    split_counts,
    write_dataset,
)

GENERATOR = "samtune.data.synthetic_large"
VERSION = 1
DEFAULTS = {"n_train": 16, "n_val": 16, "n_test": 32, "seed": 0}


def _blob(rng: np.random.Generator, center: np.ndarray, radius: float) -> np.ndarray:
    """Outline of an irregular ellipse, ``Nx2`` int32 (XY)."""
    angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    ratio, tilt = rng.uniform(0.55, 1.0), rng.uniform(0, np.pi)
    wobble = np.ones_like(angles)
    for k in range(2, 8):
        wobble += rng.uniform(0, 0.18 / (k - 1)) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    x, y = radius * np.cos(angles) * wobble, radius * ratio * np.sin(angles) * wobble
    rot = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
    return np.round(center + np.stack([x, y], 1) @ rot.T).astype(np.int32)


def _small_blobs(canvas: Canvas, rng: np.random.Generator, color: np.ndarray, count: int, radii: tuple[float, float],
                 contrast: float) -> None:
    """``count`` small irregular spots of ``color`` (+- ``contrast``), each an instance."""
    height, width = canvas.shape
    for _ in range(count):
        mask = canvas.blank()
        center = rng.uniform([0, 0], [width, height])
        cv2.fillPoly(mask, [_blob(rng, center, rng.uniform(*radii))], 1)
        canvas.paint(mask, np.clip(color * rng.uniform(1 - contrast, 1 + contrast), 0, 255), instance=True)


def _lesions(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    height, width = shape
    skin = np.array((222, 178, 150), np.float32) + rng.normal(0, 12, 3)
    background = skin * (1 + 0.06 * smooth_noise(rng, shape, 12) + 0.03 * smooth_noise(rng, shape, 3))[..., None]
    canvas = Canvas(background)
    side = min(height, width)
    for _ in range(int(rng.integers(1, 4))):
        mask = canvas.blank()
        radius = side * rng.uniform(0.2, 0.45)
        center = rng.uniform([0.2 * width, 0.2 * height], [0.8 * width, 0.8 * height])
        cv2.fillPoly(mask, [_blob(rng, center, radius)], 1)
        tone = np.array((120, 70, 55), np.float32) * rng.uniform(0.6, 1.3) + rng.normal(0, 10, 3)
        mottle = 1 + 0.2 * smooth_noise(rng, shape, int(rng.integers(4, 16)))
        rim = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(radius * 0.15, 1.0))
        level = (0.75 + 0.25 * (1 - rim / max(float(rim.max()), 1e-6)))[..., None]  # paler rim, darker core
        color = np.clip(tone * mottle[..., None] * level + 0.25 * (1 - rim[..., None]) * background, 0, 255)
        canvas.paint(mask, color, instance=True, alpha=float(rng.uniform(0.75, 0.95)))
    spot = np.array((95, 60, 50), np.float32) + rng.normal(0, 10, 3)
    _small_blobs(canvas, rng, spot, int(rng.integers(0, 7)), (3, 20), 0.3)
    canvas.image *= linear_gradient(rng, shape, float(rng.uniform(0.0, 0.3)))[..., None]
    return canvas.finish(rng, noise=float(rng.uniform(2, 6)), blur=float(rng.uniform(0.6, 1.4)))


def _tiles(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    height, width = shape
    board = np.array([(35, 95, 45), (25, 55, 120), (24, 25, 27), (190, 190, 185)][int(rng.integers(4))], np.float32)
    background = board * (1 + 0.08 * smooth_noise(rng, shape, 6))[..., None]
    canvas = Canvas(background)
    for _ in range(int(rng.integers(1, 4))):
        tw, th = width * rng.uniform(0.35, 0.9), height * rng.uniform(0.35, 0.9)
        cx, cy = rng.uniform(tw / 2, width - tw / 2), rng.uniform(th / 2, height - th / 2)
        box = cv2.boxPoints(((cx, cy), (tw, th), float(rng.choice([0.0, 0.0, rng.uniform(-12, 12)]))))
        mask = canvas.blank()
        cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
        if rng.random() < 0.5:  # metallic: a brightness ramp
            base = np.array((188, 188, 192) if rng.random() < 0.6 else (205, 165, 75), np.float32)
            color = base * linear_gradient(rng, shape, 0.4)[..., None]
        else:  # a dark body with a faint texture
            base = np.array((40, 40, 44), np.float32) * rng.uniform(0.6, 1.6)
            color = base * (1 + 0.15 * smooth_noise(rng, shape, 8))[..., None]
        edge = mask - cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=int(rng.integers(1, 4)))
        color = np.where(edge[..., None] > 0, color * 0.7, color)  # a bevel along the border
        canvas.paint(mask, np.clip(color, 0, 255), instance=True)
    pad = np.array((188, 188, 192) if rng.random() < 0.7 else (205, 165, 75), np.float32)
    for _ in range(int(rng.integers(0, 9))):
        mask = canvas.blank()
        x, y = rng.uniform([4, 4], [width - 4, height - 4])
        w, h = rng.uniform(4, 30, size=2)
        cv2.rectangle(mask, (int(x - w / 2), int(y - h / 2)), (int(x + w / 2), int(y + h / 2)), 1, -1)
        canvas.paint(mask, pad * rng.uniform(0.85, 1.05), instance=True)
    canvas.image *= linear_gradient(rng, shape, float(rng.uniform(0.0, 0.35)))[..., None]
    return canvas.finish(rng, noise=float(rng.uniform(2, 6)), blur=float(rng.uniform(0.5, 1.2)))


def render_large(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one image of large objects, lesions (50 %) or tiles (50 %).

    Returns:
        ``(image, instances)``: ``HxWx3`` uint8 RGB and ``HxW`` int32 ids ``0..N``.
    """
    shape = random_size(rng)
    return _lesions(rng, shape) if rng.random() < 0.5 else _tiles(rng, shape)


def generate_large_dataset(out_dir: str | Path, *, n_train: int = 16, n_val: int = 16, n_test: int = 32,
                           seed: int = 0) -> Path:
    """Write a large-object dataset in the ``folder`` layout (byte-identical for one seed)."""
    return write_dataset(out_dir, render_large, generator=GENERATOR, version=VERSION,
                         counts=split_counts(n_train, n_val, n_test), seed=seed)


def ensure_large_dataset(out_dir: str | Path, **params: int) -> Path:
    """Generate the dataset unless ``out_dir/DONE.json`` records the same parameters (``n_train``, ``n_val``,
    ``n_test``, ``seed``)."""
    return ensure_generated(out_dir, render_large, generator=GENERATOR, version=VERSION, defaults=DEFAULTS,
                            params=params)
