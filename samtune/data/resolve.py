"""From a ``data`` config to records: the built-in generators (one registry), volume slicing, the splits.

``prepare_data(cfg)`` is what every job does first: generate the built-in dataset on first use (``data.generator``),
slice volumes (``data.source=volume``) once, and scan the train / val / test splits and ``eval.split``. The same
functions resolve each ``eval.extra_sets`` entry (:func:`samtune.evaluation.job.eval_sets`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from samtune.data.records import ImageRecord
from samtune.data.sources import build_records

log = logging.getLogger(__name__)

# data.generator -> (module, function) that writes the dataset unless it is there already (imported when used)
GENERATORS: dict[str, tuple[str, str]] = {
    "pcb": ("samtune.data.synthetic_pcb", "ensure_pcb_dataset"),
    "medical": ("samtune.data.synthetic_medical", "ensure_medical_dataset"),
    "large": ("samtune.data.synthetic_large", "ensure_large_dataset"),
    "scenes": ("samtune.data.synthetic_scenes", "ensure_scenes_dataset"),
    "volumes": ("samtune.data.synthetic_volumes", "ensure_volume_dataset"),
}


def generator(name: str, where: str = "data") -> Callable[..., Path]:
    """The ``ensure_*_dataset`` function of the built-in generator ``name``.

    Raises:
        ValueError: an unknown name, naming the key ``{where}.generator`` and the valid ones.
    """
    if name not in GENERATORS:
        raise ValueError(f"{where}.generator={name!r} is not one of {sorted(GENERATORS)}")
    module, function = GENERATORS[name]
    return getattr(importlib.import_module(module), function)


def dataset_root(d: DictConfig, where: str = "data") -> Path:
    """The root of the dataset that data config ``d`` describes, generating the built-in one on first use.

    Args:
        d: A data config (``root``, optional ``generator`` and ``generator_params``).
        where: Its config path, for error messages (``data``, ``eval.extra_sets[0]``).
    """
    if OmegaConf.is_missing(d, "root") or d.get("root") is None or str(d.root) == "":
        raise ValueError(f"{where}.root is not set: pass {where}.root=DIR (see README: your own dataset)")
    root = Path(hydra.utils.to_absolute_path(str(d.root)))
    if d.get("generator"):
        generator(str(d.generator), where)(root, **OmegaConf.to_container(d.get("generator_params") or {}))
    if d.get("source") == "volume":
        return sliced_volumes(d, root, where)
    return root


def sliced_volumes(d: DictConfig, root: Path, where: str) -> Path:
    """Slice the volumes under ``root`` (once) and return the root of the resulting folder dataset."""
    from samtune.data.volumes import SliceSettings, ensure_volume_slices

    if not d.get("binary_as_one_object", False):
        raise ValueError(f"{where}.binary_as_one_object must be true for volumes: each label value of a slice is "
                         "one object, which the per-volume 3-D Dice relies on")
    v = OmegaConf.to_container(d.volume, resolve=True) if d.get("volume") else {}
    slices_dir = Path(hydra.utils.to_absolute_path(str(v.pop("slices_dir", "data/volume_slices"))))
    unknown = sorted(set(v) - set(SliceSettings.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{where}.volume: unknown keys {unknown}; valid: "
                         f"{sorted(SliceSettings.__dataclass_fields__) + ['slices_dir']}")
    if "percentiles" in v:
        v["percentiles"] = tuple(v["percentiles"])
    splits = sorted(p.name for p in root.iterdir() if (p / "images").is_dir()) if root.is_dir() else []
    return ensure_volume_slices(root, splits or [str(d.get("train_split", "train"))], SliceSettings(**v), slices_dir,
                                train_split=str(d.get("train_split", "train")))


def scan_split(d: DictConfig, root: Path, split: str) -> tuple[list[ImageRecord], list[dict]]:
    """Records of one split of the dataset that data config ``d`` describes, and the files skipped."""
    source = "folder" if d.source == "volume" else d.source  # volumes are read as their sliced folder dataset
    recs, bad = build_records(
        source, root, split, skip_invalid=bool(d.skip_invalid), binary_as_one_object=bool(d.binary_as_one_object)
    )
    log.info("%s split %s of %s: %d images%s", d.source, split, root, len(recs), f", {len(bad)} skipped" if bad else "")
    return recs, bad


def prepare_data(cfg: DictConfig, *, training: bool = True) -> tuple[Path, dict[str, list[ImageRecord]], list[dict]]:
    """Generate the built-in dataset if configured, then scan its splits.

    Returns:
        (root, records, skipped files): records under ``train_split`` / ``val_split`` / ``test_split`` (only when
        ``training``) and ``eval`` (the ``eval.split`` split, any folder of the dataset).
    """
    d = cfg.data
    root = dataset_root(d)
    records: dict[str, list[ImageRecord]] = {}
    skipped: list[dict] = []
    keys = ("train_split", "val_split", "test_split") if training else ()
    for key in keys:
        split = d[key]
        if key == "val_split" and (not split or not (root / split).is_dir()):
            log.warning("No %s split under %s: training runs without validation.", split or "val", root)
            records[key] = []
            continue
        records[key], bad = scan_split(d, root, split)
        skipped += bad
    scanned = {d[k]: k for k in keys if d[k] and (root / d[k]).is_dir()}
    if cfg.eval.split in scanned:
        records["eval"] = records[scanned[cfg.eval.split]]
    else:
        records["eval"], bad = scan_split(d, root, str(cfg.eval.split))
        skipped += bad
    return root, records, skipped
