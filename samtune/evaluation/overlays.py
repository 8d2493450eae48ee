"""Pictures for reports: instance overlays (ground truth beside each model) and the clicks curve."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from samtune.data.records import ImageRecord, load_record
from samtune.evaluation.evaluator import map_path
from samtune.predict.modes import TITLES as MODE_TITLES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colorize(instances: np.ndarray, seed: int = 0) -> np.ndarray:
    """H x W instance map -> H x W x 4 RGBA overlay, one colour per id, largest instances drawn first."""
    rgba = np.zeros((*instances.shape, 4), np.float32)
    ids, counts = np.unique(instances[instances > 0], return_counts=True)
    rng = np.random.default_rng(seed)
    palette = rng.uniform(0.2, 1.0, size=(max(int(instances.max(initial=0)) + 1, 1), 3))
    for i in ids[np.argsort(-counts, kind="stable")]:
        rgba[instances == i, :3] = palette[i]
        rgba[instances == i, 3] = 0.55
    return rgba


def blend(image: np.ndarray, instances: np.ndarray, seed: int = 0) -> np.ndarray:
    """H x W x 3 uint8 picture of ``image`` with each instance of ``instances`` in its own colour."""
    rgba = colorize(instances, seed)
    alpha = rgba[..., 3:]
    out = image.astype(np.float32) * (1 - alpha) + 255 * rgba[..., :3] * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


def overlay_name(rel_path: str) -> str:
    """File name of the overlay picture of image ``rel_path``."""
    return rel_path.replace("/", "__").rsplit(".", 1)[0] + ".png"


def save_overlays(
    out_dir: Path,
    records: list[ImageRecord],
    map_dirs: dict[str, Path],
    *,
    mode: str = "box",
    binary_as_one_object: bool = False,
    captions: dict[str, dict[str, str]] | None = None,
) -> list[Path]:
    """One picture per image: ground truth, then each model's predicted masks for ``mode`` prompts.

    Args:
        out_dir: Folder of the pictures (named by :func:`overlay_name`).
        records: Images to draw.
        map_dirs: model name -> folder of its predicted instance maps (see ``evaluate_model(map_dir=...)``).
        mode: Prompt mode of the maps (for titles).
        binary_as_one_object: Mask interpretation, as for evaluation.
        captions: rel_path -> model name -> text appended to the panel title (e.g. the image's mIoU).
    """
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for record in records:
        panels = []
        for name, folder in map_dirs.items():
            path = map_path(folder, record.rel_path)
            if path.is_file():
                panels.append((name, cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.int32)))
        if not panels:
            continue
        image, gt = load_record(record, binary_as_one_object=binary_as_one_object)
        fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 4), squeeze=False)
        extra = (captions or {}).get(record.rel_path, {})
        for ax, (title, inst) in zip(axes[0], [("ground truth", gt), *panels]):
            ax.imshow(image)
            ax.imshow(colorize(inst))
            if title != "ground truth":
                title = f"{title} ({MODE_TITLES.get(mode, mode)}){extra.get(title, '')}"
            ax.set_title(title)
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / overlay_name(record.rel_path)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def plot_clicks(path: Path, curves: dict[str, dict[str, float]]) -> Path:
    """mIoU after k clicks, one line per model (``curves``: name -> {"1": mIoU, "2": ...})."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in curves.items():
        ks = sorted(int(k) for k in curve)
        ax.plot(ks, [curve[str(k)] for k in ks], marker="o", ms=3, label=name)
    for level in (0.85, 0.9):
        ax.axhline(level, color="grey", lw=0.6, ls="--")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("clicks")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
