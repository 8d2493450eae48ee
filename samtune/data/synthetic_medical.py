"""Procedural nucleus images with instance masks, in two microscopy styles mixed by seed.

* fluorescence: dark background, blue (DAPI-like) or green glowing nuclei with inner texture,
  soft edges and sensor noise;
* histology: pink (eosin-like) textured background with paler gaps, purple (haematoxylin-like)
  nuclei with darker chromatin specks.

Nuclei are irregular ellipses (radial harmonics) with radii between 6 and 30 px; they may
touch and partly overlap (the later one occludes). One instance per nucleus; instances under
16 px are dropped. Sizes vary from 192 to 320 px per side.
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

GENERATOR = "samtune.data.synthetic_medical"
VERSION = 1
RADIUS_RANGES = ((6, 12), (9, 20), (15, 30))


def _nucleus_polygon(rng: np.random.Generator, center: np.ndarray, radius: float) -> np.ndarray:
    """Outline of an irregular ellipse, ``Nx2`` int32 (XY)."""
    angles = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    ratio, tilt = rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    wobble = np.ones_like(angles)
    for k in range(2, 6):
        wobble += rng.uniform(0, 0.12 / (k - 1)) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    x = radius * np.cos(angles) * wobble
    y = radius * ratio * np.sin(angles) * wobble
    rot = np.array([[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]])
    return np.round(center + np.stack([x, y], 1) @ rot.T).astype(np.int32)


Nucleus = tuple[np.ndarray, tuple[int, int, int, int], float]


def _place_nuclei(canvas: Canvas, rng: np.random.Generator) -> list[Nucleus]:
    """Lay out nuclei: ``(mask hxw uint8, box (x, y, w, h), brightness)`` each, in drawing order."""
    height, width = canvas.shape
    low, high = RADIUS_RANGES[int(rng.integers(len(RADIUS_RANGES)))]
    coverage = rng.uniform(0.12, 0.35)
    target = int(np.clip(coverage * height * width / (np.pi * ((low + high) / 2) ** 2), 3, 80))
    occupied = canvas.blank()
    nuclei: list[Nucleus] = []
    clustered = rng.random() < 0.5
    for _ in range(target * 4):
        if len(nuclei) >= target:
            break
        radius = rng.uniform(low, high)
        if clustered and nuclei and rng.random() < 0.5:  # bud off an existing nucleus: touching pairs
            mask, (x, y, _, _), _ = nuclei[int(rng.integers(len(nuclei)))]
            ys, xs = np.nonzero(mask)
            k = int(rng.integers(len(xs)))
            center = np.array([x + xs[k], y + ys[k]], np.float64) + rng.normal(0, radius * 0.6, 2)
        else:
            center = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        pts = _nucleus_polygon(rng, center, radius)
        x0, y0 = np.maximum(pts.min(0), 0)
        x1, y1 = np.minimum(pts.max(0) + 1, (width, height))
        if x1 <= x0 or y1 <= y0:
            continue
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [pts - np.array([x0, y0], np.int32)], 1)
        taken = occupied[y0:y1, x0:x1]
        area = int(mask.sum())
        if area == 0 or int((mask & taken).sum()) > 0.15 * area:
            continue
        taken |= mask
        nuclei.append((mask, (int(x0), int(y0), int(x1 - x0), int(y1 - y0)), float(rng.uniform(0.45, 1.0))))
    return nuclei


def _crop(array: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    return array[y:y + h, x:x + w]


def _fluorescence(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    background = rng.uniform(4, 18) * (1 + 0.3 * smooth_noise(rng, shape, 40))
    canvas = Canvas(np.repeat(background[..., None], 3, axis=2))
    color = np.array((60, 110, 255) if rng.random() < 0.6 else (50, 255, 110), np.float32)
    texture = 1 + 0.18 * smooth_noise(rng, shape, 4)
    for mask, box, brightness in _place_nuclei(canvas, rng):
        glow = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 2.0)  # brighter centre, dimmer rim
        level = (0.55 + 0.45 * glow / max(float(glow.max()), 1e-6)) * _crop(texture, box) * brightness
        canvas.paint(mask, color * level[..., None] + _crop(background, box)[..., None], instance=True, box=box)
    canvas.image *= linear_gradient(rng, shape, float(rng.uniform(0.0, 0.3)))[..., None]
    return canvas.finish(rng, noise=float(rng.uniform(2, 6)), blur=float(rng.uniform(0.8, 1.5)))


def _histology(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    pink = np.array((232, 175, 205), np.float32) + rng.normal(0, 6, 3)
    fibres = smooth_noise(rng, shape, 10)
    gaps = (smooth_noise(rng, shape, 24) > 1.1)[..., None]
    background = pink * (1 + 0.07 * fibres + 0.03 * smooth_noise(rng, shape, 3))[..., None]
    background = np.where(gaps, np.array((245, 235, 240), np.float32), background)
    canvas = Canvas(background)
    purple = np.array((85, 50, 135), np.float32) + rng.normal(0, 8, 3)
    chromatin = 1 + 0.25 * smooth_noise(rng, shape, 3)
    for mask, box, brightness in _place_nuclei(canvas, rng):
        tone = purple * (0.75 + 0.5 * (1 - brightness)) * _crop(chromatin, box)[..., None]
        canvas.paint(mask, np.clip(tone, 0, 255), instance=True, alpha=float(rng.uniform(0.8, 0.95)), box=box)
    return canvas.finish(rng, noise=float(rng.uniform(2, 5)), blur=float(rng.uniform(0.6, 1.1)))


def render_medical(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one nucleus image, fluorescence (60 %) or histology (40 %) style.

    Args:
        rng: Random generator (the image depends only on its state).

    Returns:
        ``(image, instances)``: ``HxWx3`` uint8 RGB and ``HxW`` int32 ids ``0..N``.
    """
    shape = random_size(rng)
    return _fluorescence(rng, shape) if rng.random() < 0.6 else _histology(rng, shape)



def generate_medical_dataset(out_dir: str | Path, *, n_train: int = 48, n_val: int = 12, n_test: int = 16,
                             seed: int = 0) -> Path:
    """Write a synthetic nucleus dataset in the ``folder`` layout (byte-identical for one seed).

    Args:
        out_dir: Dataset folder; replaced atomically if a samtune generator wrote it before.
        n_train: Training images.
        n_val: Validation images.
        n_test: Test images.
        seed: Base seed.

    Returns:
        ``out_dir`` (absolute), holding ``{split}/images``, ``{split}/masks`` and ``DONE.json``.
    """
    return write_dataset(out_dir, render_medical, generator=GENERATOR, version=VERSION,
                         counts=split_counts(n_train, n_val, n_test), seed=seed)


def ensure_medical_dataset(out_dir: str | Path, **params: int) -> Path:
    """Generate the dataset unless ``out_dir/DONE.json`` records the same parameters.

    Args:
        out_dir: Dataset folder.
        **params: ``n_train``, ``n_val``, ``n_test``, ``seed`` as in ``generate_medical_dataset``.

    Returns:
        ``out_dir`` (absolute).
    """
    return ensure_generated(out_dir, render_medical, generator=GENERATOR, version=VERSION,
                            defaults={"n_train": 48, "n_val": 12, "n_test": 16, "seed": 0}, params=params)
