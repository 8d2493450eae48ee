"""The checkpoint choice in which no prompt mode pays for another, on val prompts that stand for the split."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from samtune.data.sources import build_records
from samtune.evaluation.evaluator import evaluate_model
from samtune.evaluation.job import validation_prompts
from samtune.losses import SamLoss
from samtune.model import build_model
from samtune.predict.zoom import ZoomConfig
from samtune.prompts import PromptPolicy, PromptSimulator
from samtune.training.datamodule import SamDataModule
from samtune.training.module import SamTuneModule
from tests.blob_data import write_blob_dataset


def test_min_gain_is_the_smallest_gain_over_the_validated_modes(tmp_path):
    records, _ = build_records("folder", write_blob_dataset(tmp_path / "blobs", {"val": 2}, size=(96, 128)), "val")
    model = build_model("sam_tiny")
    module = SamTuneModule(
        model, simulator=PromptSimulator(PromptPolicy()), loss=SamLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4), mode="decoder_only",
    )
    prompts = validation_prompts(records, seed=0, binary_as_one_object=False, max_per_image=2)
    zoom = ZoomConfig(context=2.0)
    modes = ["box", "point1", "point3"]
    start = {"box": 0.5, "point1": 0.2, "point3": 0.9}
    with pytest.raises(ValueError, match="start figures"):
        module.use_zoomed_validation(records, prompts, zoom, modes=modes, start={"box": 0.5})
    module.use_zoomed_validation(records, prompts, zoom, modes=modes, start=start)
    data = SamDataModule(records, records, img_size=model.img_size, augment="none", batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (logged,) = trainer.validate(module, datamodule=data, verbose=False)
    zoomed = evaluate_model(model, records, prompts, name="x", modes=modes, zoom=zoom)
    gains = {m: zoomed.summary[m]["miou"] - start[m] for m in modes}
    for m in modes:
        assert logged[f"val/miou_{m}"] == pytest.approx(zoomed.summary[m]["miou"], abs=1e-6)
        assert logged[f"val/gain_{m}"] == pytest.approx(gains[m], abs=1e-6)
    assert logged["val/min_gain"] == pytest.approx(min(gains.values()), abs=1e-6)
    assert logged["val/miou"] == pytest.approx(sum(zoomed.summary[m]["miou"] for m in modes) / 3, abs=1e-6)


def test_validation_prompts_are_a_seeded_sample_of_all_instances(tmp_path):
    records, _ = build_records("folder", write_blob_dataset(tmp_path / "blobs", {"val": 6}, size=(96, 128)), "val")
    every = validation_prompts(records, seed=0, binary_as_one_object=False, max_per_image=100)
    one = validation_prompts(records, seed=0, binary_as_one_object=False, max_per_image=1)
    again = validation_prompts(records, seed=0, binary_as_one_object=False, max_per_image=1)
    assert one == again
    picked = [p[0]["instance"] for p in one.values()]
    firsts = [p[0]["instance"] for p in every.values()]
    assert all(p in [q["instance"] for q in every[k]] for k, p in zip(one, picked))
    assert picked != firsts  # not always the first instance by id (6 images, 2-3 instances each)
