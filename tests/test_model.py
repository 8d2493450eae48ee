"""Model building, architecture inference and checkpoint errors."""

from __future__ import annotations

import pytest
import torch

from samtune.model import (
    ARCHITECTURES,
    CheckpointError,
    build_model,
    build_sam_from_arch,
    infer_arch,
    save_sam_weights,
)
from samtune.model.checkpoint import check_state_dict, read_state_dict


def meta_sam(name: str):
    with torch.device("meta"):
        return build_sam_from_arch(ARCHITECTURES[name])


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_infer_arch_recovers_every_registered_architecture(name):
    state = meta_sam(name).state_dict()
    assert infer_arch(state) == ARCHITECTURES[name]


def test_official_vit_b_key_layout():
    # The official vit_b checkpoint has exactly these prefixes and no pixel_mean/std (non-persistent buffers).
    keys = meta_sam("vit_b").state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert "image_encoder.blocks.11.attn.rel_pos_h" in keys


def test_wrong_checkpoint_names_the_model_it_belongs_to(tmp_path):
    tiny = build_model("sam_tiny", seed=1)
    path = save_sam_weights(tiny.sam, tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match=r"does not fit model=vit_b.*looks like a `sam_tiny` checkpoint"):
        check_state_dict(meta_sam("vit_b"), read_state_dict(path), source=str(path), model_type="vit_b")


def test_vit_l_weights_for_vit_b_model_are_recognised():
    state = meta_sam("vit_l").state_dict()
    with pytest.raises(CheckpointError, match=r"shape mismatches.*use model=vit_l"):
        check_state_dict(meta_sam("vit_b"), state, source="x.pth", model_type="vit_b")


def test_foreign_state_dict_is_reported(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match="does not look like a SAM checkpoint"):
        build_model("sam_tiny", checkpoint=path)


def test_missing_checkpoint_says_where_official_weights_are(tmp_path):
    with pytest.raises(CheckpointError, match=r"file not found.*segment-anything.*sam_vit_b_01ec64.pth"):
        build_model("sam_tiny", checkpoint=tmp_path / "nope.pth")


def test_unreadable_checkpoint(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        build_model("sam_tiny", checkpoint=path)


def test_round_trip_and_lightning_checkpoint(tmp_path):
    a = build_model("sam_tiny", seed=3)
    path = save_sam_weights(a.sam, tmp_path / "w.pth", half=True)
    b = build_model("sam_tiny", checkpoint=path)
    for (k, va), vb in zip(a.sam.state_dict().items(), b.sam.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-3, rtol=1e-3), k
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.sam.{k}": v for k, v in a.sam.state_dict().items()}, "epoch": 1}, ckpt)
    c = build_model("sam_tiny", checkpoint=ckpt)
    assert all(torch.equal(x, y) for x, y in zip(a.sam.state_dict().values(), c.sam.state_dict().values()))


def test_bad_arch_override_names_the_key():
    with pytest.raises(ValueError, match=r"model.arch.width"):
        build_model("sam_tiny", arch={"width": 3})
    with pytest.raises(ValueError, match=r"model.type='vit_x'"):
        build_model("vit_x")
