"""A simulated reviewer (``engine.review=simulated``): what people in the annotator would do, measured without them.

On the unlabelled images of a round, whose labels are hidden from training, the reviewer goes through the model's
proposals best predicted IoU first (those of at least ``show_pred_iou``) and, for each, against the hidden labels:

- **accepts** it when its IoU with a label not yet taken reaches ``accept_iou`` (1 action);
- **fixes** it when that IoU is at least 0.5: a first click re-segments it from its interior point, then correction
  clicks at the centre of the largest error region (evaluation's ``clicks`` protocol, the annotator's fix) until
  ``target_iou`` or ``max_clicks`` (each click 1 action); a fix that gave up is kept if it reached ``accept_iou``,
  else rejected (1 more action);
- **rejects** it otherwise (1 action);

then **adds** each label no proposal took, by clicks from its interior point until ``target_iou`` (each click 1 action;
an object that gave up below ``accept_iou`` is dropped). A ``budget`` of actions per round stops it. Its decisions are written
as the annotator writes a person's (:class:`samtune.annotate.store.ReviewStore`), so they enter training exactly as
reviews do (:mod:`samtune.engine.review`). With ``proposals: false`` the same reviewer labels from scratch (every
object added by clicks): the baseline at the same number of actions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from samtune.annotate.store import ReviewStore, decode, new_object
from samtune.data.io import load_image
from samtune.data.records import ImageRecord, load_record
from samtune.metrics import instance_iou_dice
from samtune.predict.segmenter import Segmenter
from samtune.prompts import center_points, largest_error_click

MATCH_IOU = 0.5


@dataclass(frozen=True)
class ReviewerSettings:
    """``engine.simulated``.

    Attributes:
        budget: Actions (clicks, accepts, rejects) per round.
        accept_iou: A proposal is accepted as it is from this IoU with its label.
        target_iou: Fixes and additions click until this IoU.
        max_clicks: Correction clicks per object before giving up.
        show_pred_iou: Proposals shown for review: predicted IoU at least this.
        proposals: Review proposals (true) or label from scratch (false, the baseline).
    """

    budget: int = 300
    accept_iou: float = 0.85
    target_iou: float = 0.9
    max_clicks: int = 20
    show_pred_iou: float = 0.5
    proposals: bool = True

    def __post_init__(self) -> None:
        if self.budget < 1 or self.max_clicks < 1:
            raise ValueError(f"engine.simulated.budget and max_clicks must be >= 1, got {self.budget}, {self.max_clicks}")
        for key in ("accept_iou", "target_iou", "show_pred_iou"):
            if not 0.0 <= float(getattr(self, key)) <= 1.0:
                raise ValueError(f"engine.simulated.{key} must be in [0, 1], got {getattr(self, key)}")


class _Clicker:
    """One object's clicks against its hidden label, through the segmenter's interactive loop."""

    def __init__(self, predict, gt: torch.Tensor, first: tuple[float, float]) -> None:
        self.predict, self.gt = predict, gt[None]
        self.points, self.labels = [list(first)], [1]
        self.state = None
        self.mask = None
        self.pred_iou = 0.0
        self._step()

    def _step(self) -> None:
        coords = torch.tensor([self.points], dtype=torch.float)
        labels = torch.tensor([self.labels], dtype=torch.int)
        masks, self.state, pred = self.predict(coords, labels, self.state, len(self.points) == 1)
        self.mask, self.pred_iou = masks[:1].cpu(), float(pred[0])

    @property
    def iou(self) -> float:
        return float(instance_iou_dice(self.mask, self.gt)[0][0])

    def correct(self) -> None:
        click, label = largest_error_click(self.mask, self.gt)
        self.points.append([float(v) for v in click[0, 0]])
        self.labels.append(int(label[0, 0]))
        self._step()

    def click_until(self, target: float, max_clicks: int, room: int) -> int:
        """Correction clicks until ``target`` IoU, ``max_clicks`` clicks in all, or ``room`` more actions spent;
        returns the clicks made in all (the first one included)."""
        n = 1
        while self.iou < target and n < max_clicks and room > 0:
            self.correct()
            n += 1
            room -= 1
        return n

    def as_object(self, objects: list[dict], status: str, model_sha256: str, n: int, **extra) -> dict:
        """The clicked object as the annotator records it."""
        return _object(objects, status, model_sha256, mask=self.mask[0].numpy(), n_clicks=n,
                       predicted_iou=round(self.pred_iou, 4), clicks={"points": self.points, "labels": self.labels},
                       **extra)


def _centre(mask: torch.Tensor) -> tuple[float, float]:
    x, y = center_points(mask[None]).reshape(-1, 2)[0]
    return float(x), float(y)


def _object(objects: list[dict], status: str, model_sha256: str, *, mask: np.ndarray, **extra) -> dict:
    """The next object of ``objects`` as the annotator records it."""
    return new_object(len(objects) + 1, status, mask, model_sha256, **extra)


def simulate_review(segmenter: Segmenter, records: list[ImageRecord], proposals: Mapping[str, list], store: ReviewStore,
                    settings: ReviewerSettings, *, binary_as_one_object: bool = False, model_sha256: str = "") -> dict:
    """Review ``records`` (hidden labels) within the round's budget; decisions go to ``store``. Images that already
    have a review are left as they are. Returns the counts (``actions`` spent, accepted, fixed, added, rejected,
    clicks per fix and per addition, images reviewed)."""
    spent = accepted = fixed = added = rejected = dropped = fix_clicks = add_clicks = reviewed = 0
    budget = settings.budget
    for record in records:
        if spent >= budget:
            break
        if store.load(record.rel_path) is not None:
            continue
        image = load_image(record.image_path)
        _, instances = load_record(record, binary_as_one_object=binary_as_one_object)
        ids = [int(i) for i in np.unique(instances) if i > 0]
        gts = torch.stack([torch.from_numpy(instances == i) for i in ids]) if ids else torch.zeros(0, *instances.shape,
                                                                                                   dtype=torch.bool)
        predict = segmenter.click_predictor(image, None if segmenter.zoom is not None else segmenter.embed(image))
        shown = sorted((p for p in proposals.get(record.rel_path, []) if p.predicted_iou >= settings.show_pred_iou),
                       key=lambda p: -p.predicted_iou) if settings.proposals else []
        taken: set[int] = set()
        objects: list[dict] = []
        complete = True

        for k, p in enumerate(shown):
            if spent >= budget:
                complete = False
                break
            mask_np = decode(p.rle)
            mask = torch.from_numpy(mask_np)
            source = {"kind": "simulated", "index": k, "predicted_iou": round(float(p.predicted_iou), 4)}
            free = [g for g in range(len(ids)) if g not in taken]
            ious = instance_iou_dice(mask[None].expand(len(free), -1, -1), gts[free])[0] if free else torch.zeros(0)
            best = int(ious.argmax()) if len(free) else -1
            iou = float(ious[best]) if len(free) else 0.0
            if iou >= settings.accept_iou:
                spent += 1
                accepted += 1
                taken.add(free[best])
                objects.append(_object(objects, "accepted", model_sha256, mask=mask_np, source=source))
            elif iou >= MATCH_IOU:
                g = free[best]
                spent += 1  # the first click of a fix: on the object, re-segmented from its interior point
                clicker = _Clicker(predict, gts[g], _centre(mask))
                n = clicker.click_until(settings.target_iou, settings.max_clicks, budget - spent)
                spent += n - 1
                if clicker.iou >= settings.accept_iou:  # reached the target, or gave up at a mask good to accept
                    fixed += 1
                    fix_clicks += n
                    taken.add(g)
                    objects.append(clicker.as_object(objects, "fixed", model_sha256, n, source=source))
                elif spent < budget:
                    spent += 1
                    rejected += 1
                    objects.append(_object(objects, "rejected", model_sha256, mask=mask_np, source=source))
            else:
                spent += 1
                rejected += 1
                objects.append(_object(objects, "rejected", model_sha256, mask=mask_np, source=source))
        for g in range(len(ids)):
            if g in taken:
                continue
            if spent >= budget:
                complete = False
                break
            spent += 1  # the first click
            clicker = _Clicker(predict, gts[g], _centre(gts[g]))
            n = clicker.click_until(settings.target_iou, settings.max_clicks, budget - spent)
            spent += n - 1
            if clicker.iou >= settings.accept_iou:  # reached the target, or gave up at a mask good to accept
                added += 1
                add_clicks += n
                objects.append(clicker.as_object(objects, "added", model_sha256, n))
            else:
                dropped += 1
        reviewed += complete
        store.save(record.rel_path, {"image": record.rel_path, "size": list(image.shape[:2]), "reviewed": complete,
                                     "objects": objects, "history": [], "failed": None})
    return {"actions": spent, "budget": budget, "accepted": accepted, "fixed": fixed, "added": added,
            "rejected": rejected, "dropped": dropped, "clicks_per_fix": round(fix_clicks / fixed, 2) if fixed else None,
            "clicks_per_add": round(add_clicks / added, 2) if added else None, "images_reviewed": reviewed,
            "proposals": settings.proposals}
