"""Prompt-focused zoom: crop windows, pasting zoomed masks back, and zoomed validation during training."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from samtune.data.sources import build_records
from samtune.data.zoom import ZoomCropConfig, sample_zoom_crop, zoom_window
from samtune.evaluation.evaluator import evaluate_model
from samtune.evaluation.job import validation_prompts
from samtune.losses import SamLoss
from samtune.model import build_model
from samtune.predict.zoom import ZoomConfig, decode_prompts_zoomed, point_window, zoom_config
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
    """A decoder that answers every box prompt with the pixels of the box itself, as training boxes mean it:
    ``(x0, y0, x1, y1)`` in the input frame covers input pixels x0..x1 and y0..y1 (in the low-resolution frame)."""
    side = model.low_res_size
    scale = side / model.img_size

    def decode(embedding, *, points=None, boxes=None, mask_input=None, multimask_output=True):
        n = boxes.shape[0]
        logits = torch.full((n, 4, side, side), -20.0)
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            rows = slice(round(y0 * scale), round((y1 + 1) * scale))
            logits[i, :, rows, round(x0 * scale) : round((x1 + 1) * scale)] = 20.0
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
        expected[y0 : y1 + 1, x0 : x1 + 1] = True  # a box from a mask ends at its last row and column
        iou = (mask & expected).sum() / (mask | expected).sum()
        assert iou > 0.9, ((x0, y0, x1, y1), float(iou))
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= x0 - 1 and xs.max() <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() <= y1 + 1


def test_zoomed_prompts_are_mapped_by_pixel_extent(tiny, monkeypatch):
    """A crop enlarged s times: a box's last column becomes s input pixels, all inside the box the decoder gets
    (x * s alone would start the box's far edge where that column starts); a point lands on its pixel's centre."""
    seen = {}

    def decode(embedding, *, points=None, boxes=None, mask_input=None, multimask_output=True):
        seen["boxes"], seen["points"] = boxes, points
        return torch.zeros(1, 4, tiny.low_res_size, tiny.low_res_size), torch.ones(1, 4)

    monkeypatch.setattr(tiny, "decode", decode)
    image = np.zeros((64, 64, 3), np.uint8)
    prompt = {"instance": 1, "box": [20, 20, 29, 29], "point1": {"points": [[24, 25]], "labels": [1]}}
    cfg = ZoomConfig(context=2.0, min_frac=0.0)  # 10 px box -> 20 px crop at (15, 15) -> enlarged s = 256 / 20
    s = tiny.img_size / 20
    list(decode_prompts_zoomed(tiny, image, [prompt], "box", multimask=False, cfg=cfg))
    expected = torch.tensor([[5 * s, 5 * s, 15 * s - 1, 15 * s - 1]])
    torch.testing.assert_close(seen["boxes"], expected)
    list(decode_prompts_zoomed(tiny, image, [prompt], "point1", multimask=True, cfg=cfg))
    window = zoom_window((24, 25, 24, 25), (64, 64), context=2.0)  # a point's crop: min_side 16 px
    s = tiny.img_size / (window[2] - window[0])
    centre = torch.tensor([[[(24 - window[0] + 0.5) * s - 0.5, (25 - window[1] + 0.5) * s - 0.5]]])
    torch.testing.assert_close(seen["points"][0], centre)


def disc_oracle(model, radius: float):
    """A decoder that answers points with a disc of ``radius`` input pixels around the first (all outputs)."""
    side = model.low_res_size
    scale = side / model.img_size

    def decode(embedding, *, points=None, boxes=None, mask_input=None, multimask_output=True):
        x, y = points[0][0][0].tolist()  # around the first point
        yy, xx = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
        inside = (xx - (x + 0.5) * scale) ** 2 + (yy - (y + 0.5) * scale) ** 2 <= (radius * scale) ** 2
        return torch.where(inside, 20.0, -20.0).expand(1, 4, side, side).clone(), torch.ones(1, 4)

    return decode


def disc_model_seeing_crops(model, monkeypatch, radius: float) -> list:
    """``model`` answers points with :func:`disc_oracle`; the returned list collects the (h, w) of every crop it
    is given."""
    crops = []
    monkeypatch.setattr(model, "decode", disc_oracle(model, radius))
    prepare = model.prepare_image
    monkeypatch.setattr(model, "prepare_image", lambda crop: crops.append(crop.shape[:2]) or prepare(crop))
    return crops


def test_point_prompts_are_recropped_around_the_mask_just_predicted(tiny, monkeypatch):
    """refine=1: the first crop of a point is min_frac of the image; the second is context x the extent of the
    mask predicted in the first (here a disc of 40 input px radius, 100 px crop -> about 31 px across)."""
    crops = disc_model_seeing_crops(tiny, monkeypatch, 40.0)
    image = np.zeros((200, 200, 3), np.uint8)
    prompt = {"instance": 1, "point1": {"points": [[100, 90]], "labels": [1]}}
    cfg = ZoomConfig(context=2.0, min_frac=0.5, refine=1, one_point_whole=False)
    (chunk,) = decode_prompts_zoomed(tiny, image, [prompt], "point1", multimask=True, cfg=cfg)
    assert crops[0] == (100, 100)
    ys, xs = torch.nonzero(chunk.masks[0], as_tuple=True)
    across = 40.0 * 2 * 100 / tiny.img_size  # the disc in image pixels, as predicted in the first crop
    assert abs(crops[1][0] - 2 * across) <= 3 and crops[1][0] == crops[1][1]
    # the answer is the second crop's: the same disc, now 40 input px of a ~31 px crop -> about 2 * 40 * 31 / 256
    assert abs((int(xs.max()) - int(xs.min()) + 1) - 2 * 40.0 * crops[1][0] / tiny.img_size) <= 2
    assert abs(float(xs.float().mean()) - 100.5) <= 1 and abs(float(ys.float().mean()) - 90.5) <= 1
    # refine=0 is the first crop only; a box, whose extent is known, is never re-cropped
    crops.clear()
    list(decode_prompts_zoomed(tiny, image, [prompt], "point1", multimask=True,
                               cfg=ZoomConfig(min_frac=0.5, one_point_whole=False)))
    assert crops == [(100, 100)]
    crops.clear()
    monkeypatch.setattr(tiny, "decode", box_oracle(tiny))
    list(decode_prompts_zoomed(tiny, image, [{"instance": 1, "box": [90, 80, 109, 99]}], "box", multimask=False, cfg=cfg))
    assert crops == [(40, 40)]


def test_one_point_prompts_can_have_their_own_number_of_recrop_rounds(tiny, monkeypatch):
    """refine_one_point=2, refine=1: a one-point prompt is cropped 3 times, a three-point prompt twice, also when
    both are in one chunk (a predict.py call); the three-point prompt's answer is that of its own second crop."""
    crops = disc_model_seeing_crops(tiny, monkeypatch, 40.0)
    image = np.zeros((200, 200, 3), np.uint8)
    one = {"instance": 1, "points": {"points": [[100, 90]], "labels": [1]}}
    three = {"instance": 2, "points": {"points": [[60, 60], [64, 62], [62, 66]], "labels": [1, 1, 1]}}
    cfg = ZoomConfig(context=2.0, min_frac=0.5, refine=1, refine_one_point=2, one_point_whole=False)
    assert (cfg.rounds("points", 1), cfg.rounds("points", 3), cfg.rounds("box", 0)) == (2, 1, 0)
    (mixed,) = decode_prompts_zoomed(tiny, image, [one, three], "points", multimask=False, cfg=cfg)
    assert len(crops) == 2 + 2 + 1  # first crops, the first re-crop of both, the second re-crop of one
    crops.clear()
    (alone,) = decode_prompts_zoomed(tiny, image, [three], "points", multimask=False,
                                     cfg=ZoomConfig(context=2.0, min_frac=0.5, refine=1, one_point_whole=False))
    assert len(crops) == 2 and torch.equal(mixed.masks[1], alone.masks[0])
    assert float(mixed.pred_iou[1]) == float(alone.pred_iou[0])
    crops.clear()
    list(decode_prompts_zoomed(tiny, image, [one], "points", multimask=False,
                               cfg=ZoomConfig(min_frac=0.5, one_point_whole=False)))
    assert len(crops) == 1  # refine_one_point=None follows refine (0)


def test_point_window_is_sized_by_the_whole_image_answer():
    """point_window: a point's crop is min_frac of the image (80 px of 400) unless context x the extent of its
    whole-image mask (with the point) is larger; then it is that square around them, or None (keep the whole-image
    answer) when that square is the image."""
    size, cfg = (400, 400), ZoomConfig(context=2.0, min_frac=0.2)
    prompt = {"instance": 1, "point1": {"points": [[200, 190]], "labels": [1]}}
    default = zoom_window((200, 190, 200, 190), size, context=2.0, min_side=80)
    mask = torch.zeros(size, dtype=torch.bool)
    assert point_window(prompt, "point1", mask, size, cfg) == default  # nothing predicted: the usual crop
    mask[185:200, 195:210] = True  # a 15 px object: 30 px < 80 px, it keeps its small crop
    assert point_window(prompt, "point1", mask, size, cfg) == default == (160, 150, 240, 230)
    mask[:] = False
    mask[100:250, 120:270] = True  # 150 px: a 300 px square around it, the object whole inside
    x0, y0, x1, y1 = point_window(prompt, "point1", mask, size, cfg)
    assert (x1 - x0, y1 - y0) == (300, 300) and x0 <= 120 and x1 >= 270 and y0 <= 100 and y1 >= 250
    mask[:] = False
    mask[150:200, 205:300] = True  # the point outside the mask still lies in the crop
    x0, y0, x1, y1 = point_window(prompt, "point1", mask, size, cfg)
    assert x0 <= 200 and x1 >= 300 and (x1 - x0) == 2 * 100  # x 200..299
    mask[:] = False
    mask[50:300, 60:310] = True  # 250 px: 500 px, more than the image: the whole-image answer stays
    assert point_window(prompt, "point1", mask, size, cfg) is None


def object_model_seeing_crops(model, monkeypatch) -> list:
    """``model`` sees what it is given: its "embedding" is the prepared input itself, and a point is answered (every
    output) with the bright connected region under it, as far as the input shows it. The returned list collects the
    (h, w) of every image or crop embedded."""
    from scipy import ndimage

    crops = []
    side = model.low_res_size
    prepare = model.prepare_image
    monkeypatch.setattr(model, "prepare_image", lambda crop: crops.append(crop.shape[:2]) or prepare(crop))
    monkeypatch.setattr(model, "embed", lambda x: x)

    def decode(embedding, *, points=None, boxes=None, mask_input=None, multimask_output=True):
        coords = points[0]
        logits = torch.full((coords.shape[0], 4, side, side), -20.0)
        for i in range(coords.shape[0]):
            bright = (embedding[i if embedding.shape[0] > 1 else 0].mean(0) > 1.0).numpy()
            labels, _ = ndimage.label(bright)
            x, y = (int(v) for v in coords[i, 0].tolist())
            region = torch.from_numpy(labels == labels[y, x]).float() if labels[y, x] else torch.zeros(bright.shape)
            low = torch.nn.functional.interpolate(region[None, None], size=(side, side), mode="area")[0, 0]
            logits[i, :, low > 0.5] = 20.0
        return logits, torch.ones(coords.shape[0], 4)

    monkeypatch.setattr(model, "decode", decode)
    return crops


@pytest.mark.parametrize(("square", "expected_crops"), [
    ((50, 50, 62, 62), [(80, 80)]),  # 12 px: inside its 80 px crop, kept as it was; no whole-image embedding
    ((140, 140, 260, 260), [(80, 80), (400, 400), (240, 240)]),  # 120 px, cut: cropped again, ~2 x 120 px
    # 300 px: a 600 px crop is the image; a step of 2 x the cut answer (160 px) still cuts it: the whole-image answer
    ((50, 50, 350, 350), [(80, 80), (400, 400), (160, 160)]),
])
def test_a_one_point_prompt_on_a_large_object_gets_a_crop_that_holds_it(tiny, monkeypatch, square, expected_crops):
    """one_point_whole, with a model that segments the object under the point as far as its input shows it: the
    usual crop (0.2 of the 400 px image: 80 px) holds a small object, which keeps that crop and its answer; it
    cuts a large one, whose point is decoded on the whole image and segmented again in a crop of 2x that mask's
    extent (or, when that crop would be the image and a crop of 2x the cut answer cuts it too, answered on the
    whole image)."""
    crops = object_model_seeing_crops(tiny, monkeypatch)
    x0, y0, x1, y1 = square
    image = np.zeros((400, 400, 3), np.uint8)
    image[y0:y1, x0:x1] = 255
    truth = torch.zeros(400, 400, dtype=torch.bool)
    truth[y0:y1, x0:x1] = True
    prompt = {"instance": 1, "point1": {"points": [[(x0 + x1) // 2, (y0 + y1) // 2]], "labels": [1]}}
    (chunk,) = decode_prompts_zoomed(tiny, image, [prompt], "point1", multimask=True, cfg=ZoomConfig(min_frac=0.2))
    assert len(crops) == len(expected_crops) and crops[:2] == expected_crops[:2]
    for (h, w), (eh, _) in zip(crops[2:], expected_crops[2:]):  # 2x a mask as the 256 px input shows it
        assert h == w and abs(h - eh) <= 20  # (the 120 px square is 77 input px on the whole image)
    iou = float((chunk.masks[0] & truth).sum() / (chunk.masks[0] | truth).sum())
    assert iou > 0.95, iou
    crops.clear()
    (before,) = decode_prompts_zoomed(tiny, image, [prompt], "point1", multimask=True,
                                      cfg=ZoomConfig(min_frac=0.2, one_point_whole=False))
    assert crops == [(80, 80)]
    if len(expected_crops) == 1:
        assert torch.equal(chunk.masks, before.masks) and torch.equal(chunk.pred_iou, before.pred_iou)
    else:  # without it, the answer is the object as far as the 80 px crop shows it
        assert int(before.masks[0].sum()) <= 80 * 80
    three = {"instance": 1, "point3": {"points": [prompt["point1"]["points"][0]] * 3, "labels": [1, 1, 1]}}
    crops.clear()
    list(decode_prompts_zoomed(tiny, image, [three], "point3", multimask=False, cfg=ZoomConfig(min_frac=0.2)))
    assert crops == [(80, 80)]  # several points keep their crop (their spread sizes it)

def test_zoom_refine_config():
    assert zoom_config(OmegaConf.create({"zoom": 2.0, "zoom_refine": 1})).refine == 1
    assert zoom_config(OmegaConf.create({"zoom": 2.0})).refine == 0
    assert "re-cropped" in ZoomConfig(refine=2).describe() and "re-cropped" not in ZoomConfig().describe()
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="eval.zoom.refine"):
            ZoomConfig(refine=bad)
        with pytest.raises(ValueError, match="eval.zoom.refine_one_point"):
            ZoomConfig(refine_one_point=bad)
    cfg = zoom_config(OmegaConf.create({"zoom": 2.0, "zoom_refine": 1, "zoom_refine_one_point": 2}))
    assert (cfg.refine, cfg.refine_one_point) == (1, 2)
    assert "1x (2x for a single point)" in cfg.describe()
    assert "re-cropped 2x around" in ZoomConfig(refine=2, refine_one_point=2).describe()
    assert "re-cropped 0x (2x for a single point)" in ZoomConfig(refine_one_point=2).describe()
    assert zoom_config(OmegaConf.create({"zoom": 2.0})).one_point_whole is True
    assert zoom_config(OmegaConf.create({"zoom": 2.0, "zoom_one_point_whole": False})).one_point_whole is False
    assert "whole-image mask" in ZoomConfig().describe()
    assert "whole-image mask" not in ZoomConfig(one_point_whole=False).describe()
    with pytest.raises(ValueError, match="eval.zoom.one_point_whole"):
        ZoomConfig(one_point_whole="yes")


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


def test_zoom_settings_are_one_nested_definition_with_the_old_keys_as_aliases():
    """eval.zoom (train, evaluate) and zoom (predict) are one config group; a number is short for its context, the
    flat keys before it still work with a deprecation warning, and every command form composes."""
    from hydra import compose, initialize_config_dir

    nested = zoom_config(OmegaConf.create({"zoom": {"context": 2.0, "refine": 1, "min_frac": 0.1}}))
    assert (nested.context, nested.refine, nested.min_frac) == (2.0, 1, 0.1)
    assert zoom_config(OmegaConf.create({"zoom": {"context": None, "refine": 1}})) is None
    with pytest.warns(FutureWarning, match=r"eval.zoom_refine is deprecated: use eval.zoom.refine"):
        assert zoom_config(OmegaConf.create({"zoom": {"context": 2.0}, "zoom_refine": 3})).refine == 3
    with pytest.raises(ValueError, match=r"eval.zoom: unknown keys \['refin'\]"):
        zoom_config(OmegaConf.create({"zoom": {"context": 2.0, "refin": 1}}))
    with pytest.raises(ValueError, match="eval.zoom must be null, a number"):
        zoom_config(OmegaConf.create({"zoom": "wide"}))
    root = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(str(root), version_base=None):
        cases = {
            ("train", "experiment=pcb"): (2.0, 0),
            ("train", "experiment=generalist"): (2.0, 1),
            ("train", "experiment=generalist eval.zoom=null"): None,
            ("train", "eval.zoom=3"): (3.0, 0),
            ("evaluate", "experiment=pcb eval.zoom.refine=2"): (2.0, 2),
            ("predict", "input=x out=y"): None,
            ("predict", "input=x out=y zoom=2"): (2.0, 0),
            ("predict", "input=x out=y zoom.context=2 zoom.refine=1"): (2.0, 1),
        }
        for (name, overrides), want in cases.items():
            cfg = compose(name, overrides=overrides.split())
            got = zoom_config(cfg if name == "predict" else cfg.eval, "" if name == "predict" else "eval")
            assert (got if got is None else (got.context, got.refine)) == want, (name, overrides)
