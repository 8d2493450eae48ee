"""``SamDataset``: records -> SAM-ready image tensors and per-instance masks."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from samtune.data.records import ImageRecord, load_record
from samtune.data.transforms import (
    image_content_key,
    normalize_and_pad,
    resize_longest_side,
    resize_mask_longest_side,
)
from samtune.data.zoom import ZoomCropConfig, sample_zoom_crop


def _item_rng() -> np.random.Generator:
    """A generator for one item, seeded from numpy's global RNG.

    The global RNG is what ``np.random.seed`` sets and what PyTorch's DataLoader (and
    ``lightning.seed_everything(workers=True)``) seeds differently in every worker.
    """
    return np.random.default_rng(int(np.random.randint(0, 2**31 - 1)))


def view_seed(rel_path: str, view: int) -> int:
    """Seed of the augmentation that makes view ``view`` of an image: the same in every process and run."""
    digest = hashlib.blake2b(f"{rel_path}|{view}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


class SamDataset(Dataset):
    """Labelled images prepared as SAM's image encoder expects them, one mask per instance.

    Per item: load the image and instance map at their original size, augment both jointly,
    resize the longest side to ``img_size`` (``ResizeLongestSide``, like ``SamPredictor``),
    normalise and zero-pad the image bottom/right to ``img_size x img_size``, and split the
    resized (nearest-neighbour) instance map into one boolean mask per instance.

    Randomness (augmentation and instance sampling) comes from numpy's global RNG, so
    ``np.random.seed`` (or Lightning's worker seeding) makes items reproducible.

    For the embedding cache (``samtune.model.embedding_cache``), ``cache_keys`` adds each item's image
    key, and ``views=K`` replaces free augmentation by K fixed views per image: each item draws one view
    at random; view 0 is the image as it is, view ``v > 0`` the augmentation (and zoom crop) seeded by
    ``(rel_path, v)``, identical in every epoch, process and run, so that its embedding can be cached.
    Which instances are sampled stays random either way.
    """

    def __init__(self, records: Sequence[ImageRecord], *, img_size: int, augment: A.Compose | None = None,
                 max_instances: int = 16, binary_as_one_object: bool = False, min_instance_area: int = 4,
                 zoom_crop: ZoomCropConfig | None = None, cache_keys: bool = False,
                 views: int | None = None) -> None:
        """Create the dataset.

        Args:
            records: Records from ``build_records``.
            img_size: Encoder input side S (1024 for the official SAM weights).
            augment: Joint augmentation from ``build_augmentation``, or None.
            max_instances: At most this many instances per item, sampled at random when more.
            binary_as_one_object: See ``load_instance_mask``.
            min_instance_area: Instances with fewer pixels after resizing are dropped.
            zoom_crop: Sample prompt-focused crops around random instances (after augmentation).
            cache_keys: Add ``cache_key`` (:func:`image_content_key` of the resized image) to each item.
            views: None: ``augment`` and ``zoom_crop`` are drawn freely for every item; K >= 1: from K
                fixed views per image (K = 1: the image as it is, no augmentation).
        """
        if img_size <= 0 or max_instances <= 0:
            raise ValueError(f"img_size and max_instances must be positive, got {img_size}, {max_instances}")
        if views is not None and views < 1:
            raise ValueError(f"views must be >= 1 (or None), got {views}")
        self.records = list(records)
        self.img_size = img_size
        self.augment = augment
        self.max_instances = max_instances
        self.binary_as_one_object = binary_as_one_object
        self.min_instance_area = min_instance_area
        self.zoom_crop = zoom_crop
        self.cache_keys = cache_keys
        self.views = views

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Prepare one item.

        Args:
            index: Record index.

        Returns:
            Dict with ``image`` (float32 ``3xSxS``), ``masks`` (bool ``MxSxS``, zero-padded like
            the image; ``M`` may be 0), ``input_size`` (int64 ``[h', w']``, the resized size
            before padding), ``original_size`` (int64 ``[H, W]``, the image size after
            augmentation, i.e. the file's size when not augmenting), ``index`` and ``rel_path``;
            with ``cache_keys`` also ``cache_key`` (str).
        """
        record = self.records[index]
        image, instances = load_record(record, binary_as_one_object=self.binary_as_one_object)
        rng = _item_rng()
        if self.views is None:
            image, instances = self._augment(image, instances, rng)
        else:
            view = int(rng.integers(self.views)) if self.views > 1 else 0
            if view > 0:
                image, instances = self._augment(image, instances, np.random.default_rng(view_seed(record.rel_path, view)))
        size = self.img_size
        resized = resize_longest_side(image, size)
        height, width = resized.shape[:2]
        ids_map = resize_mask_longest_side(instances, size)
        ids, areas = np.unique(ids_map[ids_map > 0], return_counts=True)
        keep = ids[areas >= self.min_instance_area]
        if keep.size > self.max_instances:
            keep = np.sort(rng.choice(keep, self.max_instances, replace=False))
        masks = torch.zeros((keep.size, size, size), dtype=torch.bool)
        if keep.size:
            masks[:, :height, :width] = torch.from_numpy(ids_map[None] == keep[:, None, None])
        item = {
            "image": normalize_and_pad(resized, size),
            "masks": masks,
            "input_size": torch.tensor([height, width], dtype=torch.long),
            "original_size": torch.tensor(image.shape[:2], dtype=torch.long),
            "index": index,
            "rel_path": record.rel_path,
            "weight": float(record.weight),
            "kind": record.kind,
        }
        if self.cache_keys:
            item["cache_key"] = image_content_key(resized)
        return item

    def _augment(self, image: np.ndarray, instances: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Joint augmentation, then the optional zoom crop, both drawn from ``rng``."""
        if self.augment is not None:
            self.augment.set_random_seed(int(rng.integers(0, 2**31 - 1)))
            out = self.augment(image=image, mask=instances)
            image, instances = out["image"], out["mask"]
        if self.zoom_crop is not None:
            image, instances = sample_zoom_crop(image, instances, self.zoom_crop, rng)
        return image, instances


def collate_instances(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch ``SamDataset`` items, padding the instance masks to a common count.

    Args:
        batch: Items from ``SamDataset.__getitem__``.

    Returns:
        Dict with ``image`` (``Bx3xSxS``), ``masks`` (bool ``BxMxSxS``, M = the largest count in
        the batch, at least 1), ``valid`` (bool ``BxM``, True for real masks), ``input_size``
        and ``original_size`` (int64 ``Bx2``), ``index``, ``rel_path`` and ``kind`` (lists of length B),
        ``weight`` (float ``B``), and
        ``cache_key`` (list) when the items have one.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    sizes = {tuple(item["image"].shape) for item in batch}
    if len(sizes) != 1:
        raise ValueError(f"all images in a batch must have one shape, got {sorted(sizes)}")
    count = max(1, max(item["masks"].shape[0] for item in batch))
    side_h, side_w = batch[0]["image"].shape[-2:]
    masks = torch.zeros((len(batch), count, side_h, side_w), dtype=torch.bool)
    valid = torch.zeros((len(batch), count), dtype=torch.bool)
    for b, item in enumerate(batch):
        m = item["masks"].shape[0]
        masks[b, :m] = item["masks"]
        valid[b, :m] = True
    out = {
        "image": torch.stack([item["image"] for item in batch]),
        "masks": masks,
        "valid": valid,
        "input_size": torch.stack([item["input_size"] for item in batch]),
        "original_size": torch.stack([item["original_size"] for item in batch]),
        "index": [item["index"] for item in batch],
        "rel_path": [item["rel_path"] for item in batch],
        "weight": torch.tensor([float(item.get("weight", 1.0)) for item in batch]),
        "kind": [item.get("kind", "labeled") for item in batch],
    }
    if all("cache_key" in item for item in batch):
        out["cache_key"] = [item["cache_key"] for item in batch]
    return out
