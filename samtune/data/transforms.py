"""Augmentation presets and SAM's own preprocessing (resize longest side, normalise, pad).

The SAM steps reuse ``segment_anything`` so that training sees exactly what ``SamPredictor``
feeds the image encoder at inference time.
"""

from __future__ import annotations

import hashlib

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# Names the preprocessing below (resize longest side with segment_anything's ResizeLongestSide, normalise
# with PIXEL_MEAN/PIXEL_STD, zero-pad bottom/right); change it when that preprocessing changes, so that
# cached image embeddings (samtune.model.embedding_cache) computed with the old one are not reused.
PREPROCESS_VERSION = "sam-resize-longest-side/normalize/pad-br:1"
AUGMENT_PRESETS = ("none", "light", "default", "strong")


def _flips() -> list[A.BasicTransform]:
    return [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]


def _affine(scale: float, rotate: float, translate: float, shear: float, p: float) -> A.Affine:
    """Affine that keeps masks exact: nearest-neighbour for masks, 0 (background) outside."""
    return A.Affine(scale=(1.0 - scale, 1.0 + scale), rotate=(-rotate, rotate),
                    translate_percent=(-translate, translate), shear=(-shear, shear),
                    interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=p)


def build_augmentation(preset: str, *, seed: int | None = None) -> A.Compose | None:
    """Build a joint image + instance-map augmentation.

    Presets: ``none`` (no augmentation), ``light`` (flips, 90-degree rotations), ``default``
    (light + mild affine, brightness/contrast, hue/saturation with small probabilities),
    ``strong`` (stronger affine + noise and blur). Call the result as
    ``aug(image=HxWx3 uint8, mask=HxW int32 instance map)``; masks are always resampled with
    nearest neighbour and filled with 0 (background). Note that 90-degree rotations swap H and W.

    Args:
        preset: The config value ``data.augment``.
        seed: Seed of the Compose's own RNG (``SamDataset`` reseeds it per item anyway).

    Returns:
        An ``albumentations.Compose``, or None for ``none``.

    Raises:
        ValueError: Unknown preset.
    """
    if preset == "none":
        return None
    if preset == "light":
        transforms = _flips()
    elif preset == "default":
        transforms = [*_flips(), _affine(scale=0.1, rotate=15, translate=0.05, shear=0, p=0.3),
                      A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.3),
                      A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=10, val_shift_limit=10, p=0.2)]
    elif preset == "strong":
        transforms = [*_flips(), _affine(scale=0.25, rotate=30, translate=0.1, shear=5, p=0.6),
                      A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.25, p=0.5),
                      A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=20, p=0.3),
                      A.GaussNoise(std_range=(0.02, 0.08), p=0.3),
                      A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 5))], p=0.2)]
    else:
        raise ValueError(f"data.augment: unknown preset {preset!r}; valid presets: {', '.join(AUGMENT_PRESETS)}")
    return A.Compose(transforms, mask_interpolation=cv2.INTER_NEAREST, seed=seed)


def resize_longest_side(image: np.ndarray, target: int) -> np.ndarray:
    """Resize so the longest side is ``target``, exactly as ``SamPredictor.set_image`` does.

    Args:
        image: ``HxWx3`` ``uint8`` RGB.
        target: Longest side after resizing (the encoder's ``img_size``, e.g. 1024).

    Returns:
        ``h'xw'x3`` ``uint8`` with ``(h', w') = ResizeLongestSide.get_preprocess_shape(H, W, target)``.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    return ResizeLongestSide(target).apply_image(image)


def resize_mask_longest_side(instances: np.ndarray, target: int) -> np.ndarray:
    """Resize an instance map to the same grid as ``resize_longest_side``, nearest neighbour.

    Uses pixel-centre nearest neighbour (``cv2.INTER_NEAREST_EXACT``), which matches the
    pixel-centre convention of the PIL resize used for the image.

    Args:
        instances: ``HxW`` integer instance map.
        target: Longest side after resizing.

    Returns:
        ``h'xw'`` ``int32`` instance map.
    """
    height, width = instances.shape
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(height, width, target)
    return cv2.resize(instances.astype(np.int32, copy=False), (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT)


def normalize_and_pad(image_resized: np.ndarray, size: int) -> torch.Tensor:
    """Normalise with SAM's pixel mean/std and zero-pad bottom/right, as ``Sam.preprocess``.

    Args:
        image_resized: ``h'xw'x3`` ``uint8`` RGB with ``h', w' <= size``.
        size: Square side after padding (the encoder's ``img_size``).

    Returns:
        ``3 x size x size`` float32 tensor.
    """
    height, width = image_resized.shape[:2]
    if height > size or width > size:
        raise ValueError(f"image {width}x{height} is larger than the padded size {size}")
    x = torch.as_tensor(np.ascontiguousarray(image_resized)).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN).view(-1, 1, 1)
    std = torch.tensor(PIXEL_STD).view(-1, 1, 1)
    return F.pad((x - mean) / std, (0, size - width, 0, size - height))


def image_content_key(image_resized: np.ndarray) -> str:
    """Content hash of the resized image that the encoder sees (before normalisation and padding).

    The key of an image in the embedding cache: two images share it only when their pixels after
    resizing are identical, whatever their file names or paths.

    Args:
        image_resized: ``h'xw'x3`` ``uint8`` RGB, as returned by :func:`resize_longest_side`.

    Returns:
        32 hex characters (blake2b-128 over dtype, shape and pixels).
    """
    a = np.ascontiguousarray(image_resized)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{a.dtype.str}{a.shape}".encode())
    digest.update(a.data)
    return digest.hexdigest()
