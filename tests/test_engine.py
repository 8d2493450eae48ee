"""The data engine: labelled split, threshold choice, pseudo-label files, EMA teacher, rounds and kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from samtune.data.records import ImageRecord, load_record
from samtune.data.sources import scan_folder
from samtune.engine.pseudo import (
    Proposal,
    Thresholds,
    choose_thresholds,
    hidden_label_iou,
    propose,
    pseudo_records,
    write_pseudo_labels,
)
from samtune.engine.runner import check_engine_config, plan
from samtune.engine.split import split_labeled
from samtune.predict.auto import encode_masks
from tests.blob_data import write_blob_dataset, write_disc_dataset
from tests.test_finetune_modes import make_module, tiny_batch
from tests.test_train_e2e import ROOT, kill_when_paused, probe_args, probe_lines, start_paused_run

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


def _records(n: int) -> list[ImageRecord]:
    return [ImageRecord(image_path=Path(f"/x/{i:02d}.png"), rel_path=f"train/images/{i:02d}.png", split="train")
            for i in range(n)]


def test_split_labeled_is_deterministic_and_validated():
    records = _records(20)
    labeled, unlabeled = split_labeled(records, fraction=0.1, seed=3)
    assert len(labeled) == 2 and len(unlabeled) == 18
    assert {r.rel_path for r in labeled}.isdisjoint(r.rel_path for r in unlabeled)
    assert split_labeled(list(reversed(records)), fraction=0.1, seed=3)[0] == labeled
    assert split_labeled(records, fraction=0.1, seed=4)[0] != labeled
    assert len(split_labeled(records, fraction=0.001)[0]) == 1  # at least one labelled image
    assert split_labeled(records) == (records, [])
    labeled, _ = split_labeled(records, ids=["03", "train/images/07.png"], fraction=0.5)
    assert [r.image_id for r in labeled] == ["03", "07"]
    with pytest.raises(ValueError, match=r"data.labeled_ids: no training image with the id\(s\) \['nope'\]"):
        split_labeled(records, ids=["nope"])
    with pytest.raises(ValueError, match="data.labeled_fraction must be in"):
        split_labeled(records, fraction=1.5)


def test_plan_orders_the_stages():
    from omegaconf import OmegaConf

    assert plan(OmegaConf.create({"rounds": 2, "semi": {"enabled": True}})) == [
        "supervised", "semi_supervised", "pseudo_label", "pseudo_label"]
    assert plan(OmegaConf.create({"rounds": 0, "semi": {"enabled": False}})) == ["supervised"]
    with pytest.raises(ValueError, match="engine.rounds"):
        plan(OmegaConf.create({"rounds": -1}))


def test_engine_settings_are_checked_before_anything_runs():
    from omegaconf import OmegaConf

    def cfg(mode="decoder_only", **engine):
        base = {"rounds": 1, "semi": {"enabled": True}, "thresholds_from_val": "auto", "val_target_iou": 0.75,
                "max_images_per_round": None, "max_val_images": None}
        return OmegaConf.create({"engine": {**base, **engine}, "finetune": {"mode": mode}})

    check_engine_config(cfg())
    with pytest.raises(ValueError, match="engine.semi.enabled=true needs finetune=decoder_only"):
        check_engine_config(cfg("full"))
    check_engine_config(cfg("full", semi={"enabled": False}))
    for key, bad in [("thresholds_from_val", "sometimes"), ("max_images_per_round", 0), ("max_val_images", 2.5),
                     ("val_target_iou", 1.5)]:
        with pytest.raises(ValueError, match=f"engine.{key}"):
            check_engine_config(cfg(**{key: bad}))


def test_engine_settings_are_read_once_with_the_config_defaults():
    """A partial engine config gets configs/engine/default.yaml's values, so both paths run the same engine."""
    from omegaconf import OmegaConf

    from samtune.engine.settings import DEFAULTS, engine_settings

    full = OmegaConf.load(ROOT / "configs" / "engine" / "default.yaml")
    for key, value in DEFAULTS.items():
        assert OmegaConf.select(full, key) == value, key
    read = engine_settings(full)
    assert read.stages == ("supervised", "semi_supervised", "pseudo_label", "pseudo_label")
    assert read.semi is not None and read.semi.teacher["ema"] == full.semi.ema
    partial = engine_settings(OmegaConf.create({"rounds": 2, "semi": {"enabled": True, "ema": full.semi.ema}}))
    assert (partial.pred_iou_thresh, partial.stability_score_thresh, partial.pseudo_weight) == (
        read.pred_iou_thresh, read.stability_score_thresh, read.pseudo_weight)
    assert (partial.semi.prompt_iou_thresh, partial.semi.prompt_stability_thresh) == (
        read.semi.prompt_iou_thresh, read.semi.prompt_stability_thresh)


