"""Fine-tuning learns: a short ``python train.py`` run beats zero-shot on held-out images by a clear margin.

The task: objects drawn as their outline only (an ellipse's contour, 2 px wide, on a noisy background) and annotated
as the whole region inside it, as drawn contours or membrane-stained cells are annotated. The shipped generalist
segments the bright stroke (or nothing) rather than the region it encloses: zero-shot mIoU on the held-out images is
0.52 for boxes, 0.31 for three points and 0.09 for one point. Filling the contour is learnable by the mask decoder
alone (the cached ``finetune=decoder_only`` recipe) in 24 steps, and carries over to the held-out images: +0.16
(box), +0.48 (one point), +0.18 (three points). The margins asked for below are about a third of those gains in
every mode, and half of their mean.

Runs that do not learn fail (measured): learning rate 0 (gain 0 everywhere); the loss's sign flipped (box -0.52);
only the IoU head training, the mask path frozen (box and three points exactly 0, although one point gains +0.45 by
choosing a better multimask output: hence a margin in every mode); the mask terms of the loss off (box -0.41); the
targets mirrored in the loss (box -0.45).

The run is deterministic: one OpenMP thread (also much faster on a shared 2-core machine), fixed seeds for the data
and for training, a fresh embedding cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.test_train_e2e import ROOT

MODES = ("box", "point1", "point3")
MIN_GAIN = {"box": 0.05, "point1": 0.15, "point3": 0.06}  # each mode, mIoU fine-tuned - zero-shot
MIN_MEAN_GAIN = 0.15  # over the three modes
STEPS = 24  # 4 epochs of 24 images in batches of 4


def write_outlined_objects(root: Path, splits: dict[str, int], *, size: int = 128, seed: int = 0) -> Path:
    """``root/{split}/images|masks``: per image 3 non-touching ellipses drawn as 2 px bright contours, each
    annotated as its filled interior (uint8 instance ids)."""
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = rng.integers(20, 60, size=(size, size, 3), dtype=np.uint8)
            ids = np.zeros((size, size), np.uint8)
            k = 0
            for _ in range(30):
                if k == 3:
                    break
                a, b = int(rng.integers(12, 28)), int(rng.integers(12, 28))
                cx, cy = int(rng.integers(a + 2, size - a - 2)), int(rng.integers(b + 2, size - b - 2))
                layer = np.zeros_like(ids)
                cv2.ellipse(layer, (cx, cy), (a, b), 0, 0, 360, 1, -1)
                if (ids[cv2.dilate(layer, np.ones((5, 5), np.uint8)) > 0] > 0).any():
                    continue  # keep objects apart
                k += 1
                ids[layer > 0] = k
                colour = tuple(int(c) for c in rng.integers(150, 255, size=3))
                cv2.ellipse(image, (cx, cy), (a, b), 0, 0, 360, colour, 2)
            cv2.imwrite(str(root / split / "images" / f"{split}_{i}.png"), image[..., ::-1])
            cv2.imwrite(str(root / split / "masks" / f"{split}_{i}.png"), ids)
    return root


def learn_args(tmp: Path, run_dir: Path, *extra: str) -> list[str]:
    """``python train.py`` on the outlined objects: the shipped sam_tiny, decoder only (cached), 24 steps."""
    return [
        sys.executable, str(ROOT / "train.py"), "debug=tiny", "data=folder", f"data.root={tmp / 'outlines'}",
        "data.val_split=null", "data.augment=none", "data.batch_size=4", "data.max_instances=3",
        "finetune=decoder_only", "loss=bce_dice", "optimizer.lr=1e-3", "scheduler=none",
        "prompts.correction_rounds=0", "prompts.mask_only_rounds=0", "trainer.max_epochs=4",
        "trainer.limit_train_batches=1.0", f"cache.dir={tmp / 'cache'}", "eval.overlays=0", "eval.worst=0",
        f"hydra.run.dir={run_dir}", *extra,
    ]


def train_report(tmp: Path, run_dir: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(learn_args(tmp, run_dir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learns")
    write_outlined_objects(tmp / "outlines", {"train": 24, "test": 8}, seed=1)  # test: held-out images
    run_dir = tmp / "run"
    return run_dir, train_report(tmp, run_dir)


def test_finetuning_beats_zero_shot_on_held_out_images(learned):
    run_dir, report = learned
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == STEPS
    zero, tuned = report["zero_shot"], report["finetuned"]
    gains = {m: tuned[m]["miou"] - zero[m]["miou"] for m in MODES}
    for mode in MODES:
        assert zero[mode]["n"] == tuned[mode]["n"] == 24  # every held-out object, the same prompts on both sides
        assert report["gain"][mode] == pytest.approx(gains[mode])
    summary = {m: (round(zero[m]["miou"], 3), round(tuned[m]["miou"], 3)) for m in MODES}
    for mode in MODES:
        assert gains[mode] >= MIN_GAIN[mode], f"{mode}: fine-tuning did not learn (zero-shot, fine-tuned) {summary}"
    assert sum(gains.values()) / len(MODES) >= MIN_MEAN_GAIN, summary
