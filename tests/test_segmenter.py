"""The prediction layer: one Segmenter for every caller, one registry of prompt modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from samtune.data.records import ImageRecord
from samtune.evaluation.evaluator import MODES, evaluate_model
from samtune.inference.segment import segment_prompts
from samtune.metrics import instance_iou_dice
from samtune.model import build_model
from samtune.predict.modes import EVAL_MODES, FIXED_MODES, PREDICT_MODES, REGISTRY, TITLES, prompt_mode
from samtune.predict.segmenter import Segmenter
from samtune.predict.zoom import ZoomConfig
from samtune.prompts import make_instance_prompts
from tests.blob_data import small_discs, write_disc_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped():
    model = build_model("sam_tiny", checkpoint=str(ROOT / "data" / "checkpoints" / "sam_tiny_generalist.pt")).eval()
    image, instances = small_discs()
    prompts = make_instance_prompts(instances, seed=0, key="discs_0.png")
    return model, image, instances, prompts


def test_every_mode_is_registered_once_with_what_callers_read():
    assert MODES == EVAL_MODES and set(FIXED_MODES) <= set(EVAL_MODES)
    assert {"box", "points", "auto"} == set(PREDICT_MODES)
    for name, mode in REGISTRY.items():
        assert mode.name == name and TITLES[name] == mode.title
        assert mode.kind in ("fixed", "oracle", "clicks", "auto")
        assert (mode.key is None) == (mode.kind == "auto")
    # SAM's output choice: a box or several points the single mask, one point the best of three
    assert not prompt_mode("box").multimask_for(0) and prompt_mode("point1").multimask_for(1)
    assert not prompt_mode("point3").multimask_for(3)
    assert prompt_mode("points").multimask_for(1) and not prompt_mode("points").multimask_for(2)
    with pytest.raises(ValueError, match="unknown prompt mode 'lasso'"):
        prompt_mode("lasso")


def test_a_click_gives_the_mask_the_evaluation_and_predict_give(shipped, tmp_path):
    """The first click of the interactive loop, the point1 mode of evaluation and scripts/predict.py's one-point
    prompt are one decode: the same mask and predicted IoU for the same point."""
    model, image, instances, prompts = shipped
    segmenter = Segmenter(model)
    embedded = segmenter.embed(image)
    (pred,) = segmenter.segment(image, prompts, "point1", multimask=True, embedded=embedded)
    coords = torch.tensor([p["point1"]["points"] for p in prompts], dtype=torch.float)
    labels = torch.ones(len(prompts), 1, dtype=torch.int)
    masks, low_res, pred_iou = segmenter.click_predictor(image, embedded)(coords, labels, None, True)
    assert torch.equal(masks, pred.masks) and torch.allclose(pred_iou, pred.pred_iou)
    assert low_res.shape == (len(prompts), 1, 64, 64)  # the mask prompt of the next click (sam_tiny: 256 / 4)

    predicted = segment_prompts(model, image, [{"points": p["point1"]} for p in prompts], "points")
    assert all(np.array_equal(m.mask, pred.masks[i].numpy()) for i, m in enumerate(predicted))

    root = write_disc_dataset(tmp_path, "test", 1)
    record = ImageRecord(image_path=root / "test" / "images" / "discs_0.png", rel_path="discs_0.png", split="test",
                         mask_path=root / "test" / "masks" / "discs_0.png")
    result = evaluate_model(model, [record], {"discs_0.png": prompts}, name="m", modes=["point1"])
    row_iou = [r["pred_iou"] for r in result.rows]
    assert row_iou == [round(float(v), 6) for v in pred.pred_iou]


def test_zoom_is_the_same_interface_and_sees_small_objects_better(shipped):
    """Whole image and prompt-focused zoom behind one call: same chunks, masks at the image size; on discs a few
    pixels wide in the model input the zoomed boxes fit the objects better."""
    model, image, instances, prompts = shipped
    gt = torch.stack([torch.from_numpy(instances == p["instance"]) for p in prompts])
    ious = {}
    for name, zoom in (("whole", None), ("zoom", ZoomConfig(context=2.0))):
        (pred,) = Segmenter(model, zoom).segment(image, prompts, "box", multimask=False)
        assert pred.masks.shape == gt.shape and pred.masks.dtype == torch.bool
        assert (pred.low_res.__class__.__name__ == "ZoomedLogits") == (zoom is not None)
        inter = (pred.masks & gt).sum((1, 2)).float()
        ious[name] = float((inter / (pred.masks | gt).sum((1, 2)).clamp(min=1)).mean())
    assert ious["zoom"] > ious["whole"], ious


def test_correction_clicks_work_in_prompt_focused_zoom(shipped, tmp_path):
    """Under zoom a first click is evaluation's zoomed point1 answer; later clicks segment each object in its crop
    with its previous logits (moved into a new crop's frame when the crop changes), and evaluation's clicks mode
    runs zoomed, improving with clicks."""
    from samtune.evaluation.clicks import run_clicks
    from samtune.predict.zoom import ZoomedLogits, _remap_logits

    model, image, instances, prompts = shipped
    zoom = ZoomConfig(context=2.0)
    segmenter = Segmenter(model, zoom)
    (point1,) = segmenter.segment(image, prompts, "point1", multimask=True)
    predict = segmenter.click_predictor(image)
    coords = torch.tensor([p["point1"]["points"] for p in prompts], dtype=torch.float)
    labels = torch.ones(len(prompts), 1, dtype=torch.int)
    masks, state, pred_iou = predict(coords, labels, None, True)
    assert torch.equal(masks, point1.masks) and torch.allclose(pred_iou, point1.pred_iou)
    assert isinstance(state, ZoomedLogits) and len(state) == len(prompts)

    gt = torch.stack([torch.from_numpy(instances == p["instance"]) for p in prompts])
    out = run_clicks(segmenter.click_predictor(image), gt, coords[:, 0], max_clicks=4)
    assert torch.allclose(out.ious[:, 0], instance_iou_dice(masks, gt)[0])
    assert float(out.ious[:, -1].mean()) >= float(out.ious[:, 0].mean())

    # moving logits to the same crop is the identity up to resampling; to a shifted crop they move with the pixels
    window = state.windows[0]
    same = _remap_logits(model, state.logits[0], window, window)
    assert torch.allclose((same > 0).float().mean(), (state.logits[0] > 0).float().mean(), atol=0.02)

    root = write_disc_dataset(tmp_path, "test", 1)
    record = ImageRecord(image_path=root / "test" / "images" / "discs_0.png", rel_path="discs_0.png", split="test",
                         mask_path=root / "test" / "masks" / "discs_0.png")
    result = evaluate_model(model, [record], {"discs_0.png": prompts}, name="m", modes=["clicks", "point1"],
                            zoom=zoom, max_clicks=3)
    clicks = result.summary["clicks"]
    assert clicks["miou_at"]["1"] == pytest.approx(result.summary["point1"]["miou"])
    assert clicks["miou_at"]["3"] >= clicks["miou_at"]["1"]