def _proposals(records, rng):
    """Per image: each ground-truth instance (good, high scores) plus a shifted copy (bad, lower scores)."""
    out = {}
    for r in records:
        _, inst = load_record(r)
        props = []
        for i in range(1, int(inst.max()) + 1):
            good = inst == i
            bad = np.roll(good, 12, axis=1)
            props.append(Proposal(encode_masks([good])[0], int(good.sum()), [0, 0, 1, 1], rng.uniform(0.8, 0.95),
                                  rng.uniform(0.9, 1.0)))
            props.append(Proposal(encode_masks([bad])[0], int(bad.sum()), [0, 0, 1, 1], rng.uniform(0.55, 0.7),
                                  rng.uniform(0.6, 0.85)))
        out[r.rel_path] = props
    return out


def test_thresholds_from_validation_separate_good_from_bad_masks(tmp_path):
    root = write_blob_dataset(tmp_path / "blobs", {"val": 4})
    records, _ = scan_folder(root, "val")
    thresholds, stats = choose_thresholds(_proposals(records, np.random.default_rng(0)), records)
    assert 0.7 < thresholds.pred_iou <= 0.8 or 0.85 < thresholds.stability <= 0.9
    assert stats["f1"] == 1.0 and stats["precision"] == 1.0 and stats["recall"] == 1.0
    assert stats["spearman"] > 0.5 and stats["n"] == 2 * stats["n_good"]


def test_thresholds_from_validation_reach_a_target_quality(tmp_path):
    """With a target mean IoU the choice keeps as many validation proposals as it can while their mean IoU with the
    labels reaches it; an unreachable target keeps nothing and says the best mean IoU any pair reached."""
    root = write_blob_dataset(tmp_path / "blobs", {"val": 4})
    records, _ = scan_folder(root, "val")
    proposals = _proposals(records, np.random.default_rng(0))
    thresholds, stats = choose_thresholds(proposals, records, target_iou=0.99)
    kept = [p for ps in proposals.values() for p in ps if thresholds.keeps(p)]
    assert len(kept) == stats["kept"] == stats["n"] // 2 and stats["mean_iou"] == 1.0  # every good copy, no shifted one
    loose, loose_stats = choose_thresholds(proposals, records, target_iou=0.0)
    assert loose_stats["kept"] == loose_stats["n"] and loose_stats["mean_iou"] < 0.99  # a low bar keeps everything
    none, none_stats = choose_thresholds(proposals, records, target_iou=1.01)
    assert none is None and none_stats["kept"] == 0 and none_stats["best_mean_iou"] == 1.0


def test_pseudo_label_file_round_trips_with_provenance(tmp_path):
    root = write_blob_dataset(tmp_path / "blobs", {"train": 3})
    records, _ = scan_folder(root, "train")
    props = _proposals(records, np.random.default_rng(1))
    thresholds = Thresholds(0.75, 0.5)
    kept = {p: [m for m in ms if thresholds.keeps(m)] for p, ms in props.items()}
    kept[records[2].rel_path] = []  # an image where nothing passed
    path = write_pseudo_labels(tmp_path / "engine" / "round_2" / "pseudo_labels.json", records, kept, round_index=2,
                               stage="pseudo_label", model_hash="abc", thresholds=thresholds, root=root)
    data = json.loads(path.read_text())
    ann = data["annotations"][0]
    assert ann["provenance"]["round"] == 2 and ann["provenance"]["model_checkpoint_sha256"] == "abc"
    assert ann["provenance"]["thresholds"] == {"pred_iou_thresh": 0.75, "stability_score_thresh": 0.5}
    assert set(ann["provenance"]) >= {"source_image", "predicted_iou", "stability_score"}
    assert not list(path.parent.glob("*.tmp*"))
    out = pseudo_records(path, records, weight=0.5, kind="pseudo")
    assert [r.rel_path for r in out] == [r.rel_path for r in records[:2]]
    for record, source in zip(out, records, strict=False):
        _, truth = load_record(source)
        _, pseudo = load_record(record)
        assert record.weight == 0.5 and record.kind == "pseudo"
        assert pseudo.max() == truth.max()  # the good copies passed, the shifted ones did not
        assert np.array_equal(pseudo > 0, truth > 0)
    assert sorted(p.name for p in (root / "train" / "masks").iterdir()) == sorted(
        f"{r.image_id}.png" for r in records)  # labelled data untouched


