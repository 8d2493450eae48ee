"""One place that turns prompts into masks: :class:`Segmenter`.

Evaluation (every prompt mode, zoomed validation during training), ``scripts/predict.py``, the automatic mask
generator's zoomed answers (and so the engine's pseudo-labels) all segment through it, so a prompt gives the same
mask wherever it is given. It has two views behind one interface:

- the whole image, embedded once as ``SamPredictor.set_image`` does (:mod:`samtune.predict.decoding`);
- prompt-focused zoom (``eval.zoom``): each prompt segmented in a crop of its neighbourhood resized to the model
  input, with its re-crop rounds (:mod:`samtune.predict.zoom`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from samtune.model.promptable_sam import PromptableSam
from samtune.predict.decoding import PromptPrediction, decode_prompts, finish_logits
from samtune.predict.zoom import ZoomConfig, ZoomedLogits, click_step_zoomed, decode_prompts_zoomed

CHUNK = 32  # prompts decoded per call on the whole image (bounds memory on images with many objects)

# predict(coords N x K x 2 XY original pixels, labels N x K, state | None, multimask)
#   -> (masks N x H x W bool, state, predicted IoU N); the state is what the next call takes as mask input: the
#   low-res logits N x 1 x h x w on the whole image, a ZoomedLogits under zoom (None for a first click)
ClickPredictor = Callable[
    [torch.Tensor, torch.Tensor, "torch.Tensor | None", bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]


@dataclass(frozen=True)
class Embedded:
    """An image embedded whole, as ``SamPredictor.set_image`` does.

    Attributes:
        embedding: 1 x C x h x w image embedding.
        input_size: (h, w) of the resized image before padding.
        original_size: (H, W) of the image.
    """

    embedding: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


class Segmenter:
    """Prompts to masks, logits and predicted IoU for one model, on the whole image or in prompt-focused zoom.

    Args:
        model: The model (callers put it in eval mode).
        zoom: Prompt-focused zoom settings; None: the whole image.
        stability_offset: Logit offset of the stability score (``SamAutomaticMaskGenerator``'s default 1.0).
        chunk: Prompts per decoder call on the whole image. Under zoom the crops embedded per encoder call follow
            ``zoom.memory_budget_gb`` (:func:`samtune.model.memory.crops_per_call`). Only the batching depends
            on either: the masks are the same for any value.
    """

    def __init__(self, model: PromptableSam, zoom: ZoomConfig | None = None, *, stability_offset: float = 1.0,
                 chunk: int = CHUNK) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.model = model
        self.zoom = zoom
        self.stability_offset = float(stability_offset)
        self.chunk = int(chunk)

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> Embedded:
        """Embed the whole of ``image`` (H x W x 3 uint8 RGB)."""
        x, input_size, original_size = self.model.prepare_image(image)
        return Embedded(self.model.embed(x), input_size, original_size)

    def segment(
        self,
        image: np.ndarray,
        prompts: list[dict],
        key: str,
        *,
        multimask: bool,
        output: int | None = None,
        embedded: Embedded | None = None,
    ) -> Iterator[PromptPrediction]:
        """Segment ``prompts`` (original-image pixels, all with the same number of points), chunk by chunk.

        Args:
            image: H x W x 3 uint8 RGB, the whole image.
            prompts: Dicts with ``"box"`` (key ``box``) or ``key: {"points", "labels"}``.
            key: Which prompt field to read (``box``, ``point1``, ``point3``, ``points``).
            multimask: Pick the best of the multimask outputs (one ambiguous point) instead of the single mask.
            output: Take this decoder output (0: single mask, 1-3: multimask) for every prompt instead of choosing
                (in every re-crop round under zoom).
            embedded: The image's whole-image embedding, if the caller has it (ignored under zoom: each crop is
                embedded on its own).

        Yields:
            :class:`PromptPrediction` chunks; ``low_res`` is a :class:`~samtune.predict.zoom.ZoomedLogits` under zoom
            (each answer's crop and its logits in that crop's frame).
        """
        if self.zoom is not None:
            yield from decode_prompts_zoomed(self.model, image, prompts, key, multimask=multimask, cfg=self.zoom,
                                             stability_offset=self.stability_offset, output=output)
            return
        if not prompts:
            return
        if embedded is None:
            embedded = self.embed(image)
        yield from decode_prompts(self.model, embedded.embedding, prompts, key, input_size=embedded.input_size,
                                  original_size=embedded.original_size, multimask=multimask,
                                  stability_offset=self.stability_offset, chunk=self.chunk, output=output)

    def click_predictor(self, image: np.ndarray, embedded: Embedded | None = None) -> ClickPredictor:
        """SAM's interactive loop on ``image``: each call segments every object with all its clicks so far and the
        state its previous call returned as mask input (:data:`ClickPredictor`).

        On the whole image (``embedded``, or ``image`` embedded here) the state is the previous low-res logits, as
        ``SamPredictor`` takes them. Under zoom the first call is exactly the zoomed decoding of those clicks as
        a prompt (a first click gives evaluation's zoomed ``point1`` answer, re-crop rounds included); later calls
        segment each object in its crop (kept while it holds the answer and the clicks, else re-cropped around
        them) with its previous logits (:func:`samtune.predict.zoom.click_step_zoomed`); the state is a
        :class:`~samtune.predict.zoom.ZoomedLogits`.
        """
        model = self.model
        if self.zoom is not None:
            zoom = self.zoom

            @torch.no_grad()
            def predict_zoomed(coords: torch.Tensor, labels: torch.Tensor, state, multimask: bool):
                if state is not None:
                    return click_step_zoomed(model, image, coords, labels, state, multimask=multimask, cfg=zoom,
                                             stability_offset=self.stability_offset)
                prompts = [{"points": {"points": c.tolist(), "labels": lab.tolist()}}
                           for c, lab in zip(coords.cpu(), labels.cpu(), strict=True)]
                chunks = list(decode_prompts_zoomed(model, image, prompts, "points", multimask=multimask, cfg=zoom,
                                                    stability_offset=self.stability_offset))
                masks = torch.cat([c.masks for c in chunks])
                state = ZoomedLogits([wnd for c in chunks for wnd in c.low_res.windows],
                                     torch.cat([c.low_res.logits for c in chunks]), masks,
                                     {wnd: e for c in chunks for wnd, e in c.low_res.embeddings.items()})
                return masks, state, torch.cat([c.pred_iou for c in chunks])

            return predict_zoomed
        if embedded is None:
            embedded = self.embed(image)

        @torch.no_grad()
        def predict(coords: torch.Tensor, labels: torch.Tensor, mask_input: torch.Tensor | None, multimask: bool):
            dev = model.device
            points = (model.coords_to_input(coords.clone(), embedded.original_size).to(dev), labels.to(dev))
            logits, iou = model.decode(embedded.embedding, points=points, mask_input=mask_input)
            masks, pred_iou, _, low_res = finish_logits(
                model, logits, iou, multimask=multimask, input_size=embedded.input_size,
                original_size=embedded.original_size, stability_offset=self.stability_offset,
            )
            return masks, low_res, pred_iou

        return predict
