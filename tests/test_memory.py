"""Crops per encoder call: derived from the model's encoder and a memory budget; batching never changes a mask."""

from __future__ import annotations

import dataclasses
import functools
import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from samtune.data.records import load_record
from samtune.data.sources import build_records
from samtune.evaluation.evaluator import evaluate_model
from samtune.inference.segment import MaskPrediction, segment_prompts
from samtune.model import ARCHITECTURES, PromptableSam, build_model, build_sam_from_arch, memory
from samtune.model.memory import MAX_CROPS, crop_bytes, crops_per_call, encoder_activation_bytes
from samtune.predict.zoom import ZoomConfig, decode_prompts_zoomed, zoom_config
from samtune.prompts import make_instance_prompts
from tests.blob_data import write_blob_dataset

GB = 1e9


@functools.cache
def shell(name: str, **arch) -> PromptableSam:
    """The model's modules without weights (meta tensors): its estimate, no memory, no forward pass."""
    spec = dataclasses.replace(ARCHITECTURES[name], **arch)
    with torch.device("meta"):
        return PromptableSam(build_sam_from_arch(spec))


def test_activation_estimate_follows_the_model_not_its_name():
    est = {n: encoder_activation_bytes(shell(n).sam.image_encoder) for n in ("sam_tiny", "vit_b", "vit_l", "vit_h")}
    # vit_b at 1024 px: a global block's 12 x 4096^2 float32 map (0.81 GB) held three times, with token tensors
    assert 2.4 * GB < est["vit_b"] < 3.0 * GB
    assert est["sam_tiny"] < 0.01 * GB
    # vit_l and vit_h: 16 heads on the same grid; vit_h is wider, its peak barely more (the maps dominate)
    assert est["vit_b"] < est["vit_l"] < est["vit_h"] < 1.05 * est["vit_l"]
    # from the modules: the input size (tokens^2 in the global maps), the heads, the windows
    assert encoder_activation_bytes(shell("vit_b", img_size=512).sam.image_encoder) < est["vit_b"] / 8
    assert encoder_activation_bytes(shell("vit_b", encoder_num_heads=24).sam.image_encoder) > 1.8 * est["vit_b"]
    windowed = shell("vit_b", encoder_global_attn_indexes=()).sam.image_encoder
    assert encoder_activation_bytes(windowed) < est["vit_b"] / 5
    # depth: without autograd the blocks run one at a time (the peak is one block's); with it they add up
    deep = shell("vit_b", encoder_depth=24, encoder_global_attn_indexes=(2, 5, 8, 11, 17, 23)).sam.image_encoder
    assert encoder_activation_bytes(deep) == est["vit_b"]
    vit_b = shell("vit_b").sam.image_encoder
    assert encoder_activation_bytes(deep, grad=True) > 1.4 * encoder_activation_bytes(vit_b, grad=True) > 3 * est["vit_b"]


@pytest.mark.parametrize(("name", "budget_gb", "expected"), [
    ("vit_b", 1, 1),  # less than one crop's worth: still one
    ("vit_b", 6, 2),
    ("vit_b", 8, 3),
    ("vit_b", 1000, MAX_CROPS),
    ("vit_l", 8, 2),
    ("vit_h", 8, 2),
    ("sam_tiny", 0.05, 5),
    ("sam_tiny", 1, MAX_CROPS),  # sam_tiny keeps the 16 crops per call it always had
])
def test_crops_per_call_follow_the_model_and_the_budget(name, budget_gb, expected):
    assert crops_per_call(shell(name), (520, 348), budget_gb) == expected


def test_crops_per_call_count_the_masks_at_the_image_size():
    small, large = crop_bytes(shell("sam_tiny"), (256, 256)), crop_bytes(shell("sam_tiny"), (4000, 4000))
    assert large - small == memory.MASK_BYTES_PER_PIXEL * (4000 * 4000 - 256 * 256)
    assert crops_per_call(shell("sam_tiny"), (4000, 4000), 0.5) < crops_per_call(shell("sam_tiny"), (256, 256), 0.5)


