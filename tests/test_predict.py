"""``scripts/predict.py``: outputs per image, prompt files, and the guards that protect the input and other runs."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from pycocotools import mask as mask_utils

from samtune.inference.outputs import OutputDirError
from samtune.inference.predict import predict
from samtune.inference.prompts_file import PromptFileError
from samtune.model import build_model, save_sam_weights
from tests.blob_data import small_discs, write_blob_dataset
from tests.test_train_e2e import ROOT, run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    data = write_blob_dataset(tmp / "blobs", {"test": 2})
    images = tmp / "images"
    shutil.copytree(data / "test" / "images", images / "sub")
    shutil.copy(images / "sub" / "test_0.png", images / "top.png")
    ckpt = save_sam_weights(build_model("sam_tiny", seed=2).sam, tmp / "model.pth")
    prompts = tmp / "prompts.json"
    prompts.write_text(json.dumps({
        "top.png": {"boxes": [[5, 5, 30, 25], [35, 20, 60, 44]],
                    "points": [{"points": [[20, 15]], "labels": [1]}, {"points": [[40, 30], [5, 5]], "labels": [1, 0]},
                               {"points": [[10, 40]], "labels": [1]}]},
        "sub/test_1.png": {"boxes": [[0, 0, 20, 20]]},
    }))
    return tmp, images, ckpt, prompts


# segment_anything's generator alone, on the whole image (sam_tiny's default adds crop layers and zoom: model.auto)
PLAIN_AUTO = ("auto.zoom=null", "auto.crop_n_layers=0")


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cfg(*overrides):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("predict", overrides=list(overrides))


def test_points_from_the_command_line(setup):
    tmp, images, ckpt, prompts = setup
    before = _digest(images)
    out = tmp / "out_points"
    run([sys.executable, str(ROOT / "scripts" / "predict.py"), f"ckpt={ckpt}", f"input={images}", "mode=points",
         f"prompts={prompts}", f"out={out}", f"hydra.run.dir={tmp / 'hydra_points'}"])
    assert _digest(images) == before  # the input is never written to
    doc = json.loads((out / "top_coco.json").read_text())
    anns = doc["annotations"]
    assert doc["images"][0]["file_name"] == "top.png" and len(anns) == 3
    assert sorted(a["prompt_index"] for a in anns) == [0, 1, 2]
    areas = [a["area"] for a in anns]
    assert areas == sorted(areas, reverse=True) and [a["id"] for a in anns] == [1, 2, 3]
    for a in anns:
        assert {"predicted_iou", "stability_score", "score", "bbox", "segmentation"} <= set(a)
        assert a["area"] == int(mask_utils.area(a["segmentation"]))
    two = next(a for a in anns if a["prompt_index"] == 1)
    assert two["prompt"] == {"points": [[40.0, 30.0], [5.0, 5.0]], "labels": [1, 0]}
    ids = cv2.imread(str(out / "top_instances.png"), cv2.IMREAD_UNCHANGED)
    assert ids.dtype == np.uint16 and ids.shape == (48, 64) and ids.max() <= 3
    for a in anns:  # a mask's visible pixels in the PNG lie inside its RLE (smaller masks are drawn on top)
        mask = mask_utils.decode(a["segmentation"]).astype(bool)
        assert not np.any((ids == a["id"]) & ~mask)
    overlay = cv2.imread(str(out / "top_overlay.png"))
    assert overlay.shape == (48, 64, 3)
    # images without prompts still get (empty) outputs; sub-folders are kept
    assert json.loads((out / "sub" / "test_0_coco.json").read_text())["annotations"] == []
    marker = json.loads((out / "predict_run.json").read_text())
    assert marker["finished"] and marker["images"] == 3 and marker["settings"]["mode"] == "points"


def test_auto_mode_writes_masks_largest_first(setup):
    tmp, images, ckpt, _ = setup
    out = tmp / "out_auto"
    summary = predict(_cfg(f"ckpt={ckpt}", f"input={images / 'top.png'}", "mode=auto", f"out={out}",
                           "auto.points_per_side=3", "auto.pred_iou_thresh=0", "auto.stability_score_thresh=0",
                           *PLAIN_AUTO))
    assert summary["images"] == 1 and summary["masks"] >= 1
    anns = json.loads((out / "top_coco.json").read_text())["annotations"]
    assert len(anns) == summary["masks"]
    assert [a["area"] for a in anns] == sorted((a["area"] for a in anns), reverse=True)
    assert all("point" in a["prompt"] and 0 <= a["stability_score"] <= 1 for a in anns)
    assert (out / "top_instances.png").is_file() and (out / "top_overlay.png").is_file()


def test_box_mode_with_zoom(setup):
    tmp, images, ckpt, prompts = setup
    out = tmp / "out_box_zoom"
    summary = predict(_cfg(f"ckpt={ckpt}", f"input={images}", "mode=box", f"prompt_file={prompts}", f"out={out}",
                           "zoom=2"))
    assert summary["masks"] == 3
    anns = json.loads((out / "top_coco.json").read_text())["annotations"]
    assert sorted(a["prompt"]["box"] for a in anns) == [[5.0, 5.0, 30.0, 25.0], [35.0, 20.0, 60.0, 44.0]]
    assert "zoom" in json.loads((out / "predict_run.json").read_text())["settings"]["zoom"]
    out = tmp / "out_points_zoom"
    summary = predict(_cfg(f"ckpt={ckpt}", f"input={images}", "mode=points", f"prompt_file={prompts}", f"out={out}",
                           "zoom=2", "zoom_refine=1"))
    assert summary["masks"] == 3
    assert "re-cropped 1x" in json.loads((out / "predict_run.json").read_text())["settings"]["zoom"]


def test_output_folder_guards(setup):
    tmp, images, ckpt, prompts = setup
    with pytest.raises(OutputDirError, match="inside the input folder"):
        predict(_cfg(f"ckpt={ckpt}", f"input={images}", "mode=box", f"prompt_file={prompts}",
                     f"out={images / 'predictions'}"))
    base = [f"ckpt={ckpt}", f"input={images / 'top.png'}", "mode=auto", "auto.points_per_side=1"]
    foreign = tmp / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty"):
        predict(_cfg(*base, f"out={foreign}"))
    assert (foreign / "notes.txt").read_text() == "mine"
    out = tmp / "out_guard"
    predict(_cfg(*base, f"out={out}"))
    predict(_cfg(*base, f"out={out}"))  # the same run again may write into its own folder
    with pytest.raises(OutputDirError, match="other settings"):
        predict(_cfg(*base, f"out={out}", "auto.pred_iou_thresh=0.42"))
    predict(_cfg(*base, f"out={out}", "auto.pred_iou_thresh=0.42", "overwrite=true"))
    assert json.loads((out / "predict_run.json").read_text())["settings"]["auto"]["pred_iou_thresh"] == 0.42


def test_prompt_file_errors(setup):
    tmp, images, ckpt, _ = setup
    bad = tmp / "bad.json"
    base = [f"ckpt={ckpt}", f"input={images}", "mode=box", f"prompt_file={bad}", f"out={tmp / 'never'}"]
    bad.write_text(json.dumps({"nope.png": {"boxes": [[0, 0, 5, 5]]}}))
    with pytest.raises(PromptFileError, match="match no input image"):
        predict(_cfg(*base))
    bad.write_text(json.dumps({"top.png": {"boxes": [[10, 0, 5, 5]]}}))
    with pytest.raises(PromptFileError, match=r"'top.png'.boxes\[0\].*x2 < x1"):
        predict(_cfg(*base))
    bad.write_text(json.dumps({"top.png": {"points": [{"points": [[1, 2]], "labels": [1, 0]}]}}))
    with pytest.raises(PromptFileError, match="one 0 or 1 per point"):
        predict(_cfg(*base[:2], "mode=points", *base[3:]))
    with pytest.raises(ValueError, match="prompts= is required"):
        predict(_cfg(*base[:3], f"out={tmp / 'never'}"))
    assert not (tmp / "never").exists()


def test_auto_mode_that_keeps_nothing_says_why(setup, caplog):
    """Thresholds no mask of this model reaches: 0 masks, and the log and predict_run.json say which filter
    removed them and the best values seen (not empty files without a word)."""
    tmp, images, ckpt, _ = setup
    out = tmp / "out_auto_none"
    with caplog.at_level("WARNING"):
        summary = predict(_cfg(f"ckpt={ckpt}", f"input={images / 'top.png'}", "mode=auto", f"out={out}",
                               "auto.points_per_side=3", "auto.pred_iou_thresh=1.5", *PLAIN_AUTO))
    assert summary["masks"] == 0
    marker = json.loads((out / "predict_run.json").read_text())
    f = marker["filters"]
    assert f["candidates"] == 3 * 9 and f["passed_pred_iou"] == 0 and f["best_pred_iou"] < 1.5
    why = marker["why_no_masks"]
    assert "auto.pred_iou_thresh=1.5" in why and f"best seen {f['best_pred_iou']}" in why
    assert why in caplog.text


def test_auto_mode_counts_its_filters_and_keeps_what_segment_anything_keeps(setup):
    """The counting generator keeps exactly the masks of segment_anything's own, with and without crop layers;
    a crop layer where no mask survives does not stop the run (segment_anything fails on it)."""
    from segment_anything import SamAutomaticMaskGenerator

    from samtune.data.io import load_image
    from samtune.predict.auto import build_mask_generator, generate_masks

    tmp, images, ckpt, _ = setup
    model = build_model("sam_tiny", checkpoint=str(ckpt))
    image = load_image(images / "top.png")
    for params in ({"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.5},
                   {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "crop_n_layers": 1}):
        ours = build_mask_generator(model, params)
        theirs = SamAutomaticMaskGenerator(model.sam, output_mode="coco_rle", **params)
        mine, ref = generate_masks(ours, image), generate_masks(theirs, image)
        assert [m["segmentation"]["counts"] for m in mine] == [m["segmentation"]["counts"] for m in ref]
        stats = ours.stats.as_dict()
        crops = 1 + 4 * params.get("crop_n_layers", 0)
        assert stats["candidates"] == 3 * 16 * crops and stats["passed_pred_iou"] == stats["candidates"]
        assert len(mine) <= stats["passed_both"] <= stats["candidates"]
    nothing = build_mask_generator(model, {"points_per_side": 4, "pred_iou_thresh": 1.5, "crop_n_layers": 1})
    assert generate_masks(nothing, image) == [] and nothing.stats.as_dict()["passed_pred_iou"] == 0


def test_zoomed_auto_masks_find_objects_the_whole_image_misses():
    """The shipped model on small discs: segment_anything's generator on the whole image keeps none of them at the
    model's thresholds (model.auto); each candidate segmented again in 2x zoom finds every disc (one-to-one at
    IoU >= 0.5), and the filters count the zoomed answers."""
    from samtune.evaluation.matching import match_to_ground_truth
    from samtune.predict.auto import (
        ZoomedMaskGenerator,
        build_mask_generator,
        encode_masks,
        explain_no_masks,
        filter_stats,
        generate_masks,
    )

    model = build_model("sam_tiny", checkpoint=str(ROOT / "data" / "checkpoints" / "sam_tiny_generalist.pt"))
    image, instances = small_discs()
    gt = encode_masks(instances == i for i in range(1, 9))
    params = {"points_per_side": 6, "pred_iou_thresh": 0.5, "stability_score_thresh": 0.8}
    plain = generate_masks(build_mask_generator(model, params), image)
    assert match_to_ground_truth([m["segmentation"] for m in plain], gt).true_positives == 0
    zoomed = build_mask_generator(model, {**params, "zoom": 2.0})
    assert isinstance(zoomed, ZoomedMaskGenerator)
    masks = generate_masks(zoomed, image)
    match = match_to_ground_truth([m["segmentation"] for m in masks], gt)
    assert match.true_positives == 8 and match.best_iou.mean() >= 0.7
    assert [m["area"] for m in masks] == sorted((m["area"] for m in masks), reverse=True)
    for m in masks:
        assert m["predicted_iou"] > 0.5 and m["stability_score"] >= 0.8 and m["area"] > 0
        x0, y0, x1, y1 = m["crop_box"]
        assert 0 <= x0 < x1 <= 192 and 0 <= y0 < y1 <= 192
    stats = filter_stats(zoomed)
    assert stats["passed_both"] >= len(masks) and stats["candidates"] <= stats["candidates_grid"]["candidates"]
    # nothing reaches the thresholds: the reason names them, with the zoomed answers' best scores
    none = build_mask_generator(model, {**params, "zoom": 2.0, "pred_iou_thresh": 1.5})
    assert generate_masks(none, image) == []
    why = explain_no_masks(none, "auto")
    assert "auto.pred_iou_thresh=1.5" in why and "2x zoom" in why
    # no candidate at all: the candidate thresholds are named
    no_candidates = build_mask_generator(model, {**params, "zoom": 2.0, "candidate_pred_iou_thresh": 1.5})
    assert generate_masks(no_candidates, image) == []
    assert "auto.candidate_pred_iou_thresh=1.5" in explain_no_masks(no_candidates, "auto")


def test_auto_parameters_are_checked_and_follow_the_model():
    """zoom must be a number >= 1 and unknown keys are named; sam_tiny's config zooms with its own thresholds,
    the official models keep SAM's generator and values."""
    from samtune.predict.auto import build_mask_generator

    model = build_model("sam_tiny", seed=0)
    with pytest.raises(ValueError, match="zoom must be null or a number >= 1"):
        build_mask_generator(model, {"zoom": 0.5})
    with pytest.raises(ValueError, match=r"unknown parameters \['points_per_sid'\]"):
        build_mask_generator(model, {"points_per_sid": 4})
    tiny = _cfg().auto
    assert tiny.zoom == 2.0 and tiny.crop_n_layers == 2 and tiny.pred_iou_thresh < 0.88
    official = _cfg("model=vit_b").auto
    assert official.zoom is None and official.crop_n_layers == 0
    assert (official.pred_iou_thresh, official.stability_score_thresh, official.points_per_side) == (0.88, 0.95, 32)
