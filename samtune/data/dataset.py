"""``SamDataset``: records -> SAM-ready image tensors and per-instance masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from samtune.data.records import ImageRecord, load_record
from samtune.data.transforms import normalize_and_pad, resize_longest_side, resize_mask_longest_side


def _item_rng() -> np.random.Generator:
    """A generator for one item, seeded from numpy's global RNG.

    The global RNG is what ``np.random.seed`` sets and what PyTorch's DataLoader (and
    ``lightning.seed_everything(workers=True)``) seeds differently in every worker.
    """
    return np.random.default_rng(int(np.random.randint(0, 2**31 - 1)))


class SamDataset(Dataset):
    """Labelled images prepared as SAM's image encoder expects them, one mask per instance.

    Per item: load the image and instance map at their original size, augment both jointly,
    resize the longest side to ``img_size`` (``ResizeLongestSide``, like ``SamPredictor``),
    normalise and zero-pad the image bottom/right to ``img_size x img_size``, and split the
    resized (nearest-neighbour) instance map into one boolean mask per instance.

    Randomness (augmentation and instance sampling) comes from numpy's global RNG, so
    ``np.random.seed`` (or Lightning's worker seeding) makes items reproducible.
    """

    def __init__(self, records: Sequence[ImageRecord], *, img_size: int, augment: A.Compose | None = None,
                 max_instances: int = 16, binary_as_one_object: bool = False, min_instance_area: int = 4) -> None:
        """Create the dataset.

        Args:
            records: Records from ``build_records``.
            img_size: Encoder input side S (1024 for the official SAM weights).
            augment: Joint augmentation from ``build_augmentation``, or None.
            max_instances: At most this many instances per item, sampled at random when more.
            binary_as_one_object: See ``load_instance_mask``.
            min_instance_area: Instances with fewer pixels after resizing are dropped.
        """
        if img_size <= 0 or max_instances <= 0:
            raise ValueError(f"img_size and max_instances must be positive, got {img_size}, {max_instances}")
        self.records = list(records)
        self.img_size = img_size
        self.augment = augment
        self.max_instances = max_instances
        self.binary_as_one_object = binary_as_one_object
        self.min_instance_area = min_instance_area

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
            augmentation, i.e. the file's size when not augmenting), ``index`` and ``rel_path``.
        """
        record = self.records[index]
        image, instances = load_record(record, binary_as_one_object=self.binary_as_one_object)
        rng = _item_rng()
        if self.augment is not None:
            self.augment.set_random_seed(int(rng.integers(0, 2**31 - 1)))
            out = self.augment(image=image, mask=instances)
            image, instances = out["image"], out["mask"]
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
        return {
            "image": normalize_and_pad(resized, size),
            "masks": masks,
            "input_size": torch.tensor([height, width], dtype=torch.long),
            "original_size": torch.tensor(image.shape[:2], dtype=torch.long),
            "index": index,
            "rel_path": record.rel_path,
        }


def collate_instances(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch ``SamDataset`` items, padding the instance masks to a common count.

    Args:
        batch: Items from ``SamDataset.__getitem__``.

    Returns:
        Dict with ``image`` (``Bx3xSxS``), ``masks`` (bool ``BxMxSxS``, M = the largest count in
        the batch, at least 1), ``valid`` (bool ``BxM``, True for real masks), ``input_size``
        and ``original_size`` (int64 ``Bx2``), ``index`` and ``rel_path`` (lists of length B).
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
    return {
        "image": torch.stack([item["image"] for item in batch]),
        "masks": masks,
        "valid": valid,
        "input_size": torch.stack([item["input_size"] for item in batch]),
        "original_size": torch.stack([item["original_size"] for item in batch]),
        "index": [item["index"] for item in batch],
        "rel_path": [item["rel_path"] for item in batch],
    }
