"""`python train.py ... trainer=ddp` with two CPU processes, and the cluster configs (SLURM, submitit)."""

from __future__ import annotations

import json
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.test_train_e2e import ROOT, run, tiny_args


def test_ddp_two_cpu_processes_train_rank_zero_alone_writes_the_report_and_the_run_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on a shared 2-core machine: one thread each
    run_dir = tmp_path / "run"
    args = tiny_args(tmp_path, run_dir, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                     "data.batch_size=1", "trainer.limit_train_batches=2", "eval.modes=[box]", "eval.overlays=0",
                     f"cache.dir={tmp_path / 'cache'}")
    proc = run(args, timeout=240)
    log = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # a second process trained
    # rank 0 evaluated the starting and the fine-tuned model and wrote the report, once
    assert log.count("Report written to") == 1
    assert log.count("zero_shot on main") == 1 and log.count("finetuned on main") == 1
    report = json.loads((run_dir / "report.json").read_text())
    assert report["finetuned"]["box"]["n"] > 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "checkpoints" / "finetuned_sam.pth").is_file()
    # both ranks used the embedding cache (decoder_only): each wrote its own images' embeddings
    assert log.count("Embedding cache (rank") == 2
    assert len(list((tmp_path / "cache").glob("*/*/*.emb"))) >= 4

    # resume=true with one more epoch: every rank restores last.ckpt and continues (2 steps per epoch)
    import torch

    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0
    proc = run([*args, "resume=true", "trainer.max_epochs=2"], timeout=240)
    log = proc.stdout + proc.stderr
    assert "Resuming in" in log and "Restored all states from the checkpoint" in log
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert (state["epoch"], state["global_step"]) == (1, 4)
    assert log.count("Report written to") == 1


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cluster_configs_compose():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # pip install -e ".[cluster]"
    ddp = compose_train("trainer=ddp", "finetune=full")
    assert ddp.trainer.strategy._target_.endswith("DDPStrategy") and ddp.trainer.strategy.find_unused_parameters is True
    assert compose_train("trainer=ddp").trainer.strategy.find_unused_parameters is False
    slurm = compose_train("trainer=slurm", "trainer.num_nodes=2", "trainer.devices=8",
                          "hydra/launcher=submitit_slurm")
    assert (slurm.trainer.accelerator, slurm.trainer.num_nodes, slurm.trainer.devices) == ("gpu", 2, 8)
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)  # follow the trainer
    local = compose_train("hydra/launcher=submitit_local")
    assert local.hydra.launcher._target_.endswith("LocalLauncher")
    sbatch = (ROOT / "scripts" / "slurm_example.sbatch").read_text()
    assert "srun python train.py" in sbatch and "trainer=slurm" in sbatch and "SLURM_JOB_ID" in sbatch
    assert OmegaConf.to_container(slurm.trainer.strategy, resolve=True)["find_unused_parameters"] is False


def test_launcher_config_prints_from_the_command_line():
    proc = run([sys.executable, str(ROOT / "train.py"), "--cfg", "job", "hydra/launcher=submitit_slurm"], timeout=60)
    assert "trainer:" in proc.stdout and "cache:" in proc.stdout
