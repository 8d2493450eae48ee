"""Procedural PCB-like images with instance masks (components, pads, solder joints, defects).

Each image is a board (green, blue, black or red solder mask with texture, noise and an
illumination gradient) carrying copper traces with 45-degree bends and vias, silkscreen text and
outlines, pads (rectangular or round, tinned or gold), two-terminal SMD parts with solder
joints, ICs with pins, and defects (scratches, spurs, opens, shorts, stains). Instances:
every component body, pad, pin, solder joint and defect; traces, vias and silkscreen are
background clutter. Later objects occlude earlier ones; instances under 16 px are dropped.
Sizes vary from 192 to 320 px per side.
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

GENERATOR = "samtune.data.synthetic_pcb"
VERSION = 1
BOARD_COLORS = {"green": (35, 95, 45), "dark_green": (20, 70, 35), "blue": (25, 55, 120),
                "black": (24, 25, 27), "red": (125, 30, 30)}
METALS = {"tin": (188, 188, 192), "gold": (205, 165, 75)}
_DIRECTIONS = [(np.cos(k * np.pi / 4), np.sin(k * np.pi / 4)) for k in range(8)]
_LABELS = "RCULDQJ"


def _trace_color(board: np.ndarray) -> np.ndarray:
    return np.clip(board * 1.45 + 22, 0, 255)


def _draw_traces(canvas: Canvas, rng: np.random.Generator, board: np.ndarray) -> list[np.ndarray]:
    """Copper traces (polylines with 45-degree bends) and vias; returns the trace points."""
    height, width = canvas.shape
    mask, vias = canvas.blank(), canvas.blank()
    lines = []
    for _ in range(int(rng.integers(4, 12))):
        point = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        direction = int(rng.integers(8))
        points = [point.copy()]
        for _ in range(int(rng.integers(2, 6))):
            direction = (direction + int(rng.choice([-1, 0, 0, 1]))) % 8
            point = point + np.array(_DIRECTIONS[direction]) * rng.uniform(15, 110)
            points.append(point.copy())
        pts = np.round(np.array(points)).astype(np.int32)
        cv2.polylines(mask, [pts], False, 1, thickness=int(rng.integers(2, 5)))
        lines.append(pts)
        if rng.random() < 0.6:
            cv2.circle(vias, tuple(int(v) for v in pts[-1]), int(rng.integers(3, 6)), 1, -1)
    canvas.paint(mask, _trace_color(board), instance=False)
    canvas.paint(vias, METALS["tin"], instance=False, alpha=0.8)
    holes = canvas.blank()
    for pts in lines:
        cv2.circle(holes, tuple(int(v) for v in pts[-1]), 1, 1, -1)
    canvas.paint(holes & vias, (20, 20, 20), instance=False)
    return lines


def _draw_silkscreen(canvas: Canvas, rng: np.random.Generator) -> None:
    height, width = canvas.shape
    mask = canvas.blank()
    for _ in range(int(rng.integers(2, 7))):
        text = f"{_LABELS[int(rng.integers(len(_LABELS)))]}{int(rng.integers(1, 40))}"
        org = (int(rng.integers(0, width - 20)), int(rng.integers(10, height)))
        cv2.putText(mask, text, org, cv2.FONT_HERSHEY_SIMPLEX, float(rng.uniform(0.3, 0.45)), 1, 1, cv2.LINE_8)
    for _ in range(int(rng.integers(0, 3))):
        x, y = int(rng.integers(0, width - 30)), int(rng.integers(0, height - 30))
        cv2.rectangle(mask, (x, y), (x + int(rng.integers(15, 60)), y + int(rng.integers(10, 40))), 1, 1)
    color = (235, 235, 228) if rng.random() < 0.8 else (220, 200, 90)
    canvas.paint(mask, color, instance=False, alpha=0.85)


def _metal(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Per-pixel metallic colour with a brightness ramp, ``HxWx3``."""
    base = np.array(METALS["gold" if rng.random() < 0.3 else "tin"], np.float32)
    return base * linear_gradient(rng, shape, 0.35)[..., None] * rng.uniform(0.85, 1.05)


def _rect(canvas: Canvas, center: tuple[float, float], size: tuple[float, float]) -> np.ndarray:
    mask = canvas.blank()
    (cx, cy), (w, h) = center, size
    cv2.rectangle(mask, (int(cx - w / 2), int(cy - h / 2)), (int(cx + w / 2), int(cy + h / 2)), 1, -1)
    return mask


def _draw_pads(canvas: Canvas, rng: np.random.Generator) -> None:
    height, width = canvas.shape
    metal = _metal(rng, canvas.shape)
    for _ in range(int(rng.integers(2, 9))):
        center = (rng.uniform(8, width - 8), rng.uniform(8, height - 8))
        if rng.random() < 0.5:
            mask = canvas.blank()
            cv2.circle(mask, (int(center[0]), int(center[1])), int(rng.integers(3, 8)), 1, -1)
        else:
            mask = _rect(canvas, center, (rng.uniform(5, 14), rng.uniform(5, 14)))
        canvas.paint(mask, metal, instance=True)


