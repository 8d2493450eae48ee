"""One labelled image on disk (``ImageRecord``) and how to load it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samtune.data.errors import DataError
from samtune.data.io import coco_instances, load_image, load_instance_mask


@dataclass(frozen=True)
class ImageRecord:
    """Where one image and its instance labels live.

    Exactly one label source is used: ``mask_path`` (a mask file), else ``coco_anns`` (COCO
    annotations of this image); a record with neither is unlabelled (0 instances).

    Attributes:
        image_path: Image file.
        rel_path: Image path relative to the dataset root, posix style (``"test/images/a.png"``);
            a stable key for reports and caches.
        split: Split name (``"train"``, ``"val"``, ``"test"``...).
        mask_path: Mask file (see ``load_instance_mask``), or None.
        coco_anns: COCO annotation dicts of this image, or None.
        coco_size: ``(height, width)`` the COCO file declares for this image, checked on load.
        weight: Loss weight of this image's masks in training (pseudo-labels of the data engine < 1).
        kind: ``"labeled"`` (human masks), ``"pseudo"`` (kept pseudo-labels, trained as labels) or ``"teacher"``
            (unlabelled image whose masks only place prompts; its targets come from the EMA teacher).
    """

    image_path: Path
    rel_path: str
    split: str
    mask_path: Path | None = None
    coco_anns: tuple[dict[str, Any], ...] | None = None
    coco_size: tuple[int, int] | None = None
    weight: float = 1.0
    kind: str = "labeled"

    @property
    def image_id(self) -> str:
        """The image file name without extension."""
        return self.image_path.stem


def load_record(record: ImageRecord, *, binary_as_one_object: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Load a record's image and instance map.

    Args:
        record: The record.
        binary_as_one_object: See ``load_instance_mask``.

    Returns:
        ``(image, instances)``: ``HxWx3`` ``uint8`` RGB and ``HxW`` ``int32`` ids ``0..N``.

    Raises:
        DataError: Unreadable files, a mask of another size than the image, undecodable COCO
            annotations; the message names the file.
    """
    image = load_image(record.image_path)
    height, width = image.shape[:2]
    if record.mask_path is not None:
        instances = load_instance_mask(record.mask_path, binary_as_one_object=binary_as_one_object)
        if instances.shape != (height, width):
            mh, mw = instances.shape
            raise DataError.at(record.mask_path,
                               f"mask is {mw}x{mh} but image {record.image_path} is {width}x{height}")
        return image, instances
    if record.coco_anns is not None:
        if record.coco_size is not None and tuple(record.coco_size) != (height, width):
            ch, cw = record.coco_size
            raise DataError.at(record.image_path,
                               f"COCO annotations say the image is {cw}x{ch} but the file is {width}x{height}")
        try:
            return image, coco_instances(record.coco_anns, height, width)
        except ValueError as exc:
            raise DataError.at(record.image_path, str(exc)) from exc
    return image, np.zeros((height, width), np.int32)
