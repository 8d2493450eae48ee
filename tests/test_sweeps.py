"""Sweeps: a Hydra grid multirun and an Optuna search of tiny runs, each run with its own report, and the summary."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from samtune.evaluation.sweep_summary import write_summary
from tests.blob_data import blob_args, write_blob_dataset
from tests.test_train_e2e import run, tiny_args

# fast_dev_run: one training and one validation batch per run (no correction rounds, a 2-block encoder), then
# the box-prompt evaluation; random weights, since the shipped generalist does not fit a 2-block encoder
FAST = ["debug=fast", "eval.modes=[box]", "eval.overlays=0", "eval.worst=0", "data.max_instances=2",
        "prompts.correction_rounds=0", "prompts.mask_only_rounds=0", "model.checkpoint=null",
        "+model.arch.encoder_depth=2", "+model.arch.encoder_global_attn_indexes=[1]"]


def _multirun(tmp_path, sweep_dir, *extra):
    data = write_blob_dataset(tmp_path / "blobs", {"train": 2, "val": 1, "test": 1})
    args = tiny_args(tmp_path, tmp_path / "unused", *blob_args(data), *FAST, f"hydra.sweep.dir={sweep_dir}", *extra)
    args.insert(2, "-m")
    return run(args)


def _check_runs(sweep_dir, n):
    runs = sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())
    assert len(runs) == n
    for r in runs:  # every run keeps its own report, config and metrics
        report = json.loads((r / "report.json").read_text())
        assert report["finetuned"]["box"]["n"] > 0
        assert (r / "config_resolved.yaml").is_file() and (r / "instances.jsonl").is_file()
        metrics = json.loads((r / "metrics.json").read_text())
        assert metrics["val/miou"] is not None and "test/finetuned/box_miou" in metrics
    return runs


def _check_summary(sweep_dir, n):
    paths = write_summary(sweep_dir)
    assert {p.name for p in paths.values()} == {"summary.md", "summary.csv", "summary.png"}
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == n and [r["rank"] for r in rows] == [str(i) for i in range(1, n + 1)]
    values = [float(r["val/miou"]) for r in rows]
    assert values == sorted(values, reverse=True) and not any(math.isnan(v) for v in values)
    assert all(r["status"] == "done" and r["test ft box mIoU"] for r in rows)
    return rows, paths["md"].read_text()


def test_grid_multirun_and_summary(tmp_path):
    sweep = tmp_path / "grid"
    _multirun(tmp_path, sweep, "optimizer.lr=1e-4,1e-5")
    _check_runs(sweep, 2)
    rows, md = _check_summary(sweep, 2)
    assert sorted(r["overrides"] for r in rows) == ["optimizer.lr=0.0001", "optimizer.lr=1e-05"]
    assert "Common overrides" in md and "data.generator=null" in md and "| 1 |" in md


def test_optuna_search_and_summary(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    _multirun(tmp_path, sweep, "hparams_search=pcb_optuna", "hydra.sweeper.n_trials=2",
              "hydra.sweeper.sampler.n_startup_trials=2")
    _check_runs(sweep, 2)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # searched: lr, weight decay, box probability; correction_rounds and augment are fixed by the command line
    assert set(best["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "prompts.box_prob"}
    rows, md = _check_summary(sweep, 2)
    assert "Optuna's best parameters" in md
    assert all("optimizer.lr=" in r["overrides"] for r in rows)
    assert float(rows[0]["val/miou"]) == pytest.approx(best["best_value"], abs=1e-4)
