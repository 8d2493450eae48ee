"""Dataset sources: find the labelled images of one split on disk and check them.

Two layouts are supported:

* ``folder``: ``root/{split}/images/<id>.<ext>`` and ``root/{split}/masks/<id>.png``
  (binary or instance-id masks, see ``load_instance_mask``);
* ``coco``: ``root/{split}/annotations.json`` (COCO instances), image ``file_name`` relative
  to ``root/{split}``.

Each scanner returns ``(records, skipped)``. Problems with single items (a missing mask, an
unreadable file, a size mismatch) are collected; without ``skip_invalid`` they are raised
together as one ``DataError`` listing every bad file, with it the bad items are skipped,
warned about and reported in ``skipped`` as ``{"file": <path relative to root>, "reason": ...}``.
Structural problems (no split folder, no images at all) always raise.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from samtune.data.errors import DataError
from samtune.data.io import IMAGE_EXTENSIONS
from samtune.data.records import ImageRecord, load_record
from samtune.utils.cpus import usable_cpus

logger = logging.getLogger(__name__)

MASK_EXTENSIONS = (".png", ".tif", ".tiff")
SOURCES = ("folder", "coco")
_MAX_LISTED = 20


class _Issues:
    """Bad items found while scanning one split."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.items: list[tuple[Path, str]] = []

    def add(self, path: Path, reason: str) -> None:
        self.items.append((Path(path), reason))

    def report(self) -> list[dict[str, str]]:
        return [{"file": _rel(path, self.root), "reason": reason} for path, reason in self.items]

    def finish(self, records: list[ImageRecord], where: Path, skip_invalid: bool) -> list[dict[str, str]]:
        """Raise or warn about the collected issues; returns the skip report."""
        if not self.items:
            return []
        lines = [f"  {path}: {reason}" for path, reason in self.items[:_MAX_LISTED]]
        if len(self.items) > _MAX_LISTED:
            lines.append(f"  ... and {len(self.items) - _MAX_LISTED} more")
        if not skip_invalid:
            if len(self.items) == 1:
                path, reason = self.items[0]
                raise DataError.at(path, reason + " (pass skip_invalid=True to skip bad items)")
            raise DataError(f"{where}: {len(self.items)} invalid items (pass skip_invalid=True to skip them):\n"
                            + "\n".join(lines), path=where, reason=f"{len(self.items)} invalid items")
        for path, reason in self.items:
            logger.warning("skipping %s: %s", path, reason)
        warnings.warn(f"{where}: skipped {len(self.items)} invalid items:\n" + "\n".join(lines), stacklevel=3)
        if not records:
            raise DataError.at(where, f"no valid items left: all {len(self.items)} were invalid")
        return self.report()


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, posix style."""
    return Path(os.path.relpath(path, root)).as_posix()


def _split_dir(root: str | Path, split: str) -> Path:
    """Return ``root/split``, or raise a DataError saying which folders exist."""
    root = Path(root)
    if not root.is_dir():
        raise DataError.at(root, "dataset root folder not found")
    split_dir = root / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DataError.at(split_dir, f"split folder '{split}' not found; {root} contains the folders "
                                      f"{found if found else '(none)'}")
    return split_dir


def _list_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Files in ``folder`` (not recursive, no hidden files) with one of ``extensions``."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions)


def _validate(records: list[ImageRecord], issues: _Issues, binary_as_one_object: bool) -> list[ImageRecord]:
    """Load every record once; keep the readable ones and record an issue for the others (in record order).

    Loading runs in threads (image decoding releases the GIL): one per usable CPU, at most 8.
    """
    def check(record: ImageRecord) -> DataError | None:
        try:
            load_record(record, binary_as_one_object=binary_as_one_object)
        except DataError as exc:
            return exc
        return None

    cpus = usable_cpus()
    workers = max(1, min(cpus, 8, len(records) // 32))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            errors = list(pool.map(check, records))
    else:
        errors = [check(record) for record in records]
    good = []
    for record, exc in zip(records, errors):
        if exc is not None:
            issues.add(exc.path or record.image_path, exc.reason)
            continue
        good.append(record)
    return good


def scan_folder(root: str | Path, split: str, *, skip_invalid: bool = False, binary_as_one_object: bool = False,
                validate: bool = True) -> tuple[list[ImageRecord], list[dict[str, str]]]:
    """Pair ``root/{split}/images/<id>.<ext>`` with ``root/{split}/masks/<id>.png``.

    Args:
        root: Dataset root folder.
        split: Split folder name.
        skip_invalid: Skip (and report) bad items instead of raising.
        binary_as_one_object: Passed to ``load_instance_mask`` during validation.
        validate: Load every pair once to check it is readable and sizes agree; False only pairs
            file names.

    Returns:
        ``(records, skipped)``: records sorted by id, and ``{"file", "reason"}`` for each skipped
        item (empty unless ``skip_invalid``).

    Raises:
        DataError: Missing split / images / masks folder, no images, or (without
            ``skip_invalid``) any bad item: image without mask, mask without image, two images
            with one id, unreadable file, mask size != image size.
    """
    root = Path(root)
    split_dir = _split_dir(root, split)
    images_dir, masks_dir = split_dir / "images", split_dir / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DataError.at(folder, f"folder not found; expected {split}/images/<id>.<ext> and "
                                       f"{split}/masks/<id>.png under {root}")
    images = _list_files(images_dir, IMAGE_EXTENSIONS)
    if not images:
        raise DataError.at(images_dir, f"no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    issues = _Issues(root)
    images_by_id: dict[str, list[Path]] = defaultdict(list)
    masks_by_id: dict[str, list[Path]] = defaultdict(list)
    for path in images:
        images_by_id[path.stem].append(path)
    for path in _list_files(masks_dir, MASK_EXTENSIONS):
        masks_by_id[path.stem].append(path)

    records = []
    for image_id in sorted(images_by_id):
        candidates, masks = images_by_id[image_id], masks_by_id.get(image_id, [])
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            for path in candidates:
                issues.add(path, f"two or more images share the id '{image_id}' ({names})")
            continue
        if not masks:
            issues.add(candidates[0], f"image without mask (expected {_rel(masks_dir / (image_id + '.png'), root)})")
            continue
        if len(masks) > 1:
            issues.add(masks[0], f"two or more masks share the id '{image_id}' ({', '.join(p.name for p in masks)})")
            continue
        records.append(ImageRecord(image_path=candidates[0], rel_path=_rel(candidates[0], root), split=split,
                                   mask_path=masks[0]))
    for image_id in sorted(set(masks_by_id) - set(images_by_id)):
        for path in masks_by_id[image_id]:
            issues.add(path, f"mask without image (no {split}/images/{image_id}.<ext>)")
    if validate:
        records = _validate(records, issues, binary_as_one_object)
    return records, issues.finish(records, split_dir, skip_invalid)


def _read_coco_json(path: Path) -> dict[str, Any]:
    """Read and structurally check a COCO instances file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError.at(path, f"invalid JSON ({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError.at(path, f"cannot read ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError.at(path, "not a COCO instances file (expected an object with an 'images' list)")
    if not isinstance(data.get("annotations", []), list):
        raise DataError.at(path, "'annotations' must be a list")
    if not data["images"]:
        raise DataError.at(path, "no images listed")
    return data


def scan_coco(root: str | Path, split: str, *, skip_invalid: bool = False,
              validate: bool = True) -> tuple[list[ImageRecord], list[dict[str, str]]]:
    """Read ``root/{split}/annotations.json`` (COCO instances) into records.

    Images without (non-crowd) annotations are kept with 0 instances; crowd annotations are
    dropped. Overlapping instances are flattened as described in ``coco_instances``.

    Args:
        root: Dataset root folder.
        split: Split folder name.
        skip_invalid: Skip (and report) bad items instead of raising.
        validate: Load every image once and decode its annotations; False only checks that
            the image files exist.

    Returns:
        ``(records, skipped)`` as in ``scan_folder``; records sorted by ``rel_path``.

    Raises:
        DataError: Missing or invalid JSON, no images, duplicate image ids; without
            ``skip_invalid`` also image file missing, annotation with an unknown image id,
            image size differing from the JSON, undecodable segmentation.
    """
    root = Path(root)
    split_dir = _split_dir(root, split)
    ann_path = split_dir / "annotations.json"
    if not ann_path.is_file():
        found = sorted(p.name for p in split_dir.iterdir())
        raise DataError.at(ann_path, f"COCO annotation file not found; {split_dir} contains {found}")
    data = _read_coco_json(ann_path)
    issues = _Issues(root)
    images: dict[Any, dict[str, Any]] = {}
    for k, info in enumerate(data["images"]):
        if not isinstance(info, dict) or "id" not in info or "file_name" not in info:
            raise DataError.at(ann_path, f"images[{k}] needs an 'id' and a 'file_name'")
        if info["id"] in images:
            raise DataError.at(ann_path, f"images[{k}]: duplicate image id {info['id']!r}")
        images[info["id"]] = info
    anns_by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for k, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or ann.get("image_id") not in images:
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            ann_id = ann.get("id", f"#{k}") if isinstance(ann, dict) else f"#{k}"
            issues.add(ann_path, f"annotation id {ann_id} references unknown image_id {image_id!r}")
            continue
        if not ann.get("iscrowd", 0):
            anns_by_image[ann["image_id"]].append(ann)

    records, seen = [], set()
    for image_id, info in images.items():
        path = split_dir / str(info["file_name"])
        if not path.is_file():
            issues.add(path, f"image listed in {_rel(ann_path, root)} (id {image_id!r}) not found")
            continue
        if path in seen:
            issues.add(path, f"listed twice in {_rel(ann_path, root)}")
            continue
        seen.add(path)
        size = None
        if isinstance(info.get("height"), int) and isinstance(info.get("width"), int):
            size = (info["height"], info["width"])
        records.append(ImageRecord(image_path=path, rel_path=_rel(path, root), split=split,
                                   coco_anns=tuple(anns_by_image.get(image_id, [])), coco_size=size))
    records.sort(key=lambda r: r.rel_path)
    if validate:
        records = _validate(records, issues, binary_as_one_object=False)
    return records, issues.finish(records, split_dir, skip_invalid)


def build_records(source: str, root: str | Path, split: str,
                  **kwargs: Any) -> tuple[list[ImageRecord], list[dict[str, str]]]:
    """Scan one split with the scanner named by ``source`` (the config key ``data.source``).

    Args:
        source: ``"folder"`` or ``"coco"``.
        root: Dataset root folder.
        split: Split folder name.
        **kwargs: Passed to the scanner (``binary_as_one_object`` is ignored for COCO).

    Returns:
        ``(records, skipped)`` from ``scan_folder`` or ``scan_coco``.

    Raises:
        ValueError: Unknown source.
    """
    if source == "folder":
        return scan_folder(root, split, **kwargs)
    if source == "coco":
        kwargs.pop("binary_as_one_object", None)
        return scan_coco(root, split, **kwargs)
    raise ValueError(f"data.source: unknown source {source!r}; expected one of {', '.join(SOURCES)}")
