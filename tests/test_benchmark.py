"""`scripts/benchmark.py --quick` runs every setting and prints parseable JSON lines."""

from __future__ import annotations

import json
import sys

from tests.test_train_e2e import ROOT, run

SETTINGS = {"decoder_only_uncached", "decoder_only_cached", "lora", "full", "prompts_batched", "prompts_per_prompt"}


def test_benchmark_quick_prints_one_json_line_per_setting():
    proc = run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "sam_tiny", "--images", "2",
                "--quick", "--warmup", "0", "--threads", "1"], timeout=240)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_setting = {line["setting"]: line for line in lines}
    assert set(by_setting) == SETTINGS | {"ratios"}
    for name in SETTINGS:
        line = by_setting[name]
        assert line["images_per_s"] > 0 and line["prompts_per_s"] > 0 and line["peak_mem_mb"] > 0
        assert line["peak_mem_kind"] == "rss_peak" and line["img_size"] == 256
    # the cached epoch runs no encoder, the uncached one embeds every image; every prompt is decoded
    assert by_setting["decoder_only_cached"]["images_encoded"] == 0
    assert by_setting["decoder_only_uncached"]["images_encoded"] == 2
    assert by_setting["decoder_only_cached"]["prompts"] == by_setting["decoder_only_uncached"]["prompts"] == 2 * 4
    assert by_setting["prompts_batched"]["decoder_calls"] == 1 and by_setting["prompts_per_prompt"]["decoder_calls"] == 4
    ratios = by_setting["ratios"]
    assert ratios["cached_vs_uncached"] > 0 and ratios["batched_vs_per_prompt"] > 0
    assert ratios["cached_vs_uncached_target"] == 20 and ratios["batched_vs_per_prompt_target"] == 5


def test_benchmark_zoom_reports_crops_per_encoder_call():
    """--settings zoom: the zoomed box evaluation of one image, its crops per encoder call following the budget."""
    proc = run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "sam_tiny", "--images", "1",
                "--quick", "--settings", "zoom", "--memory-budget-gb", "0.02", "--threads", "1"], timeout=240)
    (line,) = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"setting": "zoom"')]
    assert line["objects"] == line["prompts"] == line["images_encoded"] == 4
    assert line["crops_per_call"] == 2 and line["encoder_calls"] == 2 and line["memory_budget_gb"] == 0.02
    assert line["peak_mem_mb"] > 0 and 5 < line["crop_mb_estimated"] < 10


def test_gpu_check_script_never_writes_into_an_existing_folder(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "mine.txt").write_text("a user's file")
    out = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "OUT": str(tmp_path)})
    assert out.returncode == 2 and "refusing" in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
