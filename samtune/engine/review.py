"""People in the loop of the data engine: the annotator's reviews (``engine.review=DIR``) entering its rounds.

A reviews folder is what ``scripts/annotate.py out=DIR`` writes (:mod:`samtune.annotate.store`), typically after
``scripts/annotate.py engine_run=RUN`` showed a round's pseudo-labels. For the next rounds of the engine:

- every accepted, fixed or added mask of an unlabelled image is labelled data (weight 1, like the labelled images);
- an image marked done is fully labelled: no pseudo-label is proposed on it any more;
- a pseudo-label that matches a rejected mask, or a reviewed one (IoU >= :data:`MATCH_IOU`), is not trained on.

Each round records what the reviews held: masks accepted as proposed, fixed (and the mean clicks per fix), added,
rejected, and the images reviewed: the annotation effort, round by round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from pycocotools import mask as mask_utils

from samtune.annotate.store import KEPT
from samtune.data.records import ImageRecord
from samtune.metrics import mask_iou_matrix
from samtune.utils.io import read_json

MATCH_IOU = 0.5


@dataclass
class Reviews:
    """The reviews of a folder that concern a list of images.

    Attributes:
        labeled: One labelled record (weight 1) per image with kept masks (accepted, fixed, added).
        reviewed: The images marked done (fully labelled).
        superseded: rel_path -> RLEs of the masks that pseudo-labels must not repeat (rejected and kept ones).
        counts: ``accepted``, ``fixed``, ``added``, ``rejected``, ``clicks_per_fix``, ``images_reviewed``,
            ``images_touched``.
    """

    labeled: list[ImageRecord] = field(default_factory=list)
    reviewed: set[str] = field(default_factory=set)
    superseded: dict[str, list[dict]] = field(default_factory=dict)
    counts: dict = field(default_factory=dict)


def check_review_folder(folder: str | Path) -> Path:
    """``engine.review``: a folder the annotator wrote (with ``reviews/``).

    Raises:
        ValueError: not such a folder, naming the key.
    """
    path = Path(folder)
    if not (path / "reviews").is_dir():
        raise ValueError(f"engine.review={folder}: not a reviews folder (scripts/annotate.py out=... writes one, "
                         "with reviews/ inside)")
    return path


def load_reviews(folder: str | Path, records: list[ImageRecord]) -> Reviews:
    """The reviews in ``folder`` of the images ``records`` (keyed by their ``rel_path``); other images' reviews and
    images that failed to open are ignored."""
    folder = check_review_folder(folder)
    out = Reviews()
    accepted = fixed = added = rejected = clicks = touched = 0
    for record in records:
        path = folder / "reviews" / f"{record.rel_path}.json"
        if not path.is_file():
            continue
        state = read_json(path)
        if state.get("failed"):
            continue
        decided = [o for o in state["objects"] if o["status"] != "proposed"]
        touched += bool(decided) or bool(state.get("reviewed"))
        kept = [o for o in state["objects"] if o["status"] in KEPT]
        h, w = state["size"]
        if kept:
            anns = tuple({"id": k + 1, "category_id": 1, "iscrowd": 0, "segmentation": o["rle"],
                          "area": int(mask_utils.area(o["rle"])), "bbox": [float(v) for v in mask_utils.toBbox(o["rle"])]}
                         for k, o in enumerate(kept))
            out.labeled.append(ImageRecord(image_path=record.image_path, rel_path=record.rel_path, split=record.split,
                                           coco_anns=anns, coco_size=(h, w), weight=1.0, kind="labeled"))
        if state.get("reviewed"):
            out.reviewed.add(record.rel_path)
        out.superseded[record.rel_path] = [o["rle"] for o in decided]
        for o in decided:
            accepted += o["status"] == "accepted"
            added += o["status"] == "added"
            rejected += o["status"] == "rejected"
            if o["status"] == "fixed":
                fixed += 1
                clicks += int(o.get("n_clicks") or 0)
    out.counts = {"accepted": accepted, "fixed": fixed, "added": added, "rejected": rejected,
                  "clicks_per_fix": round(clicks / fixed, 2) if fixed else None,
                  "images_reviewed": len(out.reviewed), "images_touched": touched}
    return out


def drop_superseded(records: list[ImageRecord], superseded: Mapping[str, list[dict]]) -> tuple[list[ImageRecord], int]:
    """Pseudo-label records without the masks that match (IoU >= :data:`MATCH_IOU`) a reviewed or rejected mask of
    their image; records left without masks are dropped. Returns them and the number of masks dropped."""
    kept_records, dropped = [], 0
    for record in records:
        against = superseded.get(record.rel_path) or []
        anns = list(record.coco_anns or ())
        if against and anns:
            ious = mask_iou_matrix([a["segmentation"] for a in anns], against)
            keep = [a for a, row in zip(anns, ious, strict=True) if float(row.max()) < MATCH_IOU]
            dropped += len(anns) - len(keep)
            anns = keep
        if anns:
            kept_records.append(replace(record, coco_anns=tuple(anns)))
    return kept_records, dropped
