"""Where the annotator's decisions live: a reviews folder of its own, written atomically after every action.

Layout of ``out/`` (the user's images and labels are only read)::

    reviews/<image key>.json   objects of the image with their status and provenance, the undo history
    masks/<image key, .png>    instance ids (uint16) of the kept objects: accepted, fixed, added (folder layout)
    coco.json                  every image's objects as COCO RLE, each with its provenance (rejected ones too)
    annotate_run.json          the settings of the sessions that wrote here

An object's ``status`` is ``proposed`` (not decided yet), ``accepted`` (kept as proposed), ``fixed`` (re-segmented
with clicks), ``added`` (a new object) or ``rejected``. Its provenance: where it came from (``source``: the
proposal's kind and index, its predicted IoU), the clicks of a fix or an addition (``clicks``, ``n_clicks``, the
``box`` of an addition by box), the seconds spent on it, the sha256 of the model's weights and the time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from samtune.predict.auto import encode_masks
from samtune.utils.io import atomic_write_json, atomic_write_text, read_json

KEPT = ("accepted", "fixed", "added")
STATUSES = ("proposed", *KEPT, "rejected")
HISTORY = 50  # undo steps kept per image


def decode(rle: dict) -> np.ndarray:
    """H x W bool of a COCO RLE."""
    return mask_utils.decode(rle).astype(bool)


def encode(mask: np.ndarray) -> dict:
    """COCO RLE (counts as str) of an H x W bool mask."""
    return encode_masks([mask])[0]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new_object(oid: int, status: str, mask: np.ndarray, model_sha256: str, **extra) -> dict:
    """An object as a review records it (the fields of the module docstring); ``extra`` sets any of them."""
    return {"id": oid, "status": status, "rle": encode(mask), "source": None, "clicks": None, "n_clicks": 0,
            "box": None, "seconds": 0.0, "model_sha256": model_sha256, "time": now(), "predicted_iou": None, **extra}


class ReviewStore:
    """The decisions of one reviews folder.

    Args:
        out: The reviews folder (created; never a dataset folder: the caller checks).
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        (self.out / "reviews").mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.out / "reviews" / f"{key}.json"

    def load(self, key: str) -> dict | None:
        """The stored state of image ``key`` (None if it was never opened)."""
        path = self.path(key)
        return read_json(path) if path.is_file() else None

    def keys(self) -> list[str]:
        root = self.out / "reviews"
        return sorted(p.relative_to(root).as_posix()[: -len(".json")] for p in root.rglob("*.json"))

    def save(self, key: str, state: dict) -> None:
        """Write image ``key``'s state, its instance PNG and the COCO file, each atomically (state first)."""
        atomic_write_json(self.path(key), state)
        if not state.get("failed"):
            self._write_instances(key, state)
        self.write_coco()

    def _write_instances(self, key: str, state: dict) -> None:
        h, w = state["size"]
        ids = np.zeros((h, w), np.uint16)
        for k, obj in enumerate(o for o in state["objects"] if o["status"] in KEPT):
            ids[decode(obj["rle"]) & (ids == 0)] = k + 1
        path = self.out / "masks" / Path(key).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(".png", ids)
        if not ok:
            raise RuntimeError(f"could not encode the instance map of {key}")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(buf.tobytes())
        tmp.replace(path)

    def write_coco(self) -> None:
        """``coco.json`` of every image opened so far (objects still ``proposed`` are left out)."""
        images, anns = [], []
        for i, key in enumerate(self.keys(), start=1):
            state = self.load(key)
            if state.get("failed"):
                continue
            h, w = state["size"]
            images.append({"id": i, "file_name": key, "height": h, "width": w, "reviewed": state.get("reviewed", False)})
            for obj in state["objects"]:
                if obj["status"] == "proposed":
                    continue
                rle = obj["rle"]
                anns.append({
                    "id": len(anns) + 1, "image_id": i, "category_id": 1, "segmentation": rle,
                    "area": int(mask_utils.area(rle)), "bbox": [int(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
                    "status": obj["status"], "provenance": {k: obj.get(k) for k in (
                        "source", "clicks", "n_clicks", "box", "seconds", "model_sha256", "time", "predicted_iou")},
                })
        atomic_write_text(self.out / "coco.json", json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}))

    def record_settings(self, settings: dict) -> None:
        """Append this session's settings to ``annotate_run.json``."""
        path = self.out / "annotate_run.json"
        runs = read_json(path).get("sessions", []) if path.is_file() else []
        atomic_write_json(path, {"sessions": [*runs, {**settings, "started": now()}]})
