"""Fixed evaluation prompts, generated once from a seed and saved as JSON.

The zero-shot and the fine-tuned model are evaluated on exactly the same prompts: for every
instance of every evaluation image, a tight box, SAM's single centre point and a three-point
prompt. The file looks like::

    {"version": 1, "seed": 0, "images": {"val/img_001.png": [
        {"instance": 1, "box": [x1, y1, x2, y2],
         "point1": {"points": [[x, y]], "labels": [1]},
         "point3": {"points": [[x, y], [x, y], [x, y]], "labels": [1, 1, 0]}}, ...]}}

Coordinates are XY pixels of the original image, boxes XYXY with an inclusive maximum.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from numbers import Real
from pathlib import Path

import numpy as np
import torch

from samtune.prompts.sampling import (
    center_points,
    masks_to_boxes,
    sample_negative_points,
    sample_points_in_masks,
)
from samtune.utils.io import temp_file_beside

FORMAT_VERSION = 1
_CHUNK = 64  # instances rasterised at once, bounds memory on images with many instances


def _image_generator(seed: int, key: str) -> torch.Generator:
    """A generator seeded from ``seed`` and the image key only (independent of image order)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    entropy = [seed, zlib.crc32(key.encode("utf-8"))]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def _xy(point: torch.Tensor) -> list[int]:
    return [int(point[0]), int(point[1])]


def make_instance_prompts(instances: np.ndarray, *, seed: int, key: str) -> list[dict]:
    """Evaluation prompts for every instance of one image.

    Args:
        instances: H x W integer instance map, 0 = background, one id per instance.
        seed: experiment seed (>= 0).
        key: the image's key, e.g. its path relative to the dataset root; combined with ``seed``
            through ``zlib.crc32`` so the prompts of an image do not depend on the other images.

    Returns:
        One dict per instance id, sorted by id: ``{"instance": id, "box": [x1, y1, x2, y2],
        "point1": {"points": [[x, y]], "labels": [1]}, "point3": {"points": [[x, y]] * 3,
        "labels": [1, 1, 0]}}``. ``point1`` is the point farthest from the boundary
        (:func:`center_points`); ``point3`` adds a uniform random foreground pixel and a random
        background pixel near the instance (:func:`sample_negative_points`). All values are
        plain Python ints.
    """
    if (
        not isinstance(instances, np.ndarray)
        or instances.ndim != 2
        or not np.issubdtype(instances.dtype, np.integer)
    ):
        got = (
            f"{instances.dtype} array of shape {instances.shape}"
            if isinstance(instances, np.ndarray)
            else type(instances)
        )
        raise ValueError(f"{key}: instance map must be a 2-D integer array, got {got}")
    ids = np.unique(instances)
    if ids.size and ids[0] < 0:
        raise ValueError(f"{key}: instance ids must be >= 0 (0 = background), found {ids[0]}")
    ids = ids[ids > 0]
    generator = _image_generator(seed, key)
    prompts = []
    for start in range(0, ids.size, _CHUNK):
        chunk = ids[start : start + _CHUNK]
        masks = torch.from_numpy(instances[None] == chunk[:, None, None])
        boxes = masks_to_boxes(masks).long()
        centres = center_points(masks)[:, 0]
        positives = sample_points_in_masks(masks, 1, generator=generator)[:, 0]
        negatives = sample_negative_points(masks, 1, generator=generator)[:, 0]
        for i, instance_id in enumerate(chunk.tolist()):
            centre = _xy(centres[i])
            prompts.append(
                {
                    "instance": int(instance_id),
                    "box": [int(v) for v in boxes[i]],
                    "point1": {"points": [centre], "labels": [1]},
                    "point3": {
                        "points": [centre, _xy(positives[i]), _xy(negatives[i])],
                        "labels": [1, 1, 0],
                    },
                }
            )
    return prompts


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_point_prompt(value: object, where: str) -> None:
    if not isinstance(value, Mapping) or "points" not in value or "labels" not in value:
        raise ValueError(f"{where} must be an object with 'points' and 'labels', got {value!r}")
    points, labels = value["points"], value["labels"]
    if not isinstance(points, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(_is_number(c) for c in p) for p in points
    ):
        raise ValueError(f"{where}.points must be a list of [x, y] number pairs, got {points!r}")
    if not isinstance(labels, list) or len(labels) != len(points) or any(lb not in (0, 1) for lb in labels):
        raise ValueError(f"{where}.labels must be {len(points)} labels, each 0 or 1, got {labels!r}")


def _validate_images(images: object, source: str) -> dict[str, list[dict]]:
    """Check the ``images`` mapping; errors name ``source``, the image key and the field."""
    if not isinstance(images, Mapping):
        raise ValueError(
            f"{source}: 'images' must map image keys to prompt lists, got {type(images).__name__}"
        )
    for key, entries in images.items():
        if not isinstance(key, str):
            raise ValueError(f"{source}: image key {key!r} must be a string")
        if not isinstance(entries, list):
            raise ValueError(f"{source}: image {key!r}: prompts must be a list, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            where = f"{source}: image {key!r}, prompt {i}"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}: must be an object, got {entry!r}")
            for field in ("instance", "box", "point1", "point3"):
                if field not in entry:
                    raise ValueError(f"{where}: missing {field!r}")
            if not isinstance(entry["instance"], int) or isinstance(entry["instance"], bool):
                raise ValueError(f"{where}: 'instance' must be an integer id, got {entry['instance']!r}")
            where = f"{where} (instance {entry['instance']})"
            box = entry["box"]
            if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
                raise ValueError(f"{where}: 'box' must be 4 numbers [x1, y1, x2, y2], got {box!r}")
            _check_point_prompt(entry["point1"], f"{where}: 'point1'")
            _check_point_prompt(entry["point3"], f"{where}: 'point3'")
    return dict(images)


def save_prompts(path: str | os.PathLike, prompts: dict[str, list[dict]], *, seed: int) -> None:
    """Write evaluation prompts atomically (temporary file in the same folder, then rename).

    Args:
        path: destination JSON file; parent folders are created.
        prompts: image key -> list of instance prompts (as :func:`make_instance_prompts`).
        seed: the seed the prompts were made from, recorded in the file.

    Raises:
        ValueError: if ``prompts`` is malformed (nothing is written then).
    """
    path = Path(path)
    images = _validate_images(prompts, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": FORMAT_VERSION, "seed": seed, "images": images}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_prompts(path: str | os.PathLike) -> dict[str, list[dict]]:
    """Read and validate a file written by :func:`save_prompts`.

    Args:
        path: the JSON file.

    Returns:
        image key -> list of instance prompts.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is not valid JSON or not in the expected format; the message names the
            file and, where relevant, the image key and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: evaluation prompt file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON prompt file: {err}") from err
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{path}: expected an object with 'version', 'seed' and 'images'")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported prompt file version {data.get('version')!r}, expected {FORMAT_VERSION}"
        )
    return _validate_images(data["images"], str(path))
