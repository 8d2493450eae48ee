"""LightningDataModule over scanned image records."""

from __future__ import annotations

import cv2
import lightning as L
from torch.utils.data import DataLoader

from samtune.data.dataset import SamDataset, collate_instances
from samtune.data.records import ImageRecord
from samtune.data.transforms import build_augmentation
from samtune.data.zoom import ZoomCropConfig


def loader_worker_init(worker_id: int) -> None:
    """A DataLoader worker's OpenCV runs single-threaded (albumentations' advice): PyTorch already gives each worker
    one intra-op thread, but OpenCV would start a pool of one thread per core in every worker."""
    cv2.setNumThreads(0)


class SamDataModule(L.LightningDataModule):
    """Train/val loaders of :class:`SamDataset` (augmentation on train only, none at evaluation).

    Args:
        train_records: Records of the training split.
        val_records: Records of the validation split (may be empty: no validation then).
        img_size: Model input side.
        augment: Augmentation preset name for training (``data.augment``).
        batch_size: Images per batch (``data.batch_size``).
        num_workers: Loader workers (``data.num_workers``).
        max_instances: Instances sampled per image per step (``data.max_instances``).
        binary_as_one_object: Treat all foreground of a binary mask as one object.
        zoom_crop: Fields of :class:`ZoomCropConfig` to train on prompt-focused crops (``data.zoom_crop``);
            None trains on whole images.
        cache_keys: Items carry ``cache_key`` for the embedding cache (train and val).
        views: Training images come from this many fixed views each (``cache.views``; 1: not augmented),
            or None: augmented freely (see :class:`SamDataset`).
    """

    def __init__(
        self,
        train_records: list[ImageRecord],
        val_records: list[ImageRecord],
        *,
        img_size: int,
        augment: str = "default",
        batch_size: int = 4,
        num_workers: int = 0,
        max_instances: int = 16,
        binary_as_one_object: bool = False,
        zoom_crop: dict | None = None,
        cache_keys: bool = False,
        views: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if max_instances < 1:
            raise ValueError(f"data.max_instances must be >= 1, got {max_instances}")
        if not train_records:
            raise ValueError("the training split has no usable images")
        common = dict(img_size=img_size, max_instances=max_instances, binary_as_one_object=binary_as_one_object,
                      cache_keys=cache_keys)
        zoom = ZoomCropConfig(**zoom_crop) if zoom_crop else None
        self.train_set = SamDataset(train_records, augment=build_augmentation(augment), zoom_crop=zoom, views=views,
                                    **common)
        self.val_set = SamDataset(val_records, augment=None, **common) if val_records else None
        self.batch_size, self.num_workers = batch_size, num_workers

    def _loader(self, dataset: SamDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_instances,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=loader_worker_init if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []
