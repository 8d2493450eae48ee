"""Medical volumes (NIfTI, DICOM series) trained and evaluated slice by slice.

Layout (``data=volume data.root=DIR``)::

    DIR/{train,val,test}/images/<case>.nii.gz   (or .nii, or a DICOM series folder images/<case>/)
    DIR/{train,val,test}/labels/<case>.nii.gz   (or .nii): integer label map, 0 = background

Volumes are read through MONAI's image readers (nibabel for NIfTI, pydicom for DICOM series), mapped to
8-bit with an intensity preset (CT: window level/width; MR: per-volume percentile scaling; minmax), and cut
along ``axis`` into 2-D slices that are written once, as a ``folder`` dataset, under ``slices_dir``
(a folder keyed by the volumes' content and the slicing settings, so a changed volume or setting never
reuses stale slices; the user's files are only read). Each label value present in a slice is one object
(``binary_as_one_object``); training slices without foreground are kept at ``empty_slice_rate``; evaluation
splits keep only slices with foreground (prompts come from the labels, so empty slices cannot be prompted).

``slices.json`` beside the slices maps every slice back to its case, position and label values, which
:func:`volume_dice` uses to stack per-slice predictions into volumes and score them with 3-D Dice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from samtune.data.errors import DataError
from samtune.utils.io import temp_dir_beside

log = logging.getLogger(__name__)

VERSION = 1
NIFTI_SUFFIXES = (".nii.gz", ".nii")
PRESETS = ("ct", "mr", "minmax")
MANIFEST = "slices.json"


@dataclass(frozen=True)
class VolumeCase:
    """One volume and its label map on disk."""

    case: str
    image: Path
    label: Path
    split: str


@dataclass(frozen=True)
class SliceSettings:
    """How volumes become slices (``data.volume``).

    Attributes:
        axis: Array axis to slice along (0, 1 or 2; 2 is axial for RAS-oriented NIfTI).
        intensity: ``ct`` (window), ``mr`` (percentiles) or ``minmax``.
        window_level: CT window centre (HU).
        window_width: CT window width (HU).
        percentiles: MR scaling: (low, high) percentiles of the non-zero voxels mapped to 0 and 255.
        empty_slice_rate: Fraction of training slices without foreground that are kept.
        seed: Seed of the empty-slice sampling.
    """

    axis: int = 2
    intensity: str = "ct"
    window_level: float = 40.0
    window_width: float = 400.0
    percentiles: tuple[float, float] = (0.5, 99.5)
    empty_slice_rate: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.axis not in (0, 1, 2):
            raise ValueError(f"data.volume.axis must be 0, 1 or 2, got {self.axis}")
        if self.intensity not in PRESETS:
            raise ValueError(f"data.volume.intensity must be one of {PRESETS}, got {self.intensity!r}")
        if self.window_width <= 0:
            raise ValueError(f"data.volume.window_width must be > 0, got {self.window_width}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"data.volume.percentiles must be [low, high] with 0 <= low < high <= 100, got {list(self.percentiles)}")
        if not 0 <= self.empty_slice_rate <= 1:
            raise ValueError(f"data.volume.empty_slice_rate must be in [0, 1], got {self.empty_slice_rate}")


# ---------------------------------------------------------------- finding and reading volumes
def _case_name(path: Path) -> str | None:
    """Case id of a NIfTI file or DICOM folder, or None for anything else."""
    if path.is_dir():
        return path.name
    for suffix in NIFTI_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def scan_volumes(root: str | Path, split: str) -> list[VolumeCase]:
    """Pair ``root/{split}/images/<case>`` with ``root/{split}/labels/<case>.nii[.gz]``.

    Raises:
        DataError: Missing folders, no volumes, an image without label (or the reverse), two files of one case.
    """
    split_dir = Path(root) / split
    images_dir, labels_dir = split_dir / "images", split_dir / "labels"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DataError.at(folder, f"folder not found; expected {split}/images/<case>.nii.gz (or a DICOM "
                                       f"folder {split}/images/<case>/) and {split}/labels/<case>.nii.gz under {root}")

    def index(folder: Path, allow_dirs: bool) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or (path.is_dir() and not allow_dirs):
                continue
            case = _case_name(path)
            if case is None:
                continue
            if case in found:
                raise DataError.at(path, f"two volumes share the case id '{case}' ({found[case].name}, {path.name})")
            found[case] = path
        return found

    images, labels = index(images_dir, True), index(labels_dir, False)
    if not images:
        raise DataError.at(images_dir, "no volumes found (expected <case>.nii.gz, <case>.nii or DICOM folders)")
    missing = sorted(set(images) - set(labels))
    if missing:
        raise DataError.at(images[missing[0]], f"volume without label map (expected {split}/labels/{missing[0]}.nii.gz)"
                           + (f"; also {len(missing) - 1} more cases: {missing[1:6]}" if len(missing) > 1 else ""))
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DataError.at(labels[orphans[0]], f"label map without volume (no {split}/images/{orphans[0]}.nii.gz)")
    return [VolumeCase(case, images[case], labels[case], split) for case in sorted(images)]


def read_volume(path: str | Path) -> np.ndarray:
    """A 3-D array from a NIfTI file or a DICOM series folder, through MONAI's image readers
    (``NibabelReader``, ``PydicomReader``).

    Raises:
        DataError: The file cannot be read or is not a single-channel 3-D volume.
    """
    from monai.data import NibabelReader, PydicomReader  # imported here: MONAI takes seconds to import

    path = Path(path)
    if not path.exists():
        raise DataError.at(path, "volume not found")
    reader = PydicomReader() if path.is_dir() else NibabelReader()
    try:
        array, _ = reader.get_data(reader.read(str(path)))
        array = np.asarray(array)
    except Exception as exc:  # MONAI wraps reader errors in several exception types
        kind = "DICOM series" if path.is_dir() else "NIfTI volume"
        raise DataError.at(path, f"cannot read {kind} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError.at(path, f"expected a 3-D volume, got an array of shape {tuple(array.shape)}")
    return array


def read_label_volume(path: str | Path, image_shape: tuple[int, ...], image_path: Path) -> np.ndarray:
    """The integer label map of a volume, checked against the image's shape.

    Raises:
        DataError: Unreadable, shape differs from the image, negative or non-integer values.
    """
    labels = read_volume(path)
    if tuple(labels.shape) != tuple(image_shape):
        raise DataError.at(path, f"label map has shape {tuple(labels.shape)} but volume {image_path} has shape "
                                 f"{tuple(image_shape)}")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise DataError.at(path, "label map has non-integer values; labels must be integers (0 = background)")
    if labels.min() < 0:
        raise DataError.at(path, f"label map has negative values (min {labels.min()})")
    if labels.max() > 65535:
        raise DataError.at(path, f"label value {int(labels.max())} is too large (at most 65535)")
    return labels.astype(np.int32)


def to_uint8(volume: np.ndarray, s: SliceSettings) -> np.ndarray:
    """Map a volume's intensities to 0..255 with the preset of ``s``."""
    v = volume.astype(np.float32)
    if s.intensity == "ct":
        lo, hi = s.window_level - s.window_width / 2, s.window_level + s.window_width / 2
    elif s.intensity == "mr":
        values = v[v != 0] if np.any(v != 0) else v.ravel()
        lo, hi = np.percentile(values, s.percentiles)
    else:
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros(v.shape, np.uint8)
    return np.clip((v - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------- slicing into a folder dataset
def _file_digest(path: Path, h: Any) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)


def slices_key(cases: dict[str, list[VolumeCase]], settings: SliceSettings) -> str:
    """Hash of the volumes' content and the slicing settings."""
    h = hashlib.sha1(json.dumps({"version": VERSION, "settings": asdict(settings)}, sort_keys=True).encode())
    for split in sorted(cases):
        for c in cases[split]:
            h.update(f"{split}/{c.case}".encode())
            _file_digest(c.image, h)
            _file_digest(c.label, h)
    return h.hexdigest()[:16]


def _slice(array: np.ndarray, axis: int, i: int) -> np.ndarray:
    return np.ascontiguousarray(np.take(array, i, axis=axis))


@dataclass
class _Writer:
    out: Path
    settings: SliceSettings
    manifest: dict = field(default_factory=dict)

    def case(self, c: VolumeCase, training: bool) -> None:
        volume = read_volume(c.image)
        labels = read_label_volume(c.label, volume.shape, c.image)
        image8 = to_uint8(volume, self.settings)
        rng = np.random.default_rng([self.settings.seed, int(hashlib.sha1(c.case.encode()).hexdigest()[:8], 16)])
        images_dir, masks_dir = self.out / c.split / "images", self.out / c.split / "masks"
        images_dir.mkdir(parents=True, exist_ok=True)
        masks_dir.mkdir(parents=True, exist_ok=True)
        entries = []
        for i in range(volume.shape[self.settings.axis]):
            lab = _slice(labels, self.settings.axis, i)
            values = [int(v) for v in np.unique(lab) if v > 0]
            if not values and not (training and rng.random() < self.settings.empty_slice_rate):
                continue
            name = f"{c.case}_s{i:04d}"
            cv2.imwrite(str(images_dir / f"{name}.png"), _slice(image8, self.settings.axis, i))
            cv2.imwrite(str(masks_dir / f"{name}.png"), lab.astype(np.uint16))
            entries.append({"index": i, "file": f"{c.split}/images/{name}.png", "labels": values})
        if not entries:
            log.warning("volume %s has no labelled slice%s", c.image, "" if training else "; it is not evaluated")
        self.manifest.setdefault(c.split, {})[c.case] = {
            "image": str(c.image), "label": str(c.label), "shape": list(volume.shape), "slices": entries,
        }


def ensure_volume_slices(root: str | Path, splits: list[str], settings: SliceSettings, slices_dir: str | Path,
                         train_split: str = "train") -> Path:
    """Slice the volumes of ``splits`` under ``root`` into a folder dataset (once); return its root.

    The dataset lives in ``slices_dir/<root name>-<key>``, where the key hashes the volumes and settings.
    It is written into a temporary folder and renamed into place, so a killed run or two runs at once
    never leave a half-written dataset behind.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError.at(root, "dataset root folder not found")
    cases = {split: scan_volumes(root, split) for split in splits if (root / split).is_dir()}
    if not cases:
        raise DataError.at(root, f"none of the split folders {splits} found")
    out = Path(slices_dir) / f"{root.name}-{slices_key(cases, settings)}"
    if (out / MANIFEST).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        writer = _Writer(tmp, settings)
        for split, split_cases in cases.items():
            for c in split_cases:
                writer.case(c, training=split == train_split)
        manifest = {"version": VERSION, "root": str(root), "settings": asdict(settings), "splits": writer.manifest}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        n = sum(len(v["slices"]) for s in writer.manifest.values() for v in s.values())
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same slices first
            if not (out / MANIFEST).is_file():
                raise
        log.info("Sliced %d volumes of %s into %d slices under %s",
                 sum(len(c) for c in cases.values()), root, n, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_manifest(slices_root: str | Path) -> dict | None:
    """The ``slices.json`` of a sliced dataset, or None if ``slices_root`` is not one."""
    path = Path(slices_root) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- 3-D evaluation
def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean volumes (1.0 when both are empty)."""
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, gt).sum()) / total


def map_path(map_dir: Path, rel_path: str) -> Path:
    """Where the evaluator stores the predicted instance map of slice ``rel_path`` (as ``evaluator.map_path``)."""
    return map_dir / f"{rel_path}.png"


def volume_dice(manifest: dict, split: str, map_dir: Path) -> dict:
    """3-D Dice per volume and label of the predicted slice maps in ``map_dir``.

    Each slice's predicted instance map (instance ``k`` is the ``k``-th label value of the slice, as
    ``load_instance_mask`` numbers them) is put back at its position; slices that were not evaluated
    predict nothing. Ground truth is the full label volume.

    Returns:
        ``{"dice3d": mean over volumes of the mean over labels, "n_volumes", "per_volume": {case: {"dice3d",
        "labels": {value: dice}}}}``; empty when the split was not sliced.
    """
    cases = (manifest.get("splits") or {}).get(split) or {}
    axis = int(manifest["settings"]["axis"])
    per_volume: dict[str, dict] = {}
    for case, info in sorted(cases.items()):
        if not info["slices"]:
            continue
        gt = read_label_volume(info["label"], tuple(info["shape"]), Path(info["image"]))
        pred = np.zeros_like(gt)
        for s in info["slices"]:
            path = map_path(map_dir, s["file"])
            if not path.is_file():
                continue
            inst = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.int64)
            lut = np.array([0, *s["labels"]], np.int64)
            inst = np.where(inst < len(lut), inst, 0)
            index = [slice(None)] * 3
            index[axis] = s["index"]
            pred[tuple(index)] = lut[inst]
        values = sorted(int(v) for v in np.unique(gt) if v > 0)
        scores = {str(v): round(dice(pred == v, gt == v), 6) for v in values}
        per_volume[case] = {"dice3d": round(float(np.mean(list(scores.values()))), 6) if scores else None,
                            "labels": scores}
    scored = [v["dice3d"] for v in per_volume.values() if v["dice3d"] is not None]
    if not per_volume:
        return {}
    return {"dice3d": float(np.mean(scored)) if scored else None, "n_volumes": len(scored), "per_volume": per_volume}
