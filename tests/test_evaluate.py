"""Evaluation: iterative clicks and NoC, automatic masks, calibration, and ``scripts/evaluate.py`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from samtune.data.sources import build_records
from samtune.evaluation.clicks import run_clicks
from samtune.evaluation.evaluator import evaluate_model
from samtune.evaluation.matching import match_to_ground_truth
from samtune.metrics import ClickMetrics, calibration, clicks_to_reach, match_one_to_one
from samtune.model import build_model, save_sam_weights
from samtune.predict.auto import encode_masks
from samtune.predict.zoom import ZoomConfig
from samtune.prompts import make_instance_prompts
from tests.blob_data import blob_args, write_blob_dataset
from tests.test_train_e2e import ROOT, run, tiny_args

H, W = 40, 50


def _gt() -> torch.Tensor:
    gt = torch.zeros(2, H, W, dtype=torch.bool)
    gt[0, 5:20, 5:25] = True
    gt[1, 22:36, 30:46] = True
    return gt


def _stub(answers):
    """A ClickPredictor returning ``answers(round, coords, labels)`` as masks (logits are unused)."""
    state = {"round": 0, "calls": []}

    def predict(coords, labels, mask_input, multimask):
        state["calls"].append((coords.clone(), labels.clone(), mask_input, multimask))
        masks = answers(state["round"], coords, labels)
        state["round"] += 1
        return masks, masks[:, None].float(), torch.full((len(masks),), 0.5)

    return predict, state


# ---------------------------------------------------------------- clicks and NoC
def test_perfect_model_needs_one_click():
    gt = _gt()
    predict, state = _stub(lambda k, c, lab: gt.clone())
    out = run_clicks(predict, gt, torch.tensor([[10.0, 10.0], [35.0, 30.0]]), max_clicks=5)
    assert out.ious.shape == (2, 5) and out.pred_ious.shape == (2, 5) and out.coords.shape == (2, 5, 2)
    assert torch.all(out.ious == 1)
    assert clicks_to_reach(out.ious, 0.85, 5).tolist() == [1, 1]
    metric = ClickMetrics(5)
    metric.update(out.ious, out.dices)
    res = metric.compute()
    assert res["noc85"] == 1 and res["noc90"] == 1 and res["nof90"] == 0 and len(res["miou_at"]) == 5
    # round 1: multimask and no mask prompt; later rounds: single mask with the previous logits
    assert state["calls"][0][3] is True and state["calls"][0][2] is None
    assert state["calls"][1][3] is False and state["calls"][1][2] is not None


def test_corrective_clicks_fall_in_the_error_and_noc_counts_them():
    gt = _gt()

    def answers(k, coords, labels):
        pred = gt.clone()
        if k == 0:  # first round: the left half of each object is missing, plus a false positive blob
            pred[0, 5:20, 5:15] = False
            pred[1, 22:36, 30:38] = False
            pred[1, 0:4, 0:4] = True
        return pred

    predict, _ = _stub(answers)
    out = run_clicks(predict, gt, torch.tensor([[20.0, 12.0], [42.0, 29.0]]), max_clicks=4)
    x, y = out.coords[0, 1].long().tolist()
    assert out.labels[0, 1] == 1 and gt[0, y, x] and 5 <= x < 15  # positive click in the missed part
    x, y = out.coords[1, 1].long().tolist()
    assert out.labels[1, 1] == 1 and 30 <= x < 38 and gt[1, y, x]  # the missed part is larger than the FP blob
    assert clicks_to_reach(out.ious, 0.9, 4).tolist() == [2, 2]
    assert torch.all(out.ious[:, 1:] == 1)


def test_never_reaching_counts_as_the_cap():
    gt = _gt()
    predict, _ = _stub(lambda k, c, lab: torch.zeros_like(gt))
    out = run_clicks(predict, gt, torch.tensor([[10.0, 10.0], [35.0, 30.0]]), max_clicks=3)
    metric = ClickMetrics(3)
    metric.update(out.ious, out.dices)
    res = metric.compute()
    assert res["noc85"] == 3 and res["noc90"] == 3 and res["nof85"] == 2
    assert res["miou_at"] == [0.0, 0.0, 0.0]
    assert torch.all(out.labels == 1)  # every correction click is positive: the object is always missed
    assert clicks_to_reach(torch.tensor([[0.5, 0.86, 0.95]]), 0.85, 20).tolist() == [2]


# ---------------------------------------------------------------- auto matching and calibration
def test_one_to_one_matching_precision_recall():
    gt = _gt()
    dup = gt[0].clone()
    dup[5:20, 5:8] = False  # a near-duplicate of instance 0 (IoU 0.85)
    noise = torch.zeros(H, W, dtype=torch.bool)
    noise[0:3, 40:50] = True
    preds = [gt[0].numpy(), dup.numpy(), noise.numpy(), gt[1].numpy()]
    match = match_to_ground_truth(encode_masks(preds), encode_masks(list(gt.numpy())))
    assert match.true_positives == 2  # one-to-one: the duplicate does not count twice
    assert match.best_iou.tolist() == [1.0, 1.0] and match.best_pred.tolist() == [0, 3]
    assert match.pred_best_iou[2] == 0.0 and match.pred_best_iou[1] == pytest.approx(0.85)
    assert match_one_to_one(np.zeros((0, 2))) == []
    empty = match_to_ground_truth([], encode_masks(list(gt.numpy())))
    assert empty.true_positives == 0 and empty.best_iou.tolist() == [0.0, 0.0]


def test_calibration_fields():
    true = np.linspace(0, 1, 20)
    perfect = calibration(true, true)
    assert set(perfect) == {"spearman", "ece", "n"} and perfect["n"] == 20
    assert perfect["spearman"] == pytest.approx(1.0) and perfect["ece"] == pytest.approx(0.0, abs=1e-9)
    off = calibration(np.clip(true + 0.2, 0, 1), true)
    assert off["ece"] > 0.1
    assert calibration(np.array([0.5]), np.array([0.5]))["spearman"] is None


# ---------------------------------------------------------------- evaluate_model with sam_tiny
@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return write_blob_dataset(tmp_path_factory.mktemp("blobs") / "data")


def test_evaluate_model_clicks_auto_and_calibration(blobs, tmp_path):
    records, _ = build_records("folder", blobs, "test")
    prompts = {}
    from samtune.data.records import load_record

    for r in records:
        prompts[r.rel_path] = make_instance_prompts(load_record(r)[1], seed=0, key=r.rel_path)
    model = build_model("sam_tiny", seed=1)
    result = evaluate_model(
        model, records, prompts, name="zero_shot", modes=["box", "clicks", "auto"], max_clicks=3,
        auto_params={"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
        map_dir=tmp_path / "maps",
    )
    n = sum(len(v) for v in prompts.values())
    clicks = result.summary["clicks"]
    assert clicks["n"] == n and clicks["max_clicks"] == 3 and list(clicks["miou_at"]) == ["1", "2", "3"]
    assert 1 <= clicks["noc85"] <= 3 and 1 <= clicks["noc90"] <= 3 and clicks["miou"] == clicks["miou_at"]["3"]
    auto = result.summary["auto"]
    assert auto["n"] == n and auto["n_pred"] >= 1 and set(auto) >= {"precision50", "recall50", "f1_50", "miou"}
    assert set(result.calibration) == {"box", "clicks", "auto"}
    assert result.calibration["clicks"]["n"] == 3 * n and result.calibration["auto"]["n"] == auto["n_pred"]
    rows = [r for r in result.rows if r["mode"] == "clicks"]
    assert len(rows) == n and all(len(r["ious"]) == 3 and len(r["prompt"]["points"]) == 3 for r in rows)
    assert rows[0]["prompt"]["points"][0] == prompts[rows[0]["image"]][0]["point1"]["points"][0]
    assert len([r for r in result.rows if r["mode"] == "auto"]) == n
    assert auto["filters"]["candidates"] == 3 * 4 * len(records) and "why_no_masks" not in auto
    # thresholds no mask reaches: the summary (and so report.json / report.md) says which filter removed them
    none = evaluate_model(model, records, prompts, name="zero_shot", modes=["auto"],
                          auto_params={"points_per_side": 2, "pred_iou_thresh": 1.5})
    assert none.summary["auto"]["n_pred"] == 0 and none.summary["auto"]["filters"]["passed_pred_iou"] == 0
    assert "eval.auto.pred_iou_thresh=1.5" in none.summary["auto"]["why_no_masks"]
    assert (tmp_path / "maps" / f"{records[0].rel_path}.png").is_file()  # box-mode instance map for overlays
    with pytest.raises(ValueError, match="unknown prompt modes"):
        evaluate_model(model, records, prompts, name="x", modes=["lasso"])


@pytest.mark.parametrize("zoom", [None, ZoomConfig(context=2.0, refine=1)])
def test_point1_oracle_scores_each_instance_by_its_best_output(blobs, zoom):
    """point1_oracle decodes the one-point prompts once per multimask output; each instance's oracle IoU is the
    best of the three, the IoU head's choice (point1) is one of them, and the summary gives each output's mIoU."""
    from samtune.data.records import load_record

    records, _ = build_records("folder", blobs, "test")
    prompts = {r.rel_path: make_instance_prompts(load_record(r)[1], seed=0, key=r.rel_path) for r in records}
    model = build_model("sam_tiny", seed=1)
    result = evaluate_model(model, records, prompts, name="zero_shot", modes=["point1", "point1_oracle"], zoom=zoom)
    n = sum(len(v) for v in prompts.values())
    oracle = [r for r in result.rows if r["mode"] == "point1_oracle"]
    chosen = {(r["image"], r["instance"]): r["iou"] for r in result.rows if r["mode"] == "point1"}
    assert len(oracle) == n == len(chosen)
    for r in oracle:
        assert len(r["output_ious"]) == 3 and r["iou"] == max(r["output_ious"])
        assert r["output_ious"][r["output"] - 1] == r["iou"]
        if zoom is None:  # with re-crops, the head's choice can steer its later windows elsewhere
            assert min(abs(chosen[r["image"], r["instance"]] - v) for v in r["output_ious"]) < 1e-5
    summary = result.summary["point1_oracle"]
    per_output = np.array([r["output_ious"] for r in oracle])
    assert summary["n"] == n and summary["miou"] == pytest.approx(per_output.max(1).mean(), abs=1e-5)
    assert [summary["output_miou"][k] for k in "123"] == pytest.approx(per_output.mean(0).tolist(), abs=1e-5)
    assert sum(summary["output_share"].values()) == pytest.approx(1.0)
    assert summary["miou"] >= max(summary["output_miou"].values()) - 1e-6
    assert summary["miou"] >= result.summary["point1"]["miou"] - 1e-6
    assert result.calibration["point1_oracle"]["n"] == n


# ---------------------------------------------------------------- scripts/evaluate.py end to end
def test_evaluate_script_end_to_end(blobs, tmp_path):
    ckpt = tmp_path / "last.ckpt"  # a Lightning-style checkpoint of another sam_tiny
    other = build_model("sam_tiny", seed=7).sam
    torch.save({"state_dict": {f"model.sam.{k}": v for k, v in other.state_dict().items()}}, ckpt)
    start = save_sam_weights(build_model("sam_tiny", seed=3).sam, tmp_path / "start.pth")
    out = tmp_path / "eval_run"
    args = tiny_args(tmp_path, out, *blob_args(blobs), f"model.checkpoint={start}", f"finetuned={ckpt}",
                     "eval.modes=[box,point1,point1_oracle,clicks,auto]", "eval.max_clicks=2", "eval.auto.points_per_side=2",
                     "eval.auto.pred_iou_thresh=0", "eval.auto.stability_score_thresh=0", "eval.auto.zoom=null",
                     "eval.auto.crop_n_layers=0",
                     "eval.split=train", f"eval.extra_sets=[{{name: other, root: '{blobs}', split: val, modes: [box]}}]")
    args[1] = str(ROOT / "scripts" / "evaluate.py")
    run(args)
    report = json.loads((out / "report.json").read_text())
    for name in ("zero_shot", "finetuned"):
        assert set(report[name]) == {"box", "point1", "point1_oracle", "clicks", "auto"}
        for mode in report[name].values():
            assert set(mode) >= {"miou", "dice", "n"} and mode["n"] > 0
        assert set(report["calibration"][name]) == {"box", "point1", "point1_oracle", "clicks", "auto"}
        assert set(report[name]["clicks"]["miou_at"]) == {"1", "2"}
        assert set(report[name]["point1_oracle"]["output_miou"]) == {"1", "2", "3"}
    assert set(report["gain"]) == {"box", "point1", "point1_oracle", "clicks", "auto"} and report["skipped_files"] == []
    assert report["meta"]["checkpoint"] == str(start) and report["meta"]["finetuned_checkpoint"] == str(ckpt)
    other_set = report["extra_sets"]["other"]
    assert other_set["meta"]["split"] == "val" and set(other_set["finetuned"]) == {"box"} and "gain" in other_set
    worst = report["worst_images"]
    assert len(worst) == 1 and worst[0]["image"].startswith("train/") and Path(worst[0]["overlay"]).is_file()
    assert report["meta"]["split"] == "train" and report["meta"]["n_images"] == 2  # any split of the dataset
    assert all(k.startswith("train/") for k in json.loads((out / "prompts.json").read_text())["images"])
    assert not any(isinstance(v, float) and math.isnan(v) for v in report["zero_shot"]["box"].values())
    rows = [json.loads(line) for line in (out / "instances.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"zero_shot", "finetuned"}
    assert {r.get("set") for r in rows} == {None, "other"}
    md = (out / "report.md").read_text()
    for section in ("## One point: each multimask output", "## Iterative clicks", "NoC@90", "## Automatic masks", "## IoU-head calibration",
                    "## Forgetting check", "## Worst images", "overlays/worst/"):
        assert section in md, section
    assert (out / "clicks.png").is_file() and (out / "metrics.json").is_file()
    assert json.loads((out / "metrics.json").read_text())["test/finetuned/clicks_noc90"] >= 1
    assert "checkpoints" not in {p.name for p in out.iterdir()}  # evaluation trains nothing


def test_stored_evaluation_is_reused_only_for_the_same_weights(blobs, tmp_path):
    """A run directory evaluated again (a resume that trained further, another checkpoint) evaluates new weights
    again instead of reporting the stored figures of the old ones."""
    start = save_sam_weights(build_model("sam_tiny", seed=3).sam, tmp_path / "start.pth")
    out = tmp_path / "eval_run"
    reports = []
    for seed in (7, 8, 8):
        ckpt = tmp_path / f"ft{seed}.pth"
        save_sam_weights(build_model("sam_tiny", seed=seed).sam, ckpt)
        args = tiny_args(tmp_path, out, *blob_args(blobs), f"model.checkpoint={start}", f"finetuned={ckpt}",
                         "eval.modes=[box]", "eval.split=train")
        args[1] = str(ROOT / "scripts" / "evaluate.py")
        proc = run(args)
        reports.append((json.loads((out / "report.json").read_text()), proc.stdout + proc.stderr))
    (first, log1), (second, log2), (third, log3) = reports
    assert "Reusing the zero_shot evaluation" in log2 and "Reusing the finetuned evaluation" not in log2
    assert first["zero_shot"] == second["zero_shot"] and first["finetuned"] != second["finetuned"]
    assert "Reusing the finetuned evaluation" in log3 and third["finetuned"] == second["finetuned"]
