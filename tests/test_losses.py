"""SAM's loss: multimask rule, IoU-head targets, weights, no NaN on degenerate inputs."""

from __future__ import annotations

import pytest
import torch

from samtune.losses import SamLoss, binary_iou, dice_loss, sigmoid_focal_loss
from samtune.metrics import InstanceMaskMetrics, expected_calibration_error, instance_iou_dice, spearman


def _target() -> torch.Tensor:
    t = torch.zeros(2, 16, 16, dtype=torch.bool)
    t[0, 2:8, 2:8] = True
    t[1, 10:14, 3:15] = True
    return t


def test_perfect_prediction_has_low_loss_and_matching_iou_target():
    t = _target()
    logits = (t.float() * 2 - 1).unsqueeze(1).repeat(1, 4, 1, 1) * 20
    iou_pred = torch.ones(2, 4)
    out = SamLoss()(logits, iou_pred, t, multimask=False)
    assert out.loss.shape == (2,)
    assert float(out.loss.max()) < 1e-3
    assert torch.equal(out.chosen, torch.zeros(2, dtype=torch.long))
    assert torch.allclose(out.true_iou, torch.ones(2))


def test_multimask_trains_the_best_of_outputs_1_to_3_only():
    t = _target()
    good = (t.float() * 2 - 1) * 20
    logits = torch.full((2, 4, 16, 16), -20.0)
    logits[:, 0] = good  # a perfect output 0 must be ignored for ambiguous prompts
    logits[0, 2] = good[0]
    logits[1, 3] = good[1]
    out = SamLoss()(logits, torch.zeros(2, 4), t, multimask=True)
    assert out.chosen.tolist() == [2, 3]
    single = SamLoss()(logits, torch.zeros(2, 4), t, multimask=False)
    assert single.chosen.tolist() == [0, 0]


def test_iou_head_target_is_true_iou_of_each_output():
    t = _target()
    logits = torch.full((2, 4, 16, 16), -20.0)
    logits[:, 1] = (t.float() * 2 - 1) * 20
    # output 1 is perfect (IoU 1), 2 and 3 empty (IoU 0): the best predictor says exactly that.
    pred = torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 2)
    assert float(SamLoss(focal_weight=0, dice_weight=0)(logits, pred, t, multimask=True).loss.max()) < 1e-8
    wrong = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    assert float(SamLoss(focal_weight=0, dice_weight=0)(logits, wrong, t, multimask=True).loss.min()) > 0.5


def test_weights_scale_components_and_negative_weight_is_rejected():
    t = _target()
    logits = torch.randn(2, 4, 16, 16)
    iou = torch.rand(2, 4)
    a = SamLoss(20, 1, 1)(logits, iou, t, multimask=False)
    b = SamLoss(0, 0, 1)(logits, iou, t, multimask=False)
    assert torch.allclose(a.loss - b.loss, 20 * a.focal + a.dice, atol=1e-5)
    with pytest.raises(ValueError, match="loss.dice_weight"):
        SamLoss(dice_weight=-1)


def test_degenerate_inputs_never_nan():
    empty_t = torch.zeros(1, 8, 8)
    for logits in (torch.zeros(1, 4, 8, 8), torch.full((1, 4, 8, 8), 1e4), torch.full((1, 4, 8, 8), -1e4)):
        out = SamLoss()(logits, torch.zeros(1, 4), empty_t, multimask=True)
        assert torch.isfinite(out.loss).all()
    assert torch.isfinite(sigmoid_focal_loss(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4))).all()
    assert dice_loss(torch.full((1, 1, 4, 4), -1e4), torch.zeros(1, 1, 4, 4)).item() == pytest.approx(0, abs=1e-4)
    assert binary_iou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)).item() == 1.0


def test_instance_metrics_match_torchmetrics_jaccard():
    from torchmetrics.functional.classification import binary_jaccard_index

    g = torch.Generator().manual_seed(0)
    pred = torch.rand(5, 20, 20, generator=g) > 0.5
    gt = torch.rand(5, 20, 20, generator=g) > 0.4
    iou, dice = instance_iou_dice(pred, gt)
    for i in range(5):
        assert float(iou[i]) == pytest.approx(float(binary_jaccard_index(pred[i].long(), gt[i].long())), abs=1e-6)
    m = InstanceMaskMetrics()
    m.update(pred[:2], gt[:2])
    m.update(pred[2:], gt[2:])
    res = m.compute()
    assert int(res["n"]) == 5 and float(res["miou"]) == pytest.approx(float(iou.mean()), abs=1e-6)
    assert torch.isnan(InstanceMaskMetrics().compute()["miou"])


def test_calibration_measures():
    x = torch.linspace(0, 1, 50).numpy()
    assert spearman(x, x**2) == pytest.approx(1.0)
    assert expected_calibration_error(x, x) == pytest.approx(0.0, abs=1e-9)
    assert expected_calibration_error(x, 1 - x) > 0.3


def _compose(*overrides: str):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    root = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_loss_config_files_spell_out_the_presets():
    import hydra

    from samtune.losses import LOSS_PRESETS, loss_preset_name

    for name, preset in LOSS_PRESETS.items():
        cfg = _compose(f"loss={name}")
        assert loss_preset_name(cfg.loss) == name
        loss = hydra.utils.instantiate(cfg.loss)
        assert {k: getattr(loss, k) for k in preset} == preset


@pytest.mark.parametrize(("model", "expected"), [("sam_tiny", "bce_dice"), ("vit_b", "sam"), ("vit_h", "sam")])
def test_pretrained_loss_follows_the_model(model, expected):
    import hydra

    from samtune.losses import LOSS_PRESETS

    cfg = _compose(f"model={model}", "model.checkpoint=x.pth", "loss=pretrained", "loss.iou_weight=5")
    loss = hydra.utils.instantiate(cfg.loss)
    assert {k: getattr(loss, k) for k in LOSS_PRESETS[expected]} == LOSS_PRESETS[expected]
    assert loss.iou_weight == 5


def test_pretrained_loss_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="model.pretrain_loss"):
        SamLoss.preset("l2")


def test_a_loss_other_than_the_starting_weights_is_warned_about():
    from samtune.training.fit import check_loss

    # the embedded generalist was trained with BCE + dice: SAM's focal loss is named as the mismatch
    message = check_loss(_compose("model=sam_tiny", "loss=sam", "model.checkpoint=g.pt"))
    assert message is not None and "'sam'" in message and "'bce_dice'" in message
    assert check_loss(_compose("model=sam_tiny", "loss=bce_dice", "model.checkpoint=g.pt")) is None
    assert check_loss(_compose("model=sam_tiny", "loss=pretrained", "model.checkpoint=g.pt")) is None
    assert check_loss(_compose("model=vit_b", "model.checkpoint=x.pth", "loss=bce_dice")) is not None
    assert check_loss(_compose("model=vit_b", "model.checkpoint=x.pth", "loss=pretrained")) is None
    # random starting weights have no loss to keep
    assert check_loss(_compose("model=sam_tiny", "model.checkpoint=null", "loss=sam")) is None
    # a loss of one's own (not a preset) is not second-guessed
    assert check_loss(_compose("model=sam_tiny", "loss=sam", "loss.focal_alpha=0.5", "model.checkpoint=g.pt")) is None
