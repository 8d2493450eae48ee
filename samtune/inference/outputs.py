"""What ``scripts/predict.py`` writes per image, and the guard that keeps it from overwriting anything else.

Per input image ``<key>`` (its path relative to the input folder, without extension):

* ``<key>_instances.png``: uint16 instance ids, 0 = background, 1 = the largest mask, ...; where masks
  overlap the smaller one wins (it is drawn last);
* ``<key>_coco.json``: COCO instances (``images``, ``annotations``, ``categories``) with each mask as RLE,
  ``predicted_iou``, ``stability_score`` (also as ``score``), ``area``, ``bbox`` and the prompt; annotation
  ``id`` is the mask's id in the PNG;
* ``<key>_overlay.png``: the image with each mask in its own colour, largest first.

``predict_run.json`` in the output folder records the run's settings: a rerun of the same command may
write into it again; anything else refuses a non-empty folder unless ``overwrite=true``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from samtune.evaluation.overlays import blend
from samtune.inference.segment import MaskPrediction
from samtune.utils.io import atomic_write_json, atomic_write_text, read_json

MARKER = "predict_run.json"
SUFFIXES = ("_instances.png", "_coco.json", "_overlay.png")


class OutputDirError(ValueError):
    """The output folder cannot be used (it would overwrite the input or another run's files)."""


def output_stem(key: str) -> str:
    """``sub/a.png`` -> ``sub/a``: the common prefix of an image's output files."""
    return key.rsplit(".", 1)[0] if "." in Path(key).name else key


def check_output_dir(out: Path, inputs: list[tuple[Path, str]], input_path: Path, settings: dict,
                     overwrite: bool) -> None:
    """Refuse an output folder that would overwrite the input, or a non-empty folder of another run.

    Args:
        out: The output folder.
        inputs: (path, key) of the input images.
        input_path: The ``input=`` file or folder.
        settings: This run's settings (compared with the folder's ``predict_run.json``).
        overwrite: Allow writing into a non-empty folder of another run (same-named files are replaced).

    Raises:
        OutputDirError: with what is wrong and what to do.
    """
    out_r, in_r = out.resolve(), input_path.resolve()
    if in_r.is_dir() and (out_r == in_r or in_r in out_r.parents):
        raise OutputDirError(f"out={out} is inside the input folder {input_path}: choose a folder outside it "
                             "(the input is never written to)")
    stems: dict[str, str] = {}
    input_files = {p.resolve() for p, _ in inputs}
    for _, key in inputs:
        stem = output_stem(key)
        if stem in stems:
            raise OutputDirError(f"input images {stems[stem]!r} and {key!r} would write the same output files "
                                 f"{stem}_*: rename one of them")
        stems[stem] = key
        for suffix in SUFFIXES:
            if (out_r / f"{stem}{suffix}").resolve() in input_files:
                raise OutputDirError(f"out={out}: {stem}{suffix} would overwrite an input image")
    if not out.exists() or not any(out.iterdir()):
        return
    marker = out / MARKER
    previous = read_json(marker).get("settings") if marker.is_file() else None
    if previous == settings or overwrite:
        return
    why = "the outputs of a run with other settings" if previous is not None else "files of something else"
    raise OutputDirError(f"out={out} is not empty: it holds {why}. Choose another folder, or pass overwrite=true to "
                         "write into it (same-named files are replaced).")


def instance_map(preds: list[MaskPrediction]) -> np.ndarray:
    """H x W uint16 ids of ``preds`` (already sorted largest first): id i+1 for ``preds[i]``, later ones on top
    (each mask decoded from its RLE in turn)."""
    if len(preds) > 65535:
        raise ValueError(f"{len(preds)} masks do not fit a uint16 instance map")
    out = np.zeros(tuple(preds[0].rle["size"]), np.uint16) if preds else None
    for i, p in enumerate(preds):
        out[p.mask] = i + 1
    return out


def coco_document(key: str, size: tuple[int, int], preds: list[MaskPrediction], info: dict) -> dict:
    """A COCO instances document for one image (annotation ids = instance-map ids)."""
    h, w = size
    anns = []
    for i, p in enumerate(preds):
        ann = {"id": i + 1, "image_id": 1, "category_id": 1, "segmentation": p.rle, "area": p.area, "bbox": p.bbox,
               "iscrowd": 0, "score": round(p.predicted_iou, 6), "predicted_iou": round(p.predicted_iou, 6),
               "stability_score": round(p.stability_score, 6), "prompt": p.prompt}
        if p.prompt_index is not None:
            ann["prompt_index"] = p.prompt_index
        anns.append(ann)
    return {"info": info, "images": [{"id": 1, "file_name": key, "height": h, "width": w}],
            "annotations": anns, "categories": [{"id": 1, "name": "object"}]}


def write_image_outputs(out: Path, key: str, image: np.ndarray, preds: list[MaskPrediction], info: dict) -> list[Path]:
    """Write the instance PNG, COCO JSON and overlay of one image; return their paths."""
    preds = sorted(preds, key=lambda p: -p.area)
    stem = out / output_stem(key)
    stem.parent.mkdir(parents=True, exist_ok=True)
    ids = instance_map(preds)
    if ids is None:
        ids = np.zeros(image.shape[:2], np.uint16)
    paths = [Path(f"{stem}{s}") for s in SUFFIXES]
    cv2.imwrite(str(paths[0]), ids)
    atomic_write_text(paths[1], json.dumps(coco_document(key, image.shape[:2], preds, info)))
    cv2.imwrite(str(paths[2]), cv2.cvtColor(blend(image, ids.astype(np.int32)), cv2.COLOR_RGB2BGR))
    return paths


def write_marker(out: Path, settings: dict, summary: dict) -> None:
    """Record this run's settings (and a summary) in the output folder."""
    atomic_write_json(out / MARKER, {"settings": settings, **summary})
