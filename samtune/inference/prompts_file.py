"""The prompts file of ``scripts/predict.py mode=box|points``.

A JSON object keyed by image path relative to the input folder (or the file name, for a single input image)::

    {"board_01.png": {"boxes": [[x1, y1, x2, y2], ...],
                      "points": [{"points": [[x, y], ...], "labels": [1, 0, ...]}, ...]},
     "sub/board_02.png": {"boxes": [[10, 20, 50, 60]]}}

Coordinates are pixels of the original image (x = column, y = row); boxes XYXY; label 1 marks a point on the
object, 0 a point on the background. ``mode=box`` reads ``boxes``, ``mode=points`` reads ``points``; each
entry gives one mask.
"""

from __future__ import annotations

from numbers import Real
from pathlib import Path

from samtune.utils.io import read_json

PROMPT_KEYS = {"box": "boxes", "points": "points"}


class PromptFileError(ValueError):
    """The prompts file is malformed; the message names the file, the image and the entry."""


def _number(v: object) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _box(value: object, where: str) -> list[float]:
    if not (isinstance(value, list) and len(value) == 4 and all(_number(v) for v in value)):
        raise PromptFileError(f"{where}: a box is [x1, y1, x2, y2] (4 numbers), got {value!r}")
    if value[2] < value[0] or value[3] < value[1]:
        raise PromptFileError(f"{where}: box {value} has x2 < x1 or y2 < y1")
    return [float(v) for v in value]


def _point_set(value: object, where: str) -> dict:
    if not isinstance(value, dict) or set(value) != {"points", "labels"}:
        raise PromptFileError(f"{where}: a point prompt is {{\"points\": [[x, y], ...], \"labels\": [1, ...]}}, "
                              f"got {value!r}")
    pts, labels = value["points"], value["labels"]
    if not (isinstance(pts, list) and pts and all(isinstance(p, list) and len(p) == 2 and all(_number(c) for c in p)
                                                  for p in pts)):
        raise PromptFileError(f"{where}: points must be a non-empty list of [x, y], got {pts!r}")
    if not (isinstance(labels, list) and len(labels) == len(pts) and all(v in (0, 1) for v in labels)):
        raise PromptFileError(f"{where}: labels must be one 0 or 1 per point ({len(pts)} points), got {labels!r}")
    return {"points": [[float(x), float(y)] for x, y in pts], "labels": [int(v) for v in labels]}


def load_prompt_file(path: str | Path, mode: str, image_keys: list[str]) -> dict[str, list[dict]]:
    """Read and check the prompts of ``mode`` for the input images.

    Args:
        path: The JSON file.
        mode: ``box`` or ``points``.
        image_keys: Keys of the input images (relative posix paths).

    Returns:
        key -> list of prompt dicts (``{"box": [...]}`` or ``{"points": {"points", "labels"}}``), for each image
        that has prompts.

    Raises:
        PromptFileError: a malformed entry, or a key that matches no input image.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompts={path}: file not found")
    data = read_json(path)
    if not isinstance(data, dict):
        raise PromptFileError(f"{path}: expected an object keyed by image file name, got {type(data).__name__}")
    unknown = sorted(set(data) - set(image_keys))
    if unknown:
        raise PromptFileError(f"{path}: {len(unknown)} keys match no input image, e.g. {unknown[:3]}; keys are paths "
                              f"relative to the input folder, e.g. {image_keys[:3]}")
    field = PROMPT_KEYS[mode]
    out: dict[str, list[dict]] = {}
    for key, entry in data.items():
        where = f"{path}: {key!r}"
        if not isinstance(entry, dict) or not set(entry) <= set(PROMPT_KEYS.values()):
            raise PromptFileError(f"{where}: expected {{\"boxes\": [...], \"points\": [...]}}, got {entry!r}")
        items = entry.get(field) or []
        if not isinstance(items, list):
            raise PromptFileError(f"{where}.{field}: expected a list, got {type(items).__name__}")
        if mode == "box":
            out[key] = [{"box": _box(b, f"{where}.boxes[{i}]")} for i, b in enumerate(items)]
        else:
            out[key] = [{"points": _point_set(p, f"{where}.points[{i}]")} for i, p in enumerate(items)]
    return out
