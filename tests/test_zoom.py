"""Prompt-focused zoom: crop windows, pasting zoomed masks back, and zoomed validation during training."""

from __future__ import annotations

import functools

import lightning as L
import numpy as np
import pytest
import torch

from samtune.data.sources import build_records
from samtune.data.zoom import ZoomCropConfig, sample_zoom_crop, zoom_window
from samtune.evaluation.evaluator import evaluate_model
from samtune.evaluation.job import validation_prompts
from samtune.evaluation.zoom import ZoomConfig, decode_prompts_zoomed
from samtune.losses import SamLoss
from samtune.model import build_model
from samtune.prompts import PromptPolicy, PromptSimulator
from samtune.training.datamodule import SamDataModule
from samtune.training.module import SamTuneModule
from tests.blob_data import write_blob_dataset

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log", "ignore:.*does not have many workers")


@pytest.mark.parametrize(
    ("extent", "size", "context", "expected"),
    [
        ((40, 50, 59, 59), (200, 300), 2.0, (30, 35, 70, 75)),  # 20 px extent -> 40 px square, centred
        ((0, 0, 9, 9), (200, 300), 3.0, (0, 0, 30, 30)),  # at the corner: shifted inside, not shrunk
        ((290, 190, 299, 199), (200, 300), 3.0, (270, 170, 300, 200)),
        ((10, 10, 189, 189), (200, 300), 2.0, (0, 0, 300, 200)),  # larger than the image: clipped to it
        ((100, 100, 101, 101), (200, 300), 2.0, (93, 93, 109, 109)),  # tiny extent: min_side 16
    ],
)
def test_zoom_window(extent, size, context, expected):
    assert zoom_window(extent, size, context=context) == expected


def test_zoom_crop_keeps_the_chosen_instance_whole():
    instances = np.zeros((120, 160), np.int32)
    instances[10:20, 130:150] = 1
    instances[80:110, 20:40] = 2
    image = np.dstack([instances * 50] * 3).astype(np.uint8)
    cfg = ZoomCropConfig(prob=1.0, context_min=2.0, context_max=2.0, max_shift=0.0)
    seen = set()
    for seed in range(8):
        img, inst = sample_zoom_crop(image, instances, cfg, np.random.default_rng(seed))
        ids = set(np.unique(inst[inst > 0]).tolist())
        assert img.shape[:2] == inst.shape and len(ids) == 1
        (k,) = ids
        assert (inst == k).sum() == (instances == k).sum()  # the target is never cut
        assert max(inst.shape) == round(2 * max(np.ptp(np.nonzero(instances == k)[0]) + 1,
                                                np.ptp(np.nonzero(instances == k)[1]) + 1))
        seen.add(k)
    assert seen == {1, 2}
    unchanged = sample_zoom_crop(image, instances, ZoomCropConfig(prob=0.0), np.random.default_rng(0))
    assert unchanged[1] is instances


@pytest.fixture(scope="module")
def tiny():
    return build_model("sam_tiny", seed=0)


def box_oracle(model):
    """A decoder that answers every box prompt with the box itself (in the low-resolution frame)."""
    side = model.low_res_size
    scale = side / model.img_size

    def decode(embedding, *, points=None, boxes=None, mask_input=None, multimask_output=True):
        n = boxes.shape[0]
        logits = torch.full((n, 4, side, side), -20.0)
        for i, (x0, y0, x1, y1) in enumerate((boxes * scale).tolist()):
            logits[i, :, round(y0) : round(y1), round(x0) : round(x1)] = 20.0
        return logits, torch.ones(n, 4)

    return decode


@pytest.mark.parametrize("context", [1.5, 2.0, 4.0])
def test_zoomed_masks_are_pasted_back_where_the_prompt_is(tiny, monkeypatch, context):
    """With a decoder that returns its box prompt, each zoomed mask is that box in the original image."""
    monkeypatch.setattr(tiny, "decode", box_oracle(tiny))
    h, w = 180, 330  # not square, not the model's size: both resize and padding matter
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    boxes = [[5, 7, 24, 30], [250, 140, 329, 179], [100, 60, 139, 119], [160, 0, 167, 5]]
    prompts = [{"instance": i + 1, "box": b} for i, b in enumerate(boxes)]
    (chunk,) = decode_prompts_zoomed(tiny, image, prompts, "box", multimask=False, cfg=ZoomConfig(context=context))
    for (x0, y0, x1, y1), mask in zip(boxes, chunk.masks, strict=True):
        expected = torch.zeros(h, w, dtype=torch.bool)
        expected[y0:y1, x0:x1] = True  # SAM's box is continuous: x1 is a coordinate, not an included pixel
        iou = (mask & expected).sum() / (mask | expected).sum()
        assert iou > 0.8, ((x0, y0, x1, y1), float(iou))
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= x0 - 1 and xs.max() <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() <= y1 + 1


def test_validation_evaluates_the_zoomed_views_the_report_uses(tmp_path):
    """use_zoomed_validation: val/miou_* are the evaluation's zoomed mIoU on the val split's fixed prompts."""
    records, _ = build_records("folder", write_blob_dataset(tmp_path / "blobs", {"val": 2}, size=(96, 128)), "val")
    model = build_model("sam_tiny")  # the shipped generalist: masks that are not empty, so views differ
    module = SamTuneModule(
        model, simulator=PromptSimulator(PromptPolicy()), loss=SamLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4), mode="decoder_only",
    )
    prompts = validation_prompts(records, seed=0, binary_as_one_object=False, max_per_image=2)
    assert [len(p) for p in prompts.values()] == [2, 2]
    zoom = ZoomConfig(context=2.0)
    module.use_zoomed_validation(records, prompts, zoom)
    data = SamDataModule(records, records, img_size=model.img_size, augment="none", batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (logged,) = trainer.validate(module, datamodule=data, verbose=False)
    zoomed = evaluate_model(model, records, prompts, name="x", modes=["box", "point1"], zoom=zoom)
    whole = evaluate_model(model, records, prompts, name="x", modes=["box", "point1"])
    for mode in ("box", "point1"):
        assert logged[f"val/miou_{mode}"] == pytest.approx(zoomed.summary[mode]["miou"], abs=1e-6)
    assert logged["val/miou"] == pytest.approx((logged["val/miou_box"] + logged["val/miou_point1"]) / 2)
    assert zoomed.summary["box"]["miou"] != pytest.approx(whole.summary["box"]["miou"], abs=1e-3)
