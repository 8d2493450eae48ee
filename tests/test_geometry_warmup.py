"""Prompt-geometry warm-up (first stage of the sam_tiny generalist) and the BCE + dice loss it uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from samtune.losses import SamLoss
from samtune.model.build import build_seeded_sam, resolve_arch
from samtune.model.factory import build_model
from samtune.training.geometry_warmup import geometry_warmup, sample_box_targets, sample_point_targets

ROOT = Path(__file__).resolve().parents[1]


def test_box_targets_fill_their_boxes():
    gen = torch.Generator().manual_seed(0)
    boxes, masks = sample_box_targets(64, 256, 64, gen)
    assert boxes.shape == (64, 4) and masks.shape == (64, 64, 64)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 256 + 1e-4).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 256**2
    assert torch.allclose(masks.mean((1, 2)), area, atol=0.05)
    ys, xs = torch.nonzero(masks[0], as_tuple=True)  # every mask pixel centre lies inside the box
    assert (xs * 4 + 2 >= boxes[0, 0]).all() and (xs * 4 + 2 <= boxes[0, 2]).all()
    assert (ys * 4 + 2 >= boxes[0, 1]).all() and (ys * 4 + 2 <= boxes[0, 3]).all()


def test_point_targets_are_discs_around_the_point():
    gen = torch.Generator().manual_seed(1)
    points, masks = sample_point_targets(16, 256, 64, gen)
    for p, m in zip(points, masks):
        cell = (p / 4).long().clamp(max=63)
        assert m[cell[1], cell[0]] == 1  # the prompted pixel is inside its disc
        assert 0 < m.mean() < 0.8


def test_warmup_trains_prompt_encoder_and_decoder_only():
    sam = build_seeded_sam(resolve_arch("sam_tiny"), 0)
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    stats = geometry_warmup(sam, steps=4, prompts_per_step=3, seed=0, log_every=2)
    after = sam.state_dict()
    assert stats.steps == 4 and 0 <= stats.box_iou <= 1 and 0 <= stats.point_iou <= 1
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("image_encoder."))
    assert not torch.equal(before["mask_decoder.output_upscaling.0.weight"], after["mask_decoder.output_upscaling.0.weight"])
    assert not torch.equal(before["prompt_encoder.point_embeddings.2.weight"], after["prompt_encoder.point_embeddings.2.weight"])


def test_warmup_is_deterministic_and_rejects_bad_arguments():
    a, b = (build_seeded_sam(resolve_arch("sam_tiny"), 0) for _ in range(2))
    geometry_warmup(a, steps=2, prompts_per_step=2, seed=3)
    geometry_warmup(b, steps=2, prompts_per_step=2, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="prompts_per_step"):
        geometry_warmup(a, steps=2, prompts_per_step=0)


def test_bce_dice_loss_is_bce_plus_dice():
    torch.manual_seed(0)
    logits, iou = torch.randn(3, 4, 8, 8), torch.rand(3, 4)
    target = torch.rand(3, 8, 8) > 0.7
    out = SamLoss(focal_weight=1.0, dice_weight=1.0, iou_weight=0.0, focal_alpha=-1.0, focal_gamma=0.0)(
        logits, iou, target, multimask=False)
    bce = F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none").mean((1, 2))
    assert torch.allclose(out.focal, bce, atol=1e-6)
    assert torch.allclose(out.loss, out.focal + out.dice, atol=1e-6)


def test_script_writes_a_loadable_state_dict_and_keeps_existing_files(tmp_path):
    out = tmp_path / "warm.pth"
    cmd = [sys.executable, str(ROOT / "scripts" / "warmup_geometry.py"), f"out={out}", "steps=2", "prompts=2"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    model = build_model("sam_tiny", checkpoint=out)  # strict: segment_anything's keys and shapes
    assert model.sam.image_encoder.pos_embed.shape[1] == 16
    mtime = out.stat().st_mtime_ns
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and "overwrite=true" in res.stderr and out.stat().st_mtime_ns == mtime