def test_zoomed_proposals_become_pseudo_labels_that_match_hidden_labels(tmp_path):
    """The pseudo-label step on a learnable set (the shipped model, two images of small discs): proposals segmented in
    zoom and kept at the model's thresholds (model.auto) become training masks, and they are the hidden objects
    (most discs found, kept masks' mean IoU with their disc >= 0.7). SAM's fixed 0.88 / 0.95 keep nothing here, so
    a filter that rejects everything fails this test."""
    from samtune.model import build_model

    root = write_disc_dataset(tmp_path / "discs", "train", 2)
    records, _ = scan_folder(root, "train")
    model = build_model("sam_tiny", checkpoint=str(ROOT / "data" / "checkpoints" / "sam_tiny_generalist.pt"))
    amg = {"points_per_side": 6, "zoom": 2.0, "box_nms_thresh": 0.4}
    proposals = propose(model, records, amg)
    assert not {k: v for k, v in proposals.items() if not v}  # every image has proposals
    kept = {k: [p for p in v if Thresholds(0.6, 0.75).keeps(p)] for k, v in proposals.items()}
    ious = hidden_label_iou(records, kept)
    assert len(ious) >= 12 and float(np.mean(ious)) >= 0.7 and sum(i >= 0.5 for i in ious) >= 12
    assert not any(Thresholds().keeps(p) for v in proposals.values() for p in v)
    path = write_pseudo_labels(tmp_path / "pseudo_labels.json", records, kept, round_index=2, stage="pseudo_label",
                               model_hash="test", thresholds=Thresholds(0.6, 0.75), root=root)
    train = pseudo_records(path, records, weight=0.5, kind="pseudo")
    assert len(train) == 2 and sum(len(r.coco_anns) for r in train) == len(ious)


