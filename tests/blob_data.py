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
