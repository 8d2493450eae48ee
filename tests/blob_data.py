"""A tiny generated dataset for fast end-to-end tests: a few small images with 2-3 blobs each (folder layout)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def write_blob_dataset(root: Path, splits: dict[str, int] | None = None, *, size: tuple[int, int] = (48, 64),
                       seed: int = 0) -> Path:
    """Write ``root/{split}/images/*.png`` and ``root/{split}/masks/*.png`` (uint8 instance ids).

    Each image has 2 or 3 filled ellipses and rectangles in distinct colours on a noisy background.
    """
    splits = splits or {"train": 2, "val": 1, "test": 2}
    rng = np.random.default_rng(seed)
    h, w = size
    for split, n in splits.items():
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = rng.integers(20, 60, size=(h, w, 3), dtype=np.uint8)
            ids = np.zeros((h, w), np.uint8)
            for k in range(1, 2 + int(rng.integers(1, 3))):
                layer = np.zeros((h, w), np.uint8)
                cx, cy = int(rng.integers(10, w - 10)), int(rng.integers(10, h - 10))
                if k % 2:
                    cv2.ellipse(layer, (cx, cy), (int(rng.integers(4, 9)), int(rng.integers(4, 9))), 0, 0, 360, 1, -1)
                else:
                    cv2.rectangle(layer, (cx - 6, cy - 4), (cx + 6, cy + 4), 1, -1)
                ids[layer > 0] = k
                image[layer > 0] = rng.integers(120, 255, size=3)
            cv2.imwrite(str(root / split / "images" / f"{split}_{i}.png"), image[..., ::-1])
            cv2.imwrite(str(root / split / "masks" / f"{split}_{i}.png"), ids)
    return root


def blob_args(root: Path) -> list[str]:
    """Overrides that point a ``tiny_args`` run at a blob dataset (instead of the generated PCB boards)."""
    return [f"data.root={root}", "data.generator=null", "data.augment=none", "eval.overlays=1",
            "eval.worst=1"]


DISC_CENTRES = ((30, 30), (100, 40), (160, 60), (50, 120), (120, 130), (170, 170), (40, 170), (90, 85))


def small_discs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 192-px image of eight discs 13 px across on a noisy dark background (objects a few pixels wide in a 256-px
    model input), and its instance map (ids 1..8)."""
    rng = np.random.default_rng(seed)
    image = (40 + rng.integers(0, 20, (192, 192, 3))).astype(np.uint8)
    instances = np.zeros((192, 192), np.int32)
    for i, (x, y) in enumerate(DISC_CENTRES, start=1):
        cv2.circle(instances, ((x + 7 * seed) % 180 + 6, y), 6, i, -1)
    image[instances > 0] = (220, 200, 80)
    return image, instances


def write_disc_dataset(root: Path, split: str, n: int) -> Path:
    """``root/{split}/images|masks`` with ``n`` images of :func:`small_discs` (seeds 0..n-1)."""
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, instances = small_discs(i)
        cv2.imwrite(str(root / split / "images" / f"discs_{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / split / "masks" / f"discs_{i}.png"), instances.astype(np.uint8))
    return root