def _draw_two_terminal(canvas: Canvas, rng: np.random.Generator) -> None:
    """A resistor or capacitor: two pads, a body between them, a solder joint on each pad end."""
    height, width = canvas.shape
    length, thick = rng.uniform(14, 30), rng.uniform(7, 14)
    vertical = rng.random() < 0.5
    cx, cy = rng.uniform(20, width - 20), rng.uniform(20, height - 20)
    axis = np.array([0.0, 1.0]) if vertical else np.array([1.0, 0.0])
    pad_len = length * 0.35
    metal = _metal(rng, canvas.shape)
    ends = [np.array([cx, cy]) + s * axis * (length / 2) for s in (-1, 1)]
    pad_size = (thick * 1.1, pad_len) if vertical else (pad_len, thick * 1.1)
    for end in ends:
        canvas.paint(_rect(canvas, tuple(end), pad_size), metal, instance=True)
    body_size = (thick, length * 0.8) if vertical else (length * 0.8, thick)
    body_color = (28, 28, 30) if rng.random() < 0.5 else (165, 125, 80)
    body = _rect(canvas, (cx, cy), body_size)
    canvas.paint(body, np.array(body_color) * rng.uniform(0.85, 1.15), instance=True)
    for sign, end in zip((-1, 1), ends, strict=True):
        if rng.random() < 0.85:
            joint = canvas.blank()
            center = end + sign * axis * pad_len * 0.25
            axes = (pad_len * 0.35, thick * 0.5) if not vertical else (thick * 0.5, pad_len * 0.35)
            cv2.ellipse(joint, (int(center[0]), int(center[1])), (max(2, int(axes[0])), max(2, int(axes[1]))),
                        0, 0, 360, 1, -1)
            canvas.paint(joint, np.clip(np.array(METALS["tin"]) * 1.15, 0, 255), instance=True)


