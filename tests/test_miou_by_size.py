"""scripts/miou_by_size.py (mIoU per object-size bin from instances.jsonl) and the large-object generator."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np

from samtune.data.synthetic_large import render_large

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("miou_by_size", ROOT / "scripts" / "miou_by_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_miou_by_size_bins_each_instance_by_its_area(tmp_path):
    data = tmp_path / "data"
    (data / "test" / "images").mkdir(parents=True)
    (data / "test" / "masks").mkdir(parents=True)
    ids = np.zeros((100, 100), np.uint8)
    ids[0:5, 0:5] = 1  # 0.25 %
    ids[10:30, 10:30] = 2  # 4 %
    ids[40:100, 40:100] = 3  # 36 %
    cv2.imwrite(str(data / "test" / "images" / "a.png"), np.zeros((100, 100, 3), np.uint8))
    cv2.imwrite(str(data / "test" / "masks" / "a.png"), ids)
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"meta": {"data_root": str(data), "split": "test"}}))
    (run / "config_resolved.yaml").write_text("data:\n  source: folder\n  binary_as_one_object: false\n")
    rows = [{"model": "zero_shot", "mode": mode, "image": "test/images/a.png", "instance": k, "iou": iou}
            for mode, ious in (("point1", (0.2, 0.4, 0.9)), ("box", (1.0, 1.0, 1.0))) for k, iou in zip((1, 2, 3), ious)]
    (run / "instances.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = _script()
    result = script.miou_by_size(run, ["point1"], [0.01, 0.05, 0.25])
    assert list(result) == [("zero_shot", "point1")]
    cells = result[("zero_shot", "point1")]
    assert [n for _, n in cells] == [1, 1, 0, 1, 3]
    assert [round(m, 3) for m, n in cells if n] == [0.2, 0.4, 0.9, 0.5]
    text = script.table([("x", run)], ["point1"], [0.01, 0.05, 0.25])
    assert "| <1% | 1-5% | 5-25% | >25% | all |" in text and "| x | zero_shot | point1 | 0.200 (1) |" in text


def test_large_object_images_have_objects_over_a_quarter_of_the_image():
    fractions = []
    for i in range(12):
        image, instances = render_large(np.random.default_rng([0, 2, i]))
        assert image.shape[:2] == instances.shape and image.dtype == np.uint8
        fractions += (np.bincount(instances.ravel())[1:] / instances.size).tolist()
    fractions = np.asarray(fractions)
    assert (fractions > 0.25).sum() >= 6 and (fractions < 0.01).sum() >= 6  # large objects beside small ones
    again = render_large(np.random.default_rng([0, 2, 3]))
    assert np.array_equal(again[1], render_large(np.random.default_rng([0, 2, 3]))[1])
