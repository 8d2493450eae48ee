"""`python train.py ... finetune=lora|full` end to end, on a tiny generated dataset."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from samtune.model import build_model
from samtune.model.training_checkpoint import META_KEY
from tests.test_export import export_script
from tests.test_train_e2e import run, tiny_args

FAST = ["data.generator_params.n_train=2", "data.generator_params.n_val=1", "data.generator_params.n_test=1",
        "data.max_instances=2", "trainer.limit_train_batches=1", "eval.modes=[box]", "eval.overlays=0"]


def train_tiny(tmp_path: Path, *overrides: str) -> Path:
    run_dir = tmp_path / "run"
    run(tiny_args(tmp_path, run_dir, *FAST, *overrides))
    report = json.loads((run_dir / "report.json").read_text())
    assert 0.0 <= report["finetuned"]["box"]["miou"] <= 1.0 and report["finetuned"]["box"]["n"] > 0
    return run_dir


def test_lora_run_saves_adapters_only_and_merged_weights(tmp_path):
    run_dir = train_tiny(tmp_path, "finetune=lora", "finetune.lora.rank=2", "finetune.lora.target_modules=[qkv,proj]")
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = list(last["state_dict"])
    assert keys and all(".lora_" in k or k.startswith("model.sam.mask_decoder.") for k in keys)
    assert last[META_KEY]["finetune"]["lora"]["rank"] == 2
    finetuned = run_dir / "checkpoints" / "finetuned_sam.pth"
    plain = torch.load(finetuned, map_location="cpu", weights_only=True)
    assert not any("lora" in k or "base_layer" in k for k in plain)
    model = build_model("sam_tiny", checkpoint=finetuned)  # strict: exactly SAM's keys and shapes
    # The evaluated (best) checkpoint, exported from the run directory, is finetuned_sam.pth.
    out = tmp_path / "exported.pth"
    assert export_script.main([f"ckpt={run_dir}", f"out={out}"]) == 0
    exported = torch.load(out, map_location="cpu", weights_only=True)
    assert all(torch.equal(exported[k], v) for k, v in model.sam.state_dict().items())


def test_full_run(tmp_path):
    # Gradient checkpointing is off to keep the test fast (tests/test_finetune_modes.py checks it).
    run_dir = train_tiny(tmp_path, "finetune=full", "finetune.encoder_lr_mult=0.5", "finetune.layer_decay=0.8",
                         "finetune.gradient_checkpointing=false")
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any(k.startswith("model.sam.image_encoder.") for k in last["state_dict"])
    assert last[META_KEY]["base_fingerprint"] == {}  # everything trains: nothing left out
    build_model("sam_tiny", checkpoint=run_dir / "checkpoints" / "finetuned_sam.pth")
    build_model("sam_tiny", checkpoint=run_dir / "checkpoints" / "last.ckpt")


def test_iou_head_run_keeps_every_mask_and_exports(tmp_path):
    head = "mask_decoder.iou_prediction_head"
    run_dir = train_tiny(tmp_path, "finetune=iou_head", f"finetune.reinit=[{head}]", "optimizer.lr=1e-3")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["finetuned"]["box"]["miou"] == report["zero_shot"]["box"]["miou"]  # box: output 0, same masks
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["state_dict"] and all(k.startswith(f"model.sam.{head}.") for k in last["state_dict"])
    start = OmegaConf.load(run_dir / "config_resolved.yaml").model.checkpoint
    base = build_model("sam_tiny", checkpoint=start).sam.state_dict()
    tuned = build_model("sam_tiny", checkpoint=run_dir / "checkpoints" / "finetuned_sam.pth").sam.state_dict()
    for key, value in tuned.items():
        assert torch.equal(value, base[key]) == (not key.startswith(head + ".")), key