def test_the_simulated_reviewer_reviews_proposals_against_hidden_labels(tmp_path):
    """engine.review=simulated's reviewer on small discs with the shipped model: accepted masks match their disc at
    accept_iou, fixed and added ones reach target_iou, it stops at its budget, its decisions are reviews the engine
    reads; from scratch (proposals=false) it only adds objects, and costs more actions per object."""
    from samtune.annotate.store import ReviewStore, decode
    from samtune.engine.review import load_reviews
    from samtune.engine.simulated import ReviewerSettings, simulate_review
    from samtune.metrics import mask_iou_matrix
    from samtune.model import build_model
    from samtune.predict.segmenter import Segmenter
    from samtune.predict.zoom import ZoomConfig

    root = write_disc_dataset(tmp_path / "discs", "train", 2)
    records, _ = scan_folder(root, "train")
    model = build_model("sam_tiny", checkpoint=str(ROOT / "data" / "checkpoints" / "sam_tiny_generalist.pt")).eval()
    proposals = propose(model, records, {"points_per_side": 6, "zoom": 2.0, "box_nms_thresh": 0.4})
    segmenter = Segmenter(model, ZoomConfig(context=2.0))
    # 13-px discs: pixel edges keep clicked masks under 0.85 IoU, so the bars are lower than the defaults
    settings = ReviewerSettings(budget=200, show_pred_iou=0.5, accept_iou=0.7, target_iou=0.8)
    effort = simulate_review(segmenter, records, proposals, ReviewStore(tmp_path / "review"), settings,
                             model_sha256="test")
    assert effort["actions"] <= settings.budget and effort["images_reviewed"] == 2
    assert effort["accepted"] + effort["fixed"] + effort["added"] >= 14  # of 16 discs
    for record in records:
        state = ReviewStore(tmp_path / "review").load(record.rel_path)
        _, inst = load_record(record)
        gts = [encode_masks([inst == i])[0] for i in range(1, int(inst.max()) + 1)]
        for obj in state["objects"]:
            best = float(mask_iou_matrix([obj["rle"]], gts).max())
            if obj["status"] == "accepted":
                assert best >= settings.accept_iou
            elif obj["status"] in ("fixed", "added"):
                assert best >= settings.target_iou and obj["n_clicks"] >= 1
            assert decode(obj["rle"]).shape == inst.shape
    loaded = load_reviews(tmp_path / "review", records)
    assert loaded.reviewed == {r.rel_path for r in records} and sum(len(r.coco_anns) for r in loaded.labeled) >= 14

    scratch = simulate_review(segmenter, records, proposals, ReviewStore(tmp_path / "scratch"),
                              ReviewerSettings(budget=200, accept_iou=0.7, target_iou=0.8, proposals=False), model_sha256="test")
    assert scratch["accepted"] == scratch["fixed"] == scratch["rejected"] == 0 and scratch["added"] >= 1
    per_object = effort["actions"] / (effort["accepted"] + effort["fixed"] + effort["added"])
    assert scratch["added"] >= 14 and per_object < scratch["actions"] / scratch["added"]  # reviewing saves actions
    tight = simulate_review(segmenter, records, proposals, ReviewStore(tmp_path / "tight"),
                            ReviewerSettings(budget=5), model_sha256="test")
    assert tight["actions"] <= 5 and tight["images_reviewed"] == 0


def test_pseudo_weights_scale_the_loss():
    module = make_module("decoder_only")
    batch = tiny_batch()
    full = module.training_step({**batch, "weight": torch.tensor([1.0])}, 0)
    half = module.training_step({**batch, "weight": torch.tensor([0.5])}, 0)
    assert torch.allclose(half, full * 0.5)


def test_ema_teacher_supervises_unlabelled_images_and_follows_the_student():
    module = make_module("decoder_only", teacher={"ema": 0.5, "confidence": 0.0, "feature_dropout": 0.3, "weight": 1.0})
    assert not any(k.startswith("teacher") for k in module.state_dict())  # never checkpointed
    batch = {**tiny_batch(), "kind": ["teacher"], "weight": torch.tensor([1.0])}
    with torch.no_grad():  # a student whose box predictions are not empty, so the teacher has targets
        module.model.sam.mask_decoder.output_hypernetworks_mlps[0].layers[-1].bias.fill_(0.5)
    module.teacher.parts["mask_decoder"].load_state_dict(module.model.sam.mask_decoder.state_dict())
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in module.model.sam.mask_decoder.parameters() if p.grad is not None]
    assert grads and all(not any(p.requires_grad for p in m.parameters()) for m in module.teacher.parts.values())
    student = module.model.sam.mask_decoder.output_upscaling[0].weight
    teacher = module.teacher.parts["mask_decoder"].output_upscaling[0].weight
    with torch.no_grad():
        student.add_(1.0)
    before = teacher.clone()
    module.on_train_batch_end(None, batch, 0)
    assert torch.allclose(teacher, 0.5 * before + 0.5 * student)
    with pytest.raises(ValueError, match="engine.semi.confidence"):
        make_module("decoder_only", teacher={"ema": 0.5, "confidence": 2.0})
    with pytest.raises(ValueError, match="a batch holds unlabelled"):
        make_module("decoder_only").training_step(batch, 0)