def _draw_ic(canvas: Canvas, rng: np.random.Generator) -> None:
    """An IC: pins on two or four sides (instances) under a dark body (instance)."""
    height, width = canvas.shape
    bw, bh = rng.uniform(28, 64), rng.uniform(20, 48)
    cx, cy = rng.uniform(bw / 2 + 8, width - bw / 2 - 8), rng.uniform(bh / 2 + 8, height - bh / 2 - 8)
    metal = _metal(rng, canvas.shape)
    pitch, pin_w, pin_l = rng.uniform(6, 9), rng.uniform(3, 4.5), rng.uniform(6, 9)
    sides = ["top", "bottom"] if rng.random() < 0.6 else ["top", "bottom", "left", "right"]
    for side in sides:
        span = bw if side in ("top", "bottom") else bh
        count = max(2, int((span - 4) // pitch))
        offsets = (np.arange(count) - (count - 1) / 2) * pitch
        for off in offsets:
            if side in ("top", "bottom"):
                y = cy + (-1 if side == "top" else 1) * (bh / 2 + pin_l / 2 - 2)
                mask = _rect(canvas, (cx + off, y), (pin_w, pin_l))
            else:
                x = cx + (-1 if side == "left" else 1) * (bw / 2 + pin_l / 2 - 2)
                mask = _rect(canvas, (x, cy + off), (pin_l, pin_w))
            canvas.paint(mask, metal, instance=True)
    body = _rect(canvas, (cx, cy), (bw, bh))
    shade = np.array((30, 30, 33), np.float32) * (1 + 0.15 * smooth_noise(rng, canvas.shape, 12))[..., None]
    canvas.paint(body, shade, instance=True)
    dot = canvas.blank()  # pin-1 marker: colour only, stays part of the body instance
    cv2.circle(dot, (int(cx - bw / 2 + 5), int(cy - bh / 2 + 5)), 2, 1, -1)
    canvas.paint(dot, (70, 70, 72), instance=False)


def _curve(rng: np.random.Generator, start: np.ndarray, length: float) -> np.ndarray:
    """A smooth random curve (quadratic Bezier) of about ``length`` px, ``Nx1x2`` int32."""
    angle = rng.uniform(0, 2 * np.pi)
    end = start + length * np.array([np.cos(angle), np.sin(angle)])
    ctrl = (start + end) / 2 + rng.normal(0, length * 0.25, 2)
    t = np.linspace(0, 1, 24)[:, None]
    pts = (1 - t) ** 2 * start + 2 * (1 - t) * t * ctrl + t**2 * end
    return np.round(pts).astype(np.int32).reshape(-1, 1, 2)


def _draw_defects(canvas: Canvas, rng: np.random.Generator, board: np.ndarray, lines: list[np.ndarray]) -> None:
    """Scratches, spurs, opens, shorts and stains, each one instance."""
    height, width = canvas.shape
    copper = _trace_color(board)
    for _ in range(int(rng.integers(1, 5))):
        kind = rng.choice(["scratch", "scratch", "spur", "open", "short", "stain"])
        trace = lines[int(rng.integers(len(lines)))]
        seg = int(rng.integers(len(trace) - 1))
        on_trace = trace[seg] + rng.uniform(0.2, 0.8) * (trace[seg + 1] - trace[seg])
        mask = canvas.blank()
        if kind == "scratch":
            start = np.array([rng.uniform(0, width), rng.uniform(0, height)])
            cv2.polylines(mask, [_curve(rng, start, rng.uniform(30, 150))], False, 1, int(rng.integers(1, 3)))
            color = np.clip(board * 1.8 + 70, 0, 255) if rng.random() < 0.6 else board * 0.35
        elif kind == "spur":
            angle = rng.uniform(0, 2 * np.pi)
            tip = on_trace + np.array([np.cos(angle), np.sin(angle)]) * rng.uniform(6, 14)
            base = np.array([rng.normal(0, 3, 2) + on_trace for _ in range(2)])
            cv2.fillPoly(mask, [np.round(np.vstack([base, tip])).astype(np.int32)], 1)
            color = copper
        elif kind == "open":
            cv2.circle(mask, tuple(int(v) for v in on_trace), int(rng.integers(3, 6)), 1, -1)
            color = np.clip(board * 0.85 + np.array([40, 30, 10]), 0, 255)
        elif kind == "short":
            other = lines[int(rng.integers(len(lines)))]
            target = other[int(rng.integers(len(other)))]
            if np.linalg.norm(target - on_trace) > 60:
                target = on_trace + rng.normal(0, 15, 2)
            cv2.line(mask, tuple(int(v) for v in on_trace), tuple(int(v) for v in target), 1, int(rng.integers(2, 4)))
            color = copper
        else:
            center = np.array([rng.uniform(10, width - 10), rng.uniform(10, height - 10)])
            angles = np.linspace(0, 2 * np.pi, 20, endpoint=False)
            radius = rng.uniform(4, 14) * (1 + 0.3 * rng.normal(size=20).clip(-1.5, 1.5))
            pts = center + np.stack([np.cos(angles), np.sin(angles)], 1) * radius[:, None]
            cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
            color = np.array((95, 75, 40)) * rng.uniform(0.6, 1.2)
        canvas.paint(mask, color, instance=True, alpha=float(rng.uniform(0.6, 0.9)) if kind == "stain" else 1.0)


def render_pcb(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one PCB-like image.

    Args:
        rng: Random generator (the image depends only on its state).

    Returns:
        ``(image, instances)``: ``HxWx3`` uint8 RGB and ``HxW`` int32 ids ``0..N``.
    """
    shape = random_size(rng)
    board = np.array(list(BOARD_COLORS.values())[int(rng.integers(len(BOARD_COLORS)))], np.float32)
    board = np.clip(board + rng.normal(0, 6, 3), 0, 255)
    texture = 1 + 0.06 * smooth_noise(rng, shape, 16) + 0.03 * smooth_noise(rng, shape, 4)
    canvas = Canvas(board * texture[..., None])
    lines = _draw_traces(canvas, rng, board)
    _draw_silkscreen(canvas, rng)
    _draw_pads(canvas, rng)
    for _ in range(int(rng.integers(1, 6))):
        _draw_two_terminal(canvas, rng)
    for _ in range(int(rng.integers(0, 2))):
        _draw_ic(canvas, rng)
    _draw_defects(canvas, rng, board, lines)
    canvas.image *= linear_gradient(rng, shape, float(rng.uniform(0.1, 0.3)))[..., None]
    return canvas.finish(rng, noise=float(rng.uniform(2, 5)), blur=float(rng.uniform(0.5, 0.9)))



def generate_pcb_dataset(out_dir: str | Path, *, n_train: int = 48, n_val: int = 12, n_test: int = 16,
                         seed: int = 0) -> Path:
    """Write a synthetic PCB dataset in the ``folder`` layout (byte-identical for one seed).

    Args:
        out_dir: Dataset folder; replaced atomically if a samtune generator wrote it before.
        n_train: Training images.
        n_val: Validation images.
        n_test: Test images.
        seed: Base seed.

    Returns:
        ``out_dir`` (absolute), holding ``{split}/images``, ``{split}/masks`` and ``DONE.json``.
    """
    return write_dataset(out_dir, render_pcb, generator=GENERATOR, version=VERSION,
                         counts=split_counts(n_train, n_val, n_test), seed=seed)


def ensure_pcb_dataset(out_dir: str | Path, **params: int) -> Path:
    """Generate the dataset unless ``out_dir/DONE.json`` records the same parameters.

    Args:
        out_dir: Dataset folder.
        **params: ``n_train``, ``n_val``, ``n_test``, ``seed`` as in ``generate_pcb_dataset``.

    Returns:
        ``out_dir`` (absolute).
    """
    return ensure_generated(out_dir, render_pcb, generator=GENERATOR, version=VERSION,
                            defaults={"n_train": 48, "n_val": 12, "n_test": 16, "seed": 0}, params=params)
