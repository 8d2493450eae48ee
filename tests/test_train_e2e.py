"""`python train.py ...` as a user runs it, on a tiny generated dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest

ROOT = Path(__file__).resolve().parents[1]


class StepProbe(L.Callback):
    """A test callback that a run picks up from the command line (``+callbacks.probe._target_=...``, see
    :func:`probe_args`): it appends ``start <global step>`` when training starts in this process and ``end <step>``
    when it ends to the file ``log``, and, with ``pause_at``, stops the run when it is about to train that step
    (every checkpoint of the steps before it written): it appends ``paused <step>``, creates ``marker`` and waits
    there to be killed, so a test kills a live run at a known step without timing guesses. It pauses only while
    ``marker`` does not exist, so the same command run again (the resume) goes on."""

    def __init__(self, log: str, pause_at: int | None = None, marker: str | None = None,
                 timeout_s: float = 600.0) -> None:
        self.log_path, self.pause_at, self.timeout_s = Path(log), pause_at, timeout_s
        self.marker = Path(marker) if marker else None

    def _note(self, text: str) -> None:
        with self.log_path.open("a") as f:
            f.write(text + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        self._note(f"start {trainer.global_step}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.pause_at or self.marker is None or self.marker.exists():
            return
        self._note(f"paused {trainer.global_step}")
        self.marker.write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:  # the test kills the process here
            time.sleep(0.1)
        raise RuntimeError(f"StepProbe: paused at step {self.pause_at} for {self.timeout_s}s and was never killed")

    def on_train_end(self, trainer, pl_module) -> None:
        self._note(f"end {trainer.global_step}")


def probe_args(log: str | Path, pause_at: int | None = None, marker: str | Path | None = None) -> list[str]:
    """Overrides that add :class:`StepProbe` to a run's callbacks (``log`` may be an interpolation such as
    ``${paths.output_dir}/probe.log``)."""
    args = [f"+callbacks.probe._target_={__name__}.StepProbe", f"+callbacks.probe.log={log}"]
    if pause_at is not None:
        args += [f"+callbacks.probe.pause_at={pause_at}", f"+callbacks.probe.marker={marker}"]
    return args


def probe_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.is_file() else []


def start_paused_run(args: list[str], output: Path, **kwargs) -> subprocess.Popen:
    """Start ``args`` (a run with :func:`probe_args`' pause) in the background, its stdout and stderr to ``output``."""
    with output.open("wb") as out:
        return subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)


def kill_when_paused(proc: subprocess.Popen, marker: Path, output: Path, timeout: float = 300, *,
                     group: bool = False) -> None:
    """Wait until the run started as ``proc`` pauses (:class:`StepProbe` creates ``marker``), check that it is still
    alive, and SIGKILL it (its whole process group with ``group``)."""
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), (f"the run never reached its pause step (exit code {proc.poll()}):\n"
                             + output.read_text(errors="replace")[-3000:])
    assert proc.poll() is None, "the run had exited before it was killed"
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # it died of the signal, not of its own accord


# the cached, whole-image recipe, for tests of the run machinery (resume, DDP, evaluation modes) that do not need
# experiment=pcb's own zoomed, whole-model fine-tune; recipe=True runs that one (test_train_writes_the_report)
CACHED = ("finetune=decoder_only", "eval.zoom=null", "data.zoom_crop=null")


def tiny_args(tmp_path: Path, run_dir: Path, *extra: str, recipe: bool = False) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "experiment=pcb", "debug=tiny",
        f"data.root={tmp_path / 'pcb'}", "data.generator_params.n_train=4", "data.generator_params.n_val=2",
        "data.generator_params.n_test=2", "data.batch_size=2", "data.max_instances=4",
        "prompts.correction_rounds=1", f"hydra.run.dir={run_dir}", *(() if recipe else _unless_given(CACHED, extra)),
        *extra,
    ]


def _unless_given(defaults: tuple[str, ...], extra: tuple[str, ...]) -> list[str]:
    """``defaults`` whose keys ``extra`` does not set (Hydra refuses two values for one config group)."""
    given = {e.split("=", 1)[0].lstrip("+~") for e in extra}
    return [d for d in defaults if d.split("=", 1)[0] not in given]


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    run_dir = tmp / "run"
    run(tiny_args(tmp, run_dir, recipe=True))
    return tmp, run_dir