def _engine_args(tmp_path, run_dir, *extra):
    return [
        # the semi-supervised round's EMA teacher needs the frozen encoder of decoder_only (the experiment adapts it)
        sys.executable, str(ROOT / "train.py"), "experiment=pcb_data_engine", "debug=tiny", "finetune=decoder_only",
        "engine.semi.enabled=true",
        f"data.root={tmp_path / 'blobs'}", "data.generator=null", "data.augment=none", "data.labeled_fraction=0.25",
        "data.batch_size=2", "data.max_instances=3", "prompts.correction_rounds=0", "engine.rounds=1",
        "engine.amg.points_per_side=4", "engine.pred_iou_thresh=0", "engine.stability_score_thresh=0",
        "engine.semi.prompt_iou_thresh=0", "engine.semi.prompt_stability_thresh=0", "eval.modes=[box]",
        "eval.overlays=1", "eval.worst=1", f"hydra.run.dir={run_dir}", *extra,
    ]


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    write_blob_dataset(tmp / "blobs", {"train": 8, "val": 1, "test": 2})
    run_dir = tmp / "runs" / "a"
    proc = subprocess.run(_engine_args(tmp, run_dir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, run_dir


def test_a_round_that_keeps_nothing_says_why(tmp_path):
    """Fixed thresholds no proposal reaches: the round chooses them on validation instead (thresholds_from_val=auto,
    logged), and when no pair reaches the target quality there either it keeps 0 masks; the log names the fixed
    thresholds, the best predicted IoU and stability any proposal reached and the best mean IoU on validation (the
    report has them too)."""
    write_blob_dataset(tmp_path / "blobs", {"train": 4, "val": 1, "test": 1})
    run_dir = tmp_path / "run"
    args = [a for a in _engine_args(tmp_path, run_dir, "engine.semi.enabled=false", "trainer.max_epochs=1")
            if not a.startswith("engine.pred_iou_thresh")]
    proc = subprocess.run([*args, "engine.pred_iou_thresh=1.5", "engine.val_target_iou=1.0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = json.loads((run_dir / "report.json").read_text())["engine"]["rounds"]
    pseudo = [r for r in rounds if r["stage"] == "pseudo_label"][0]
    assert pseudo["kept"] == 0 and pseudo["proposed"] > 0 and pseudo["best_pred_iou"] < 1.5
    choice = pseudo["threshold_choice"]
    assert choice["target_iou"] == 1.0 and 0 < choice["best_mean_iou"] < 1 and choice["val_images"] == 1
    log = proc.stdout + proc.stderr
    assert "keeps no proposal" in log and f"best predicted IoU was {pseudo['best_pred_iou']:.3f}" in log
    assert "'pred_iou_thresh': 1.5" in log and "choosing them on the validation split" in log
    assert f"the best any pair reached was {choice['best_mean_iou']:.3f}" in log


def test_a_round_that_does_not_beat_its_start_keeps_it(tmp_path):
    """A supervised round whose training wrecks the model (learning rate 0.3): no epoch beats the starting weights on
    validation, so the round keeps them: its test figures are zero-shot's, to the digit, and the report says why."""
    write_blob_dataset(tmp_path / "blobs", {"train": 4, "val": 1, "test": 1})
    run_dir = tmp_path / "run"
    proc = subprocess.run(_engine_args(tmp_path, run_dir, "engine.semi.enabled=false", "engine.rounds=0",
                                       "optimizer.lr=0.3"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    (round0,) = report["engine"]["rounds"]
    assert round0["kept_previous"] is True and round0["val_min_gain"] < 0
    assert round0["box_miou"] == report["engine"]["zero_shot"]["box_miou"] == report["zero_shot"]["box"]["miou"]
    assert "kept its starting weights" in (run_dir / "report.md").read_text()
    log = proc.stdout + proc.stderr
    assert "no epoch beat the round's starting model" in log
    assert "round_0 has the weights of zero_shot" in log  # the same weights are not evaluated twice


def test_engine_runs_every_stage_and_reports_rounds(engine_run):
    _, run_dir = engine_run
    report = json.loads((run_dir / "report.json").read_text())
    rounds = report["engine"]["rounds"]
    assert [(r["round"], r["stage"]) for r in rounds] == [(0, "supervised"), (1, "semi_supervised"), (2, "pseudo_label")]
    assert all(0 <= r["box_miou"] <= 1 for r in rounds)
    assert rounds[-1]["box_miou"] == report["finetuned"]["box"]["miou"]
    assert report["engine"]["labeled_images"] == 2 and report["engine"]["unlabeled_images"] == 6
    assert rounds[2]["proposed"] == rounds[2]["kept"] + rounds[2]["rejected"] > 0
    assert 0 <= rounds[2]["kept_hidden_iou"] <= 1
    assert rounds[2]["best_pred_iou"] is not None and rounds[2]["best_stability"] is not None
    md = (run_dir / "report.md").read_text()
    assert "## Data engine" in md and "| 2 | pseudo_label" in md and (run_dir / "engine_rounds.png").is_file()
    split = json.loads((run_dir / "engine" / "split.json").read_text())
    labels = json.loads((run_dir / "engine" / "round_2" / "pseudo_labels.json").read_text())
    assert {i["file_name"] for i in labels["images"]} == set(split["unlabeled"])  # only unlabelled images


def test_engine_resumes_after_the_last_completed_round(engine_run):
    tmp, run_dir = engine_run
    edir = run_dir / "engine"
    stamps = {p: p.stat().st_mtime_ns for p in edir.rglob("*") if p.is_file()}
    # as if killed during round 2's training: its DONE marker and the end of the run are missing
    (edir / "round_2" / "DONE.json").unlink()
    (edir / "FINISHED.json").unlink()
    again = tmp / "runs" / "b"  # the same command again (Hydra gives it a new directory)
    proc = subprocess.run(_engine_args(tmp, again), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (again / "RESUMED_INTO.txt").read_text().strip() == str(run_dir)
    kept = [p for p in stamps if "round_2" not in p.parts or p.name == "pseudo_labels.json"]
    kept = [p for p in kept if p.name != "FINISHED.json"]
    assert any("round_0" in p.parts for p in kept) and any(p.name == "pseudo_labels.json" for p in kept)
    for path in kept:  # completed rounds and this round's pseudo-labels are not rewritten
        assert path.stat().st_mtime_ns == stamps[path], f"{path} was rewritten"
    assert (edir / "round_2" / "DONE.json").is_file() and (edir / "FINISHED.json").is_file()


def test_killed_engine_continues_with_the_same_command(tmp_path):
    """The engine killed (SIGKILL) in round 1's training, one step after that round's last.ckpt was written: the same
    command again keeps round 0 as it was and continues round 1 from its last.ckpt's step (not from 0) to the end."""
    write_blob_dataset(tmp_path / "blobs", {"train": 8, "val": 1, "test": 2})
    run_dir = tmp_path / "run"
    marker = tmp_path / "paused"
    # Two epochs a round. Round 0 trains the 2 labelled images (1 step an epoch: 2 steps); round 1 the labelled and
    # unlabelled ones (debug=tiny: 2 steps an epoch, last.ckpt at steps 2 and 4). The first process is killed when
    # round 1 is about to train step 4 (step 3 trained, not checkpointed). Each round's StepProbe log is its own.
    args = _engine_args(tmp_path, run_dir, "trainer.max_epochs=2",
                        *probe_args("${paths.output_dir}/probe.log", pause_at=3, marker=marker))
    rounds = [run_dir / "engine" / f"round_{k}" for k in range(3)]
    proc = start_paused_run(args, tmp_path / "killed.out", start_new_session=True)
    try:
        kill_when_paused(proc, marker, tmp_path / "killed.out", group=True)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done0 = rounds[0] / "DONE.json"
    assert done0.is_file() and not (rounds[1] / "DONE.json").exists()
    assert probe_lines(rounds[0] / "probe.log") == ["start 0", "end 2"]
    assert probe_lines(rounds[1] / "probe.log") == ["start 0", "paused 3"]
    last1 = rounds[1] / "checkpoints" / "last.ckpt"
    assert torch.load(last1, map_location="cpu", weights_only=False)["global_step"] == 2
    first = done0.read_bytes(), done0.stat().st_mtime_ns

    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (done0.read_bytes(), done0.stat().st_mtime_ns) == first
    assert probe_lines(rounds[0] / "probe.log") == ["start 0", "end 2"]  # round 0 was not trained again
    assert probe_lines(rounds[1] / "probe.log")[2:] == ["start 2", "end 4"]  # from last.ckpt's step to the end
    assert torch.load(last1, map_location="cpu", weights_only=False)["global_step"] == 4
    round2 = probe_lines(rounds[2] / "probe.log")
    assert round2[0] == "start 0" and len(round2) == 2 and int(round2[1].split()[1]) > 0
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["round"] for r in report["engine"]["rounds"]] == [0, 1, 2]


def test_reviews_enter_the_next_round(engine_run, tmp_path):
    """People review the last round's pseudo-labels in the annotator (engine_run=RUN): one accepted, one rejected, the
    image marked done. The same command with one more round and engine.review=DIR trains that round on the accepted
    mask as a label, proposes nothing on the reviewed image, drops the pseudo-labels matching the decided masks, and
    the report counts the effort."""
    from samtune.annotate.app import engine_run_proposals
    from samtune.annotate.session import AnnotationSession
    from samtune.annotate.store import ReviewStore
    from samtune.engine.review import drop_superseded, load_reviews
    from samtune.model import build_model

    tmp, run_dir = engine_run
    records, _, pseudo, round_index = engine_run_proposals(run_dir)
    assert round_index == 2 and pseudo and {r.rel_path for r in records} >= set(pseudo)
    image = next(r for r in records if len(pseudo.get(r.rel_path, [])) >= 2)
    model = build_model("sam_tiny", checkpoint=str(ROOT / "data" / "checkpoints" / "sam_tiny_generalist.pt"))
    reviews = tmp_path / "reviews"
    session = AnnotationSession(model, [image], ReviewStore(reviews), proposals="pseudo", pseudo=pseudo)
    state = session.state(0)
    assert [o["source"]["kind"] for o in state["objects"]] == ["pseudo"] * len(pseudo[image.rel_path])
    session.act(0, {"action": "accept", "object": 1})
    session.act(0, {"action": "reject", "object": 2})
    session.act(0, {"action": "done"})

    loaded = load_reviews(reviews, records)
    assert loaded.counts["accepted"] == 1 and loaded.counts["rejected"] == 1 and loaded.reviewed == {image.rel_path}
    assert len(loaded.labeled) == 1 and len(loaded.labeled[0].coco_anns) == 1
    again, dropped = drop_superseded([replace(loaded.labeled[0], coco_anns=tuple(pseudo[image.rel_path]))],
                                     loaded.superseded)
    assert dropped == 2 and sum(len(r.coco_anns) for r in again) == len(pseudo[image.rel_path]) - 2

    proc = subprocess.run(_engine_args(tmp, run_dir, "engine.rounds=2", f"engine.review={reviews}"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = json.loads((run_dir / "engine" / "round_3" / "DONE.json").read_text())
    assert done["review"]["accepted"] == 1 and done["review"]["rejected"] == 1
    assert done["review"]["images_reviewed"] == 1
    proposed_on = json.loads((run_dir / "engine" / "round_3" / "pseudo_labels.json").read_text())["images"]
    assert image.rel_path not in {im["file_name"] for im in proposed_on}
    assert "people's reviews (engine.review) gave 1 masks accepted" in (run_dir / "report.md").read_text()
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(_engine_args(tmp, run_dir, "engine.rounds=2", f"engine.review={tmp_path / 'none'}"),
                       cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)


def test_a_simulated_reviewer_runs_in_the_engine(tmp_path):
    """engine.review=simulated: each pseudo-label round's reviewer spends its budget on that round's proposals, its
    decisions train as labels, and the report tells the effort."""
    write_blob_dataset(tmp_path / "blobs", {"train": 8, "val": 1, "test": 2})
    run_dir = tmp_path / "runs" / "sim"
    proc = subprocess.run(_engine_args(tmp_path, run_dir, "engine.semi.enabled=false", "engine.review=simulated",
                                       "engine.simulated.budget=20", "engine.simulated.accept_iou=0.5",
                                       "engine.simulated.target_iou=0.6"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    effort = json.loads((run_dir / "engine" / "round_1" / "simulated_review.json").read_text())
    assert 0 < effort["actions"] <= 20 and effort["accepted"] + effort["fixed"] + effort["added"] >= 1
    done = json.loads((run_dir / "engine" / "round_1" / "DONE.json").read_text())
    assert done["review"]["simulated"] == effort
    assert done["n_train_images"] > 2  # the 2 labelled images and the reviewed ones
    assert "the simulated reviewer (reviewing proposals) spent" in (run_dir / "report.md").read_text()