def test_without_a_budget_the_device_says_how_much(monkeypatch):
    """CPU: a quarter of psutil's available RAM; CUDA: 70% of mem_get_info's free memory plus the allocator's unused
    reserve."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=24 * GB))
    assert memory.available_bytes("cpu") == int(6 * GB)
    assert crops_per_call(shell("vit_b"), (520, 348)) == 2
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=2 * GB))
    assert crops_per_call(shell("vit_b"), (520, 348)) == 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(70 * GB), int(80 * GB)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(12 * GB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(2 * GB))
    assert memory.available_bytes(torch.device("cuda", 0)) == int(0.7 * 80 * GB)


def test_the_budget_is_a_config_key():
    assert zoom_config(OmegaConf.create({"zoom": 2.0, "memory_budget_gb": 6})).memory_budget_gb == 6
    assert zoom_config(OmegaConf.create({"zoom": 2.0})).memory_budget_gb is None
    mapping = {"zoom": {"context": 2.0}, "memory_budget_gb": 3}
    assert zoom_config(OmegaConf.create(mapping)).memory_budget_gb == 3
    mapping["zoom"]["memory_budget_gb"] = 4  # the zoom mapping's own wins
    assert zoom_config(OmegaConf.create(mapping)).memory_budget_gb == 4
    for bad in (0, -1, True, "8"):
        with pytest.raises(ValueError, match="eval.memory_budget_gb"):
            ZoomConfig(memory_budget_gb=bad)
    for yaml in ("configs/train.yaml", "configs/predict.yaml"):
        cfg = OmegaConf.load(yaml)
        assert (cfg.eval if "eval" in cfg else cfg).memory_budget_gb is None


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """The shipped generalist and one 96 x 128 image with 7 prompts (boxes and one point)."""
    rng = np.random.default_rng(3)
    image = rng.integers(20, 60, (96, 128, 3), dtype=np.uint8)
    instances = np.zeros((96, 128), np.int32)
    for k in range(7):
        y, x = 8 + 26 * (k // 4), 8 + 30 * (k % 4)
        instances[y : y + 14 + k, x : x + 12 + k] = k + 1
        image[instances == k + 1] = rng.integers(120, 255, 3)
    return build_model("sam_tiny").eval(), image, make_instance_prompts(instances, seed=0, key="a")


@pytest.mark.parametrize(("mode", "refine"), [("box", 0), ("point1", 1)])
def test_crops_per_call_change_batching_only(crowded, monkeypatch, mode, refine, one_thread):
    """The same masks, IoU and stability one crop at a time, 3 at a time, or all 7 in one call (sam_tiny)."""
    model, image, prompts = crowded
    cfg = ZoomConfig(refine=refine)
    calls = []
    embed = model.embed
    monkeypatch.setattr(model, "embed", lambda x: calls.append(len(x)) or embed(x))
    runs = {}
    for chunk in (1, 3, 7):
        preds = list(decode_prompts_zoomed(model, image, prompts, mode, multimask=mode != "box", cfg=cfg, chunk=chunk))
        runs[chunk] = [torch.cat([getattr(p, f) for p in preds]) for f in ("masks", "pred_iou", "stability")]
        assert max(calls) == chunk  # crops per call (and one whole-image call for points with whole_first)
        calls.clear()
    assert runs[1][0].any()
    for chunk in (3, 7):
        for ours, one in zip(runs[chunk], runs[1], strict=True):
            assert torch.equal(ours, one)


def test_the_budget_sets_the_crops_per_encoder_call(crowded, monkeypatch, one_thread):
    model, image, prompts = crowded
    calls = []
    embed = model.embed
    monkeypatch.setattr(model, "embed", lambda x: calls.append(len(x)) or embed(x))
    budget = 2.5 * crop_bytes(model, image.shape[:2]) / GB  # two crops' worth
    list(decode_prompts_zoomed(model, image, prompts, "box", multimask=False, cfg=ZoomConfig(memory_budget_gb=budget)))
    assert calls == [2, 2, 2, 1]
    calls.clear()
    segment_prompts(model, image, [{"box": p["box"]} for p in prompts], "box", zoom=ZoomConfig(memory_budget_gb=budget))
    assert calls == [2, 2, 2, 1]


def test_evaluation_is_the_same_for_any_budget(tmp_path, one_thread):
    """evaluate_model (and so zoomed validation and the data engine's evaluations) with one crop per call gives the
    rows of 16 per call."""
    records, _ = build_records("folder", write_blob_dataset(tmp_path / "blobs", {"test": 2}, size=(96, 128)), "test")
    model = build_model("sam_tiny")
    prompts = {r.rel_path: make_instance_prompts(load_record(r)[1], seed=0, key=r.rel_path) for r in records}
    rows = {}
    for budget in (1e-9, 100.0):
        result = evaluate_model(model, records, prompts, name="x", modes=["box", "point1", "point1_oracle"],
                                zoom=ZoomConfig(memory_budget_gb=budget, refine=1), save_masks=True)
        rows[budget] = result.rows
    assert rows[1e-9] == rows[100.0]


def test_predictions_are_kept_as_rle():
    mask = np.zeros((40, 50), bool)
    mask[5:9, 10:30] = True
    pred = MaskPrediction.from_mask(mask, 0.9, 0.8, {"box": [10, 5, 29, 8]}, 0)
    assert isinstance(pred.rle["counts"], str)
    assert np.array_equal(pred.mask, mask) and pred.area == 80 and pred.bbox == [10, 5, 20, 4]
    assert MaskPrediction.from_mask(np.zeros((4, 4), bool), 0.1, 0.1, {}).bbox == [0, 0, 0, 0]


def test_automatic_masks_come_as_the_rles_encoded_before(crowded, one_thread):
    """build_mask_generator returns COCO RLE (no full-size mask per generated mask): the RLEs that encoding its
    former binary masks gave."""
    from segment_anything import SamAutomaticMaskGenerator

    from samtune.predict.auto import build_mask_generator, encode_masks, generate_masks

    model, image, _ = crowded
    params = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    rles = [m["segmentation"] for m in generate_masks(build_mask_generator(model, params), image)]
    binary = generate_masks(SamAutomaticMaskGenerator(model.sam, output_mode="binary_mask", **params), image)
    assert rles and rles == encode_masks(m["segmentation"] for m in binary)