def test_train_writes_the_report(trained_run):
    _, run_dir = trained_run
    report = json.loads((run_dir / "report.json").read_text())
    for name in ("zero_shot", "finetuned"):
        assert set(report[name]) == {"box", "point1", "point3"}
        for mode in report[name].values():
            assert 0.0 <= mode["miou"] <= 1.0 and 0.0 <= mode["dice"] <= 1.0 and mode["n"] > 0
    assert report["skipped_files"] == []
    rows = [json.loads(line) for line in (run_dir / "instances.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"zero_shot", "finetuned"}
    row = rows[0]
    assert set(row) >= {"model", "mode", "image", "instance", "prompt", "iou", "pred_iou"}
    assert row["image"].startswith("test/images/")
    n = report["zero_shot"]["box"]["n"]
    assert len(rows) == 2 * 3 * n
    md = (run_dir / "report.md").read_text()
    assert "zero_shot mIoU" in md and "finetuned mIoU" in md and "overlays/" in md
    assert list((run_dir / "overlays").glob("*.png"))
    assert (run_dir / "prompts.json").is_file() and (run_dir / "config_resolved.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "finetuned_sam.pth").is_file()
    # experiment=pcb's recipe: zoomed evaluation, zoom-crop training, the whole model adapted
    assert "prompt-focused zoom" in md
    resolved = (run_dir / "config_resolved.yaml").read_text()
    assert "mode: full" in resolved and "zoom_crop:\n    prob: 0.7" in resolved


def test_same_prompts_reused_and_train_false_evaluates_only(trained_run, tmp_path):
    tmp, run_dir = trained_run
    ckpt = run_dir / "checkpoints" / "finetuned_sam.pth"
    out = tmp_path / "eval_only"
    run(tiny_args(tmp, out, "train=false", f"model.checkpoint={ckpt}", f"eval.prompts_file={run_dir / 'prompts.json'}",
                  "eval.save_masks=true", recipe=True))
    report = json.loads((out / "report.json").read_text())
    assert "finetuned" not in report
    # The exported fine-tuned weights, evaluated on the same prompts, give the fine-tuned numbers.
    trained = json.loads((run_dir / "report.json").read_text())
    for mode in ("box", "point1", "point3"):
        assert report["zero_shot"][mode]["miou"] == pytest.approx(trained["finetuned"][mode]["miou"], abs=1e-4)
    row = json.loads((out / "instances.jsonl").read_text().splitlines()[0])
    assert set(row["mask_rle"]) == {"size", "counts"}


def test_killed_run_resumes_from_last_checkpoint(tmp_path):
    """A run killed (SIGKILL) in its second epoch, one step after last.ckpt was written, continues from that step with
    ``resume=true``: the resumed process starts training at last.ckpt's step (not 0) and ends at the full count."""
    import torch

    run_dir = tmp_path / "run"
    log, marker = tmp_path / "probe.log", tmp_path / "paused"
    # 3 epochs of 2 steps; last.ckpt is written at the end of each epoch (steps 2, 4, 6); the first process is
    # killed when about to train step 4, i.e. with step 3 trained but not checkpointed
    args = tiny_args(tmp_path, run_dir, "trainer.max_epochs=3", "trainer.limit_train_batches=2",
                     *probe_args(log, pause_at=3, marker=marker))
    proc = start_paused_run(args, tmp_path / "killed.out")
    try:
        kill_when_paused(proc, marker, tmp_path / "killed.out")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert probe_lines(log) == ["start 0", "paused 3"]
    last = run_dir / "checkpoints" / "last.ckpt"
    killed = torch.load(last, map_location="cpu", weights_only=False)
    assert (killed["epoch"], killed["global_step"]) == (0, 2)  # the end of epoch 0, the step the resume starts at
    assert not (run_dir / "report.json").exists()

    resumed = run([*args, "resume=true"])
    assert probe_lines(log)[2:] == ["start 2", "end 6"]  # continued from last.ckpt's step 2 to the full 6
    log_text = resumed.stdout + resumed.stderr
    assert "Resuming in" in log_text and "Restored all states from the checkpoint" in log_text
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert (final["epoch"], final["global_step"]) == (2, 6)
    assert json.loads((run_dir / "report.json").read_text())["finetuned"]["box"]["n"] > 0


def test_last_checkpoint_holds_the_final_step_between_save_points(tmp_path):
    """max_steps=3 with a save every 2 steps: last.ckpt holds step 3 (not 2), and a resume continues from it.

    With callbacks.snapshots.save_top_k=-1 every save point is kept too, and export averages them.
    """
    import torch

    from samtune.model.export import export_state_dict

    run_dir = tmp_path / "run"
    args = tiny_args(tmp_path, run_dir, "trainer.max_epochs=-1", "trainer.limit_train_batches=2",
                     "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.snapshots.save_top_k=-1")
    run([*args, "trainer.max_steps=3"])
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3
    run([*args, "trainer.max_steps=4", "resume=true"])
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    # experiment=pcb trains the IoU head at 10x (groups of its own): a resume at 1x would not fit the saved optimizer
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    refused = subprocess.run([*args, "trainer.max_steps=5", "resume=true", "finetune.iou_head_lr_mult=1"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode != 0
    assert "saved with finetune.iou_head_lr_mult=10, this run uses 1" in refused.stdout + refused.stderr
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    # each resume with other settings kept the resolved config it replaced
    kept = [(run_dir / f"config_resolved.{k}.yaml").read_text() for k in (1, 2)]
    assert "max_steps: 3" in kept[0] and "max_steps: 4" in kept[1] and "iou_head_lr_mult: 10.0" in kept[1]
    assert "max_steps: 5" in (run_dir / "config_resolved.yaml").read_text()
    snapshots = sorted((run_dir / "checkpoints" / "snapshots").glob("*.ckpt"))
    assert [p.name for p in snapshots] == ["step_000002.ckpt", "step_000003.ckpt", "step_000004.ckpt"]
    _, averaged = export_state_dict(snapshots[1:], tmp_path / "avg.pth")
    _, first = export_state_dict(snapshots[1], tmp_path / "3.pth")
    _, second = export_state_dict(snapshots[2], tmp_path / "4.pth")
    key = "mask_decoder.output_upscaling.0.weight"
    assert not torch.equal(first[key], second[key])
    torch.testing.assert_close(averaged[key], (first[key] + second[key]) / 2)


def test_zoomed_run_validates_on_zoomed_views(tmp_path):
    """eval.zoom: validation (the best-checkpoint choice) runs the zoomed evaluation the report uses."""
    run_dir = tmp_path / "run"
    proc = run(tiny_args(tmp_path, run_dir, "eval.zoom=2", "eval.modes=[box,point3]", "eval.select=min_gain"))
    log = proc.stdout + proc.stderr
    assert "Validation evaluates box/point3 prompts with prompt-focused zoom: crop of 2x" in log
    assert "Starting model on val: box " in log
    header = next((run_dir / "csv").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    for key in ("val/miou_box", "val/miou_point3", "val/gain_box", "val/gain_point3", "val/min_gain"):
        assert key in header
    assert "val/miou_point1" not in header
    # the best checkpoint is chosen by the smallest gain over the validated modes
    assert "(val/min_gain=" in log
    assert "prompt-focused zoom" in (run_dir / "report.md").read_text()


def test_training_without_a_validation_split(tmp_path):
    """``data.val_split=null``: no validation, the checkpoint of the final epoch is last.ckpt and is evaluated."""
    run_dir = tmp_path / "run"
    proc = run(tiny_args(tmp_path, run_dir, "data.val_split=null", "trainer.max_epochs=2"))
    import torch

    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 1
    log = proc.stdout + proc.stderr
    assert "val/miou" not in log and "Evaluating the final checkpoint" in log and "epoch_001.ckpt" in log
    assert json.loads((run_dir / "report.json").read_text())["finetuned"]["box"]["n"] > 0


def test_bf16_autocast_run_with_the_embedding_cache(tmp_path):
    """What `trainer=gpu` runs (precision=auto is bf16-mixed there), here on a CPU: the cached decoder-only recipe
    trains and evaluates under bf16 autocast (float16 cache entries once reached torch.stack there and failed)."""
    run_dir = tmp_path / "run"
    proc = run(tiny_args(tmp_path, run_dir, "trainer.precision=bf16-mixed", f"cache.dir={tmp_path / 'cache'}",
                         "eval.modes=[box]"))
    assert "Using bfloat16 Automatic Mixed Precision" in proc.stdout + proc.stderr
    assert any((tmp_path / "cache").rglob("*.emb"))  # the run went through the cache
    assert json.loads((run_dir / "report.json").read_text())["finetuned"]["box"]["n"] > 0
