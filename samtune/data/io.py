"""Reading images and instance masks from disk.

Every loader returns plain numpy arrays in one convention, whatever the file held:

* images: ``HxWx3`` ``uint8`` RGB;
* instance maps: ``HxW`` ``int32``, 0 = background, instances numbered ``1..N`` without gaps.

Pixels are read as stored: EXIF orientation is *not* applied, because masks are drawn on the
stored pixel grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

from samtune.data.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_EXTENSIONS = (".tif", ".tiff")


def _read_raw(path: Path, *, palette_to_rgb: bool) -> np.ndarray:
    """Read a file's pixels without value conversion (TIFF via tifffile, the rest via PIL).

    Args:
        path: Image or mask file.
        palette_to_rgb: Map palette ("P") images through their palette (images) instead of
            returning the palette indices (masks).

    Returns:
        ``HxW`` or ``HxWxC`` array of the stored dtype.
    """
    if path.suffix.lower() in TIFF_EXTENSIONS:
        arr = np.asarray(tifffile.imread(path))
        arr = np.squeeze(arr)
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] > 4:  # planar CxHxW
            arr = np.moveaxis(arr, 0, -1)
        return arr
    with Image.open(path) as im:
        im.load()
        if im.mode in ("P", "PA") and palette_to_rgb:
            im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
        elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        elif im.mode in ("I;16B", "I;16L", "I;16N"):
            im = im.convert("I;16")
        return np.asarray(im)


def _rescale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map an array of any numeric dtype linearly onto 0..255 by its own min and max.

    The plain (not percentile) min and max of the finite values are used, so the darkest pixel
    becomes 0 and the brightest 255; a constant image becomes all zeros. NaN and inf become 0.

    Args:
        arr: Array of any shape and numeric dtype.

    Returns:
        ``uint8`` array of the same shape.
    """
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    out = np.where(finite, (arr - lo) * (255.0 / (hi - lo)), 0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """Load an image as RGB ``uint8``.

    Grayscale is repeated to three channels, alpha is dropped, palette images go through their
    palette, and 16-bit / 32-bit / float images (PNG ``I;16``, TIFF) are scaled to 0..255 by
    their own min and max (see ``_rescale_to_uint8``).

    Args:
        path: Image file (any of ``IMAGE_EXTENSIONS``; other formats PIL reads also work).

    Returns:
        ``HxWx3`` ``uint8`` RGB array.

    Raises:
        DataError: The file is missing, empty, truncated, not an image, or has an unsupported
            shape; the message starts with the path.
    """
    path = Path(path)
    try:
        arr = _read_raw(path, palette_to_rgb=True)
    except Exception as exc:  # PIL / tifffile raise many unrelated types
        raise DataError.at(path, f"cannot read image ({type(exc).__name__}: {exc})") from exc
    return _to_rgb_uint8(arr, path)


def _to_rgb_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    """Convert a raw pixel array to ``HxWx3`` ``uint8`` (see ``load_image``)."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 2:  # gray + alpha
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:  # RGBA
        arr = arr[..., :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise DataError.at(path, f"cannot read image (unsupported array shape {arr.shape}; volumes and "
                                 "multi-channel stacks are not supported)")
    if arr.size == 0:
        raise DataError.at(path, f"cannot read image (empty, shape {arr.shape})")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise DataError.at(path, f"cannot read image (unsupported dtype {arr.dtype})")
        arr = _rescale_to_uint8(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr)


def _is_binary(values: np.ndarray) -> bool:
    """Whether sorted unique mask values mean "foreground / background" rather than ids."""
    as_set = set(values.tolist())
    return len(as_set) <= 1 or as_set <= {0, 255} or as_set <= {0, 1}


def relabel_consecutive(ids: np.ndarray) -> np.ndarray:
    """Renumber an id map so that 0 stays background and the other ids become ``1..N``.

    Ids keep their order (the smallest non-zero id becomes 1).

    Args:
        ids: ``HxW`` non-negative integer array.

    Returns:
        ``HxW`` ``int32`` array.
    """
    uniq, inverse = np.unique(ids, return_inverse=True)
    if uniq.size and uniq[0] != 0:
        inverse = inverse + 1
    return inverse.reshape(ids.shape).astype(np.int32)


def load_instance_mask(path: str | Path, *, binary_as_one_object: bool = False) -> np.ndarray:
    """Load a mask file as an instance-id map.

    A mask whose values are a subset of {0, 255} or {0, 1} (or a single value) is *binary*: each
    8-connected foreground component becomes one instance, or all foreground one instance when
    ``binary_as_one_object``. Any other mask holds instance ids (``uint8`` / ``uint16`` PNG,
    palette PNG indices, integer TIFF), which are renumbered ``1..N`` in order. RGB(A) masks are
    accepted only when their three colour channels are equal.

    Args:
        path: Mask file.
        binary_as_one_object: Treat all foreground of a binary mask as a single instance.

    Returns:
        ``HxW`` ``int32`` instance map, 0 = background, ids ``1..N``.

    Raises:
        DataError: Unreadable file, colour mask, negative or fractional values.
    """
    path = Path(path)
    try:
        arr = _read_raw(path, palette_to_rgb=False)
    except Exception as exc:
        raise DataError.at(path, f"cannot read mask ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 3 and arr.shape[-1] in (1, 2):
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataError.at(path, "mask has colour (RGB) values; masks must be single-channel "
                                     "(0 = background, instance ids or binary 0/255)")
        arr = rgb[..., 0]
    if arr.ndim != 2 or arr.size == 0:
        raise DataError.at(path, f"cannot read mask (expected a 2-D single-channel image, got shape {arr.shape})")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError.at(path, "mask has fractional or non-finite values; expected integer ids")
        arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise DataError.at(path, f"mask has negative values (min {arr.min()})")
    values = np.unique(arr)
    if _is_binary(values):
        foreground = (arr > 0).astype(np.uint8)
        if binary_as_one_object:
            return foreground.astype(np.int32)
        _, labels = cv2.connectedComponents(foreground, connectivity=8, ltype=cv2.CV_32S)
        return labels.astype(np.int32, copy=False)
    return relabel_consecutive(arr)


def decode_coco_segmentation(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """Decode one COCO annotation's ``segmentation`` to a boolean mask.

    Polygons (list of ``[x0, y0, x1, y1, ...]``), compressed RLE (``counts`` string) and
    uncompressed RLE (``counts`` list) are supported, all through ``pycocotools.mask``.

    Args:
        ann: COCO annotation dict.
        height: Image height H.
        width: Image width W.

    Returns:
        ``HxW`` bool mask.

    Raises:
        ValueError: Missing or undecodable segmentation, or an RLE of another size.
    """
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        polygons = [p for p in seg if isinstance(p, Sequence) and len(p) >= 6]
        if not polygons:
            raise ValueError("segmentation has no polygon with at least 3 points")
        rle = mask_utils.merge(mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if [int(s) for s in seg["size"]] != [height, width]:
            raise ValueError(f"RLE size {list(seg['size'])} differs from the image size [{height}, {width}]")
        rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg
    else:
        raise ValueError(f"segmentation must be a polygon list or an RLE dict, got {type(seg).__name__}")
    return mask_utils.decode(rle).astype(bool)


def coco_instances(anns: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Rasterise the COCO annotations of one image into an instance-id map.

    Crowd annotations (``iscrowd=1``) are skipped. An id map cannot hold overlapping instances:
    larger instances are painted first, so where two overlap the smaller one wins (small
    objects are not erased by a large one around them). Instances left without a pixel are
    dropped. Ids follow the annotation order, renumbered ``1..N``.

    Args:
        anns: Annotation dicts of one image.
        height: Image height H.
        width: Image width W.

    Returns:
        ``HxW`` ``int32`` instance map.

    Raises:
        ValueError: An annotation cannot be decoded (message names its ``id``).
    """
    decoded: list[tuple[int, np.ndarray]] = []
    for order, ann in enumerate(anns):
        if ann.get("iscrowd", 0):
            continue
        try:
            decoded.append((order, decode_coco_segmentation(ann, height, width)))
        except Exception as exc:
            raise ValueError(f"annotation id {ann.get('id', '?')}: cannot decode segmentation ({exc})") from exc
    instances = np.zeros((height, width), np.int32)
    for order, mask in sorted(decoded, key=lambda item: -int(item[1].sum())):
        instances[mask] = order + 1
    return relabel_consecutive(instances)
