"""finetune=decoder_only|lora|full: LoRA, param groups, gradient checkpointing, partial checkpoints."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from samtune.losses import SamLoss
from samtune.model import ARCHITECTURES, CheckpointError, build_model, build_sam_from_arch, save_sam_weights
from samtune.model.lora import LoraSettings, apply_lora, has_lora, merge_lora, plain_state_dict
from samtune.model.training_checkpoint import META_KEY
from samtune.prompts import PromptPolicy, PromptSimulator
from samtune.training.module import SamTuneModule

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")

DEPTH = ARCHITECTURES["sam_tiny"].encoder_depth
LR, WD = 1e-3, 0.01


def images(n: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 256, 256, generator=torch.Generator().manual_seed(seed))


def make_module(mode: str, *, seed: int = 0, base: str | None = None, **kwargs) -> SamTuneModule:
    model = build_model("sam_tiny", seed=seed, checkpoint=base)
    meta = {"model_type": "sam_tiny", "arch": {}, "seed": seed, "base_checkpoint": base}
    return SamTuneModule(
        model, simulator=PromptSimulator(PromptPolicy(correction_rounds=1, mask_only_rounds=0)), loss=SamLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=LR, weight_decay=WD), mode=mode,
        checkpoint_meta=meta, **kwargs,
    )


def tiny_batch() -> dict:
    masks = torch.zeros(1, 2, 256, 256, dtype=torch.bool)
    masks[0, 0, 40:120, 30:100] = True
    masks[0, 1, 150:220, 140:230] = True
    return {"image": images(), "masks": masks, "valid": torch.ones(1, 2, dtype=torch.bool),
            "input_size": torch.tensor([[256, 256]]), "original_size": torch.tensor([[256, 256]])}


def perturb_lora(sam, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def save_like_lightning(module: SamTuneModule, path) -> dict:
    checkpoint = {"state_dict": module.state_dict(), "epoch": 0}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return checkpoint


# ---------------------------------------------------------------------------------------------- LoRA
def test_zero_initialised_lora_gives_exactly_the_base_outputs():
    model = build_model("sam_tiny", seed=0).eval()
    x = images()
    with torch.no_grad():
        before = model.embed(x)
    apply_lora(model.sam, {"rank": 4, "blocks": "all", "target_modules": ["qkv", "proj"]})
    assert has_lora(model.sam)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.sam.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        after = model.embed(x)
    assert torch.equal(before, after)


def test_lora_targets_only_the_chosen_blocks_and_freezes_the_base():
    sam = build_model("sam_tiny", seed=0).sam
    apply_lora(sam, {"rank": 2, "blocks": [1, 4], "target_modules": ["qkv"]})
    trainable = sorted(n for n, p in sam.image_encoder.named_parameters() if p.requires_grad)
    assert trainable == [f"blocks.{i}.attn.qkv.lora_{m}.default.weight" for i in (1, 4) for m in "AB"]
    assert not has_lora(sam.image_encoder.blocks[0])


@pytest.mark.parametrize(
    ("cfg", "match"),
    [({"blocks": [9]}, r"finetune.lora.blocks \[9\] outside 0..5"), ({"target_modules": ["mlp"]}, "target_modules"),
     ({"rank": 0}, "rank"), ({"ranks": 4}, "unknown keys"), ({"blocks": "last"}, "blocks")],
)
def test_lora_settings_errors_name_the_key(cfg, match):
    with pytest.raises(ValueError, match=match):
        apply_lora(build_model("sam_tiny").sam, cfg)


def test_merge_gives_official_keys_and_the_adapted_outputs():
    model = build_model("sam_tiny", seed=0).eval()
    official = list(model.sam.state_dict())
    apply_lora(model.sam, LoraSettings(rank=4, target_modules=("qkv", "proj")))
    perturb_lora(model.sam)
    x = images()
    with torch.no_grad():
        adapted = model.embed(x)
    plain = plain_state_dict(model.sam)
    assert list(plain) == official
    merge_lora(model.sam)
    assert not has_lora(model.sam) and list(model.sam.state_dict()) == official
    assert all(torch.equal(plain[k], v) for k, v in model.sam.state_dict().items())
    with torch.no_grad():
        merged = model.embed(x)
    assert not torch.equal(adapted, build_model("sam_tiny", seed=0).eval().embed(x).detach())
    assert torch.allclose(adapted, merged, atol=1e-5)


def test_vit_b_with_lora_still_saves_the_official_layout():
    with torch.device("meta"):
        sam = build_sam_from_arch(ARCHITECTURES["vit_b"])
    official = list(sam.state_dict())
    apply_lora(sam, {"target_modules": ["qkv", "proj"]})
    assert list(plain_state_dict(sam)) == official


def test_lora_forward_and_backward_under_cpu_bf16_autocast():
    module = make_module("lora", lora={"rank": 4}, gradient_checkpointing=True)
    perturb_lora(module.model.sam)
    x = images()
    with torch.no_grad():
        ref = module.model.embed(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module.model.embed(x)
    # The ViT's matmuls ran in bf16 (close to, but not equal to, fp32); SAM's LayerNorm2d neck returns fp32.
    assert torch.isfinite(out).all() and not torch.equal(out.float(), ref)
    assert torch.allclose(out.float(), ref, atol=0.1 * float(ref.abs().max()))
    out.float().square().mean().backward()
    grads = [p.grad for n, p in module.named_parameters() if "lora_" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------- modes, grads
@pytest.mark.parametrize("mode", ["decoder_only", "lora", "full"])
def test_frozen_parameters_get_no_gradient(mode):
    module = make_module(mode, lora={"rank": 2, "dropout": 0.0} if mode == "lora" else None)
    module.train()
    loss = module.training_step(tiny_batch(), 0)
    loss.backward()
    for name, p in module.named_parameters():
        if p.requires_grad:
            continue
        assert p.grad is None, name
    trained = {n.split(".")[2] for n, p in module.named_parameters() if p.grad is not None}
    assert trained == ({"mask_decoder"} if mode == "decoder_only" else {"image_encoder", "mask_decoder"})
    if mode == "lora":
        enc = {n for n, p in module.model.sam.image_encoder.named_parameters() if p.grad is not None}
        assert enc and all(".lora_" in n for n in enc)


def test_only_trains_the_iou_head_and_leaves_every_mask_as_it_was(tmp_path):
    module = make_module("decoder_only", only=["mask_decoder.iou_prediction_head"])
    trainable = {n for n, p in module.model.sam.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mask_decoder.iou_prediction_head.") for n in trainable)
    model = module.model.eval()
    boxes = torch.tensor([[[30.0, 40.0, 100.0, 120.0]], [[140.0, 150.0, 230.0, 220.0]]])
    with torch.no_grad():
        emb = model.embed(images())
        before = [model.decode(emb, boxes=b) for b in boxes]
    optimizer = module.configure_optimizers()
    module.train()
    for step in range(3):
        module.training_step(tiny_batch(), step).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = [model.eval().decode(emb, boxes=b) for b in boxes]
    for (logits0, iou0), (logits1, iou1) in zip(before, after):
        assert torch.equal(logits0, logits1)
        assert not torch.equal(iou0, iou1)
    ckpt = save_like_lightning(module, tmp_path / "last.ckpt")
    assert ckpt["state_dict"] and all(k.startswith("model.sam.mask_decoder.iou_prediction_head.")
                                      for k in ckpt["state_dict"])
    with pytest.raises(ValueError, match="finetune.only: 'mask_decoder.iou_head' matches no parameter"):
        make_module("decoder_only", only=["mask_decoder.iou_head"])
    with pytest.raises(ValueError, match="finetune.only: 'image_encoder' matches no parameter"):
        make_module("decoder_only", only=["image_encoder"])


def test_reinit_gives_fresh_seeded_weights_only_to_the_named_part():
    head = "mask_decoder.iou_prediction_head"
    base = make_module("decoder_only").model.sam.state_dict()
    a = make_module("decoder_only", only=[head], reinit=[head]).model.sam.state_dict()
    b = make_module("decoder_only", only=[head], reinit=[head]).model.sam.state_dict()
    for key in base:
        assert torch.equal(a[key], b[key]), key
        assert torch.equal(a[key], base[key]) == (not key.startswith(head + ".")), key
    with pytest.raises(ValueError, match="finetune.reinit: 'mask_decoder.iou_head' is not a submodule"):
        make_module("decoder_only", reinit=["mask_decoder.iou_head"])
    with pytest.raises(ValueError, match="would be re-initialised but not trained"):
        make_module("decoder_only", reinit=["prompt_encoder.point_embeddings"])


def test_every_mode_object_says_what_the_module_does_to_the_encoder():
    from samtune.training.finetune_modes import MODES, finetune_mode

    assert finetune_mode(None) is MODES["decoder_only"]
    for name, kind in MODES.items():
        module = make_module(name, lora={"rank": 2} if kind.uses_adapters else None)
        encoder = dict(module.model.sam.image_encoder.named_parameters())
        base = [p for n, p in encoder.items() if ".lora_" not in n]
        assert any(p.requires_grad for p in encoder.values()) == (not kind.encoder_frozen), name
        assert all(p.requires_grad for p in base) == kind.encoder_weights_train, name
        assert (module.lora is not None) == kind.uses_adapters and module.finetune_mode is kind


def test_mode_errors():
    with pytest.raises(ValueError, match="finetune.mode='partial'"):
        make_module("partial")
    with pytest.raises(ValueError, match="contradicts finetune.mode=decoder_only"):
        make_module("decoder_only", train_image_encoder=True)
    with pytest.raises(ValueError, match="use finetune=lora"):
        make_module("full", lora={"rank": 2})


def test_full_mode_param_groups_layer_decay_and_no_weight_decay():
    module = make_module("full", train_prompt_encoder=True, encoder_lr_mult=0.5, layer_decay=0.8, iou_head_lr_mult=3.0)
    optimizer = module.configure_optimizers()
    by_param = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            by_param[id(p)] = group
    seen = 0
    for name, p in module.model.sam.named_parameters():
        group = by_param[id(p)]
        seen += 1
        if name.startswith("image_encoder.blocks."):
            i = int(name.split(".")[2])
            expected = LR * 0.5 * 0.8 ** (DEPTH - i)
        elif name.startswith(("image_encoder.patch_embed", "image_encoder.pos_embed")):
            expected = LR * 0.5 * 0.8 ** (DEPTH + 1)
        elif name.startswith("image_encoder.neck"):
            expected = LR * 0.5 * 0.8
        elif name.startswith("mask_decoder.iou_prediction_head."):
            expected = LR * 3.0
        else:
            expected = LR
        assert math.isclose(group["lr"], expected, rel_tol=1e-9), name
        no_decay = p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or ".rel_pos_" in name
        assert group["weight_decay"] == (0.0 if no_decay else WD), name
    assert seen == sum(1 for _ in module.model.sam.parameters())
    assert len({id(p) for g in optimizer.param_groups for p in g["params"]}) == seen


def test_decoder_only_optimizer_holds_only_the_decoder():
    optimizer = make_module("decoder_only").configure_optimizers()
    names = {g["name"] for g in optimizer.param_groups}
    assert names == {"mask_decoder", "mask_decoder.no_wd"}  # the layout runs saved before resume from
    assert all(g["lr"] == LR for g in optimizer.param_groups)
    optimizer = make_module("decoder_only", iou_head_lr_mult=10.0).configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"mask_decoder": LR, "mask_decoder.no_wd": LR, "mask_decoder.iou_prediction_head": 10 * LR,
                   "mask_decoder.iou_prediction_head.no_wd": 10 * LR}
    with pytest.raises(ValueError, match="finetune.iou_head_lr_mult must be > 0"):
        make_module("decoder_only", iou_head_lr_mult=0).configure_optimizers()


def test_resuming_an_optimizer_state_of_other_param_groups_is_refused_with_the_setting_named():
    saved = {"optimizer_states": [make_module("decoder_only", iou_head_lr_mult=10.0).configure_optimizers().state_dict()]}
    make_module("decoder_only", iou_head_lr_mult=3.0).check_optimizer_layout(saved)  # same groups, other rate: fine
    with pytest.raises(ValueError, match=r"only in the checkpoint: \['mask_decoder.iou_prediction_head'.*"
                                         r"saved with finetune.iou_head_lr_mult=10, this run uses 1 .*resume with finetune.iou_head_lr_mult=10"):
        make_module("decoder_only").check_optimizer_layout(saved)
    with pytest.raises(ValueError, match=r"only in this run: \['image_encoder"):
        make_module("full", iou_head_lr_mult=10.0).check_optimizer_layout(saved)
    make_module("decoder_only").check_optimizer_layout({"state_dict": {}})  # weights only: nothing to check


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_outputs_and_grads(mode):
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)  # peft draws lora_A from the global generator
        module = make_module(mode, lora={"rank": 4, "dropout": 0.1} if mode == "lora" else None,
                             gradient_checkpointing=ckpt)
        if mode == "lora":
            perturb_lora(module.model.sam)
        module.train()
        assert module.model.gradient_checkpointing is ckpt
        torch.manual_seed(0)
        out = module.model.embed(images())
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in module.model.sam.image_encoder.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, atol=1e-6)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-6, rtol=1e-5), name


# --------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_leave_frozen_weights_out_and_load_back(tmp_path):
    module = make_module("decoder_only", seed=3)
    with torch.no_grad():
        for p in module.model.sam.mask_decoder.parameters():
            p.add_(0.01)
    ckpt = save_like_lightning(module, tmp_path / "last.ckpt")
    assert ckpt["state_dict"] and all(k.startswith("model.sam.mask_decoder.") for k in ckpt["state_dict"])
    assert ckpt[META_KEY]["finetune"] == {"mode": "decoder_only"}
    resumed = make_module("decoder_only", seed=3)
    resumed.load_training_checkpoint(tmp_path / "last.ckpt")
    for (k, a), b in zip(module.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="another base"):
        make_module("decoder_only", seed=4).load_training_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="trained with finetune=decoder_only"):
        make_module("full").load_training_checkpoint(tmp_path / "last.ckpt")


def test_lora_checkpoint_holds_adapters_and_decoder_only(tmp_path):
    module = make_module("lora", lora={"rank": 2, "blocks": [0, 5]})
    ckpt = save_like_lightning(module, tmp_path / "last.ckpt")
    keys = set(ckpt["state_dict"])
    assert all(".lora_" in k or k.startswith("model.sam.mask_decoder.") for k in keys)
    assert sum(".lora_" in k for k in keys) == 4
    assert ckpt[META_KEY]["finetune"]["lora"]["blocks"] == [0, 5]
    # Resuming: a new LoRA module (other random lora_A) gets the saved adapters and its own frozen base.
    torch.manual_seed(123)
    resumed = make_module("lora", lora={"rank": 2, "blocks": [0, 5]})
    resumed.load_training_checkpoint(tmp_path / "last.ckpt")
    for (k, a), b in zip(module.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_partial_checkpoint_as_model_checkpoint_uses_its_base(tmp_path):
    # Random-init base: (model type, seed) recorded in the checkpoint rebuild it exactly.
    module = make_module("lora", seed=5, lora={"rank": 2})
    perturb_lora(module.model.sam)
    save_like_lightning(module, tmp_path / "lora.ckpt")
    loaded = build_model("sam_tiny", checkpoint=tmp_path / "lora.ckpt")
    expected = plain_state_dict(module.model.sam)
    assert all(torch.equal(expected[k], v) for k, v in loaded.sam.state_dict().items())

    # File base: used while it exists; a clear error once it is gone; base_checkpoint= names another copy.
    base = save_sam_weights(build_model("sam_tiny", seed=7).sam, tmp_path / "base.pth")
    module = make_module("decoder_only", seed=0, base=str(base))
    save_like_lightning(module, tmp_path / "dec.ckpt")
    assert torch.equal(build_model("sam_tiny", checkpoint=tmp_path / "dec.ckpt").sam.image_encoder.pos_embed,
                       module.model.sam.image_encoder.pos_embed)
    copy = tmp_path / "copy.pth"
    base.rename(copy)
    with pytest.raises(CheckpointError, match=r"stores only the trained weights.*base checkpoint .*base.pth.*not found"):
        build_model("sam_tiny", checkpoint=tmp_path / "dec.ckpt")
    build_model("sam_tiny", checkpoint=tmp_path / "dec.ckpt", base_checkpoint=copy)
    other = save_sam_weights(build_model("sam_tiny", seed=8).sam, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="differ from those it was trained on"):
        build_model("sam_tiny", checkpoint=tmp_path / "dec.ckpt", base_checkpoint=other)
