"""The annotator's model side: a queue of images, their proposals, and SAM's interactive loop on them.

Every mask the page shows comes from :class:`samtune.predict.segmenter.Segmenter` (whole image or prompt-focused
zoom, as ``eval.zoom``), so a fix made with clicks is exactly what evaluation's ``clicks`` mode would give for them:

- **fix** a proposal (or any object) with a positive or negative click: the object is segmented with all its clicks
  and its previous low-resolution logits as mask input. A proposal has no clicks yet, so its interior point
  (the farthest from its boundary, evaluation's ``point1``) is its first click;
- **new object** by a click (the ``point1`` answer of that point) or by a box (the ``box`` answer);
- **accept**, **reject**, **delete** (an added object), **undo**, **done** (the image is reviewed).

Every action is on disk (:class:`samtune.annotate.store.ReviewStore`) before its answer is sent. The interactive
state of an object (its logits) is kept in memory; after a restart its clicks are replayed, which gives the same
mask (the loop is deterministic).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

from samtune.annotate.store import HISTORY, ReviewStore, decode, encode, new_object, now
from samtune.data.io import load_image
from samtune.data.records import ImageRecord, load_record
from samtune.model.promptable_sam import PromptableSam
from samtune.predict.auto import build_mask_generator, generate_masks
from samtune.predict.segmenter import Embedded, Segmenter
from samtune.predict.zoom import ZoomConfig
from samtune.prompts import center_points

log = logging.getLogger(__name__)

PROPOSALS = ("labels", "auto", "none", "pseudo")
ORDERS = ("file", "random", "uncertainty")
ACTIONS = ("accept", "reject", "delete", "click", "box", "undo", "done", "select")


class ActionError(ValueError):
    """A request the session cannot carry out (unknown object, bad coordinates...): answered with HTTP 400."""


class AnnotationSession:
    """Review and label ``records`` with ``model``.

    Args:
        model: The model (eval mode).
        records: The images (with labels when ``proposals=labels``).
        store: Where decisions go.
        zoom: Prompt-focused zoom of every decode (None: the whole image).
        proposals: ``labels`` (the records' own masks, to review), ``auto`` (the model's automatic masks, made
            when an image is first prepared), ``pseudo`` (a data-engine round's pseudo-labels, ``pseudo``) or
            ``none`` (label from scratch).
        pseudo: rel_path -> the pseudo-label annotations of a round (COCO, with ``segmentation`` RLE and
            ``provenance``), for ``proposals=pseudo``.
        auto_params: Automatic mask generation parameters (``auto``).
        order: ``file``, ``random`` (seeded) or ``uncertainty`` (lowest mean predicted IoU of the proposals first:
            every image's proposals are made when the session starts, to order them).
        model_sha256: Recorded with every decision.
        binary_as_one_object: Mask interpretation of the labels.
        prefetch: Images prepared ahead of the one shown (proposals, whole-image embedding).
        seed: Seed of ``order=random``.
    """

    def __init__(self, model: PromptableSam, records: list[ImageRecord], store: ReviewStore, *,
                 zoom: ZoomConfig | None = None, proposals: str = "labels", auto_params: Mapping | None = None,
                 order: str = "file", model_sha256: str = "", binary_as_one_object: bool = False,
                 prefetch: int = 2, seed: int = 0, pseudo: Mapping[str, list[dict]] | None = None) -> None:
        if proposals not in PROPOSALS:
            raise ValueError(f"proposals={proposals!r} is not one of {list(PROPOSALS)}")
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not one of {list(ORDERS)}")
        if not records:
            raise ValueError("no images to annotate")
        self.model = model.eval()
        self.segmenter = Segmenter(model, zoom)
        self.store = store
        self.proposals = proposals
        self.pseudo = dict(pseudo or {})
        self.generator = build_mask_generator(model, auto_params) if proposals == "auto" else None
        self.model_sha256 = model_sha256
        self.binary = binary_as_one_object
        self.prefetch = int(prefetch)
        self.lock = threading.RLock()  # one model call at a time; state changes are serialised with them
        self.records = list(records)
        self.order = order
        if order == "random":
            rng = np.random.default_rng(seed)
            self.records = [self.records[i] for i in rng.permutation(len(self.records))]
        elif order == "uncertainty":
            for i in range(len(self.records)):
                self.state(i)
            self.records.sort(key=lambda r: self._uncertainty(self.store.load(r.rel_path)))
        self._images: OrderedDict[int, np.ndarray] = OrderedDict()
        self._embedded: OrderedDict[int, Embedded] = OrderedDict()
        # (image, object) -> (interactive state, the clicks it answers): the next click continues from it
        self._clicks: dict[tuple[int, int], tuple[object, list, list]] = {}
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ queue
    @staticmethod
    def _uncertainty(state: dict | None) -> float:
        scores = [o["source"]["predicted_iou"] for o in (state or {}).get("objects", [])
                  if (o.get("source") or {}).get("predicted_iou") is not None]
        return float(np.mean(scores)) if scores else 1.0

    def queue(self) -> dict:
        """Every image with its state: reviewed, failed; the first image not reviewed yet."""
        items = []
        for i, r in enumerate(self.records):
            state = self.store.load(r.rel_path) or {}
            items.append({"index": i, "name": r.rel_path, "reviewed": bool(state.get("reviewed")),
                          "failed": state.get("failed")})
        pending = [it["index"] for it in items if not it["reviewed"] and not it["failed"]]
        reviewed = sum(it["reviewed"] for it in items)
        return {"images": items, "current": pending[0] if pending else 0, "reviewed": reviewed, "total": len(items),
                "zoom": self.segmenter.zoom.describe() if self.segmenter.zoom else None, "proposals": self.proposals}

    def record(self, index: int) -> ImageRecord:
        if not isinstance(index, int) or not 0 <= index < len(self.records):
            raise ActionError(f"image index {index!r} is not in the queue (0..{len(self.records) - 1})")
        return self.records[index]

    def image(self, index: int) -> np.ndarray:
        """The image (RGB uint8), cached for the few images around the current one.

        Raises:
            samtune.data.errors.DataError: it cannot be read (the message names the file).
        """
        with self.lock:
            if index in self._images:
                self._images.move_to_end(index)
                return self._images[index]
            image = load_image(self.record(index).image_path)
            self._images[index] = image
            while len(self._images) > self.prefetch + 3:
                self._images.popitem(last=False)
            return image

    def embedded(self, index: int) -> Embedded | None:
        """The whole-image embedding (None under zoom, where each crop is embedded)."""
        if self.segmenter.zoom is not None:
            return None
        with self.lock:
            if index not in self._embedded:
                self._embedded[index] = self.segmenter.embed(self.image(index))
                while len(self._embedded) > self.prefetch + 2:
                    self._embedded.popitem(last=False)
            self._embedded.move_to_end(index)
            return self._embedded[index]

    # ------------------------------------------------------------------ state
    def _initial_objects(self, index: int, image: np.ndarray) -> list[dict]:
        record = self.record(index)
        if self.proposals == "labels":
            _, instances = load_record(record, binary_as_one_object=self.binary)
            ids = [int(i) for i in np.unique(instances) if i > 0]
            return [self._new_object(k + 1, "proposed", instances == i, source={"kind": "labels", "index": i})
                    for k, i in enumerate(ids)]
        if self.proposals == "pseudo":
            return [self._new_object(k + 1, "proposed", decode(a["segmentation"]), source={
                "kind": "pseudo", "index": k, "round": (a.get("provenance") or {}).get("round"),
                "predicted_iou": (a.get("provenance") or {}).get("predicted_iou")})
                for k, a in enumerate(self.pseudo.get(record.rel_path, []))]
        if self.proposals == "auto":
            with self.lock:
                masks = generate_masks(self.generator, image)
            return [self._new_object(k + 1, "proposed", decode(m["segmentation"]),
                                     source={"kind": "auto", "index": k,
                                             "predicted_iou": round(float(m["predicted_iou"]), 4)})
                    for k, m in enumerate(masks)]
        return []

    def _new_object(self, oid: int, status: str, mask: np.ndarray, **extra) -> dict:
        return new_object(oid, status, mask, self.model_sha256, **extra)

    def state(self, index: int) -> dict:
        """Image ``index``'s state (made, with its proposals, and saved the first time it is asked for).

        Raises:
            samtune.data.errors.DataError: the image cannot be read; the state records the failure.
        """
        record = self.record(index)
        with self.lock:
            state = self.store.load(record.rel_path)
            if state is not None:
                return state
            try:
                image = self.image(index)
                objects = self._initial_objects(index, image)
            except Exception as exc:  # noqa: BLE001 - any unreadable image or label: shown, the queue goes on
                self.mark_failed(index, exc)
                raise
            state = {"image": record.rel_path, "size": list(image.shape[:2]), "reviewed": False,
                     "objects": objects, "history": [], "failed": None}
            self.store.save(record.rel_path, state)
            return state

    def mark_failed(self, index: int, exc: BaseException) -> None:
        """Record that image ``index`` cannot be opened (the queue shows it and goes on)."""
        record = self.record(index)
        with self.lock:
            if self.store.load(record.rel_path) is None:
                self.store.save(record.rel_path, {"image": record.rel_path, "size": [0, 0], "reviewed": False,
                                                  "objects": [], "history": [], "failed": str(exc)})

    def prepare_ahead(self, index: int) -> None:
        """Prepare image ``index`` (its whole-image embedding, while the user looks at it) and the next ``prefetch``
        images (proposals, embedding) in a background thread, so that clicks and the next image answer at once."""
        if self._worker is not None and self._worker.is_alive():
            return

        def work() -> None:
            for j in range(index, min(index + 1 + self.prefetch, len(self.records))):
                try:
                    self.state(j)
                    self.embedded(j)
                except Exception as exc:  # noqa: BLE001 - shown when the image is opened
                    log.info("could not prepare %s: %s", self.records[j].rel_path, exc)

        self._worker = threading.Thread(target=work, daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ actions
    def act(self, index: int, body: Mapping) -> dict:
        """Carry out one action on image ``index`` and return its new state (saved before it returns).

        Raises:
            ActionError: an unknown action or object, or coordinates outside the image.
        """
        action = body.get("action")
        if action not in ACTIONS:
            raise ActionError(f"action {action!r} is not one of {list(ACTIONS)}")
        with self.lock:
            state = self.state(index)
            if state.get("failed"):
                raise ActionError(f"{state['image']} could not be read: {state['failed']}")
            if action == "undo":
                if state["history"]:
                    previous = state["history"].pop()
                    state["objects"], state["reviewed"] = previous["objects"], previous["reviewed"]
                    self._forget(index)
                self.store.save(state["image"], state)
                return state
            if action == "select":  # the page selected an object: its first click is decoded ahead of the user's
                self._warm_up(index, state, body.get("object"))
                return state
            snapshot = {"objects": copy.deepcopy(state["objects"]), "reviewed": state["reviewed"]}
            seconds = float(body.get("seconds") or 0.0)
            if action == "done":
                state["reviewed"] = True
            elif action in ("accept", "reject", "delete"):
                obj = self._object(state, body.get("object"))
                if action == "delete":
                    if obj["status"] != "added":
                        raise ActionError(f"object {obj['id']} is a proposal ({obj['status']}): reject it instead of "
                                          "deleting it, so that its decision is recorded")
                    state["objects"].remove(obj)
                else:
                    obj["status"] = "accepted" if action == "accept" else "rejected"
                    obj.update(time=now(), seconds=round(obj["seconds"] + seconds, 2), model_sha256=self.model_sha256)
            elif action == "click":
                self._click(index, state, body, seconds)
            elif action == "box":
                self._box(index, state, body, seconds)
            state["history"] = [*state["history"], snapshot][-HISTORY:]
            self.store.save(state["image"], state)
            return state

    def _object(self, state: dict, oid) -> dict:
        for obj in state["objects"]:
            if obj["id"] == oid:
                return obj
        raise ActionError(f"{state['image']} has no object {oid!r}")

    def _point(self, state: dict, x, y) -> tuple[float, float]:
        h, w = state["size"]
        try:
            x, y = float(x), float(y)
        except (TypeError, ValueError) as exc:
            raise ActionError(f"click coordinates must be numbers, got x={x!r}, y={y!r}") from exc
        if not (0 <= x < w and 0 <= y < h):
            raise ActionError(f"click ({x:g}, {y:g}) is outside the {w} x {h} image")
        return x, y

    def _forget(self, index: int) -> None:
        for key in [k for k in self._clicks if k[0] == index]:
            del self._clicks[key]

    def _click(self, index: int, state: dict, body: Mapping, seconds: float) -> None:
        x, y = self._point(state, body.get("x"), body.get("y"))
        label = int(body.get("label", 1))
        if label not in (0, 1):
            raise ActionError(f"click label must be 1 (positive) or 0 (negative), got {label}")
        oid = body.get("object")
        if oid is None:  # a new object from one positive click
            if label != 1:
                raise ActionError("a new object starts with a positive click")
            oid = max((o["id"] for o in state["objects"]), default=0) + 1
            obj = self._new_object(oid, "added", np.zeros(state["size"], bool), source=None)
            obj["clicks"] = {"points": [], "labels": []}
            state["objects"].append(obj)
        else:
            obj = self._object(state, oid)
            if not obj["clicks"]:  # a proposal, or an object added by a box: its interior point is its first click
                obj["clicks"] = self._seed(obj)
            if obj["status"] in ("proposed", "accepted", "rejected"):
                obj["status"] = "fixed"
        obj["clicks"]["points"].append([x, y])
        obj["clicks"]["labels"].append(label)
        mask, pred_iou = self.segment_clicks(index, obj["id"], obj["clicks"])
        obj.update(rle=encode(mask), n_clicks=obj["n_clicks"] + 1, predicted_iou=round(pred_iou, 4),
                   seconds=round(obj["seconds"] + seconds, 2), time=now(), model_sha256=self.model_sha256)

    @staticmethod
    def _seed(obj: dict) -> dict:
        """The first click of an object that has none (a proposal, a box): its interior point farthest from its
        boundary, evaluation's ``point1``."""
        mask = torch.from_numpy(decode(obj["rle"]))[None]
        cx, cy = (float(v) for v in center_points(mask).reshape(-1, 2)[0])
        return {"points": [[cx, cy]], "labels": [1]}

    def _warm_up(self, index: int, state: dict, oid) -> None:
        """Decode the first click of a selected object that has none yet, in the background: the user's first
        correction click then costs one step of the loop."""
        try:
            obj = self._object(state, oid)
        except ActionError:
            return
        if obj["clicks"] or obj["status"] == "rejected":
            return
        seed = self._seed(obj)

        def work() -> None:
            with self.lock:
                cached = self._clicks.get((index, obj["id"]))
                if cached is None or cached[1] != seed["points"]:
                    self.segment_clicks(index, obj["id"], seed)

        threading.Thread(target=work, daemon=True).start()

    def segment_clicks(self, index: int, oid: int, clicks: Mapping) -> tuple[np.ndarray, float]:
        """The mask of an object's clicks: SAM's interactive loop, resumed from the state of its earlier clicks
        when the session has it (the same clicks so far), else replayed from the first click (the same answer)."""
        points = torch.tensor(clicks["points"], dtype=torch.float)[None]
        labels = torch.tensor(clicks["labels"], dtype=torch.int)[None]
        n = points.shape[1]
        image = self.image(index)
        predict = self.segmenter.click_predictor(image, self.embedded(index))
        for key in [k for k in self._clicks if k[0] != index]:  # memory stays that of one image's objects
            del self._clicks[key]
        state, done_points, done_labels = self._clicks.get((index, oid), (None, [], []))
        done = len(done_points)
        if not (0 < done < n and done_points == clicks["points"][:done] and done_labels == clicks["labels"][:done]):
            state, done = None, 0
        for k in range(done, n):
            masks, state, pred_iou = predict(points[:, : k + 1], labels[:, : k + 1], state, k == 0)
        self._clicks[(index, oid)] = (state, [list(p) for p in clicks["points"]], list(clicks["labels"]))
        return masks[0].numpy(), float(pred_iou[0])

    def _box(self, index: int, state: dict, body: Mapping, seconds: float) -> None:
        box = body.get("box")
        if not isinstance(box, list) or len(box) != 4:
            raise ActionError(f"box must be [x0, y0, x1, y1], got {box!r}")
        x0, y0 = self._point(state, box[0], box[1])
        x1, y1 = self._point(state, box[2], box[3])
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        image = self.image(index)
        (pred,) = self.segmenter.segment(image, [{"box": [x0, y0, x1, y1]}], "box", multimask=False,
                                         embedded=self.embedded(index))
        oid = max((o["id"] for o in state["objects"]), default=0) + 1
        obj = self._new_object(oid, "added", pred.masks[0].numpy(), box=[x0, y0, x1, y1],
                               predicted_iou=round(float(pred.pred_iou[0]), 4), seconds=round(seconds, 2))
        state["objects"].append(obj)
