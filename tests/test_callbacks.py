"""samtune's Lightning callbacks."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint

from samtune.training.callbacks import LatestCheckpoint


def test_latest_checkpoint_restores_the_state_of_plain_model_checkpoints():
    """Checkpoints written with Lightning's ModelCheckpoint (samtune before LatestCheckpoint) resume with their
    best score and paths: the callback state is stored under the same key."""
    for kwargs in ({"monitor": "val/miou", "mode": "max", "every_n_train_steps": 250},
                   {"monitor": None, "every_n_train_steps": 250, "save_last": True}):
        assert LatestCheckpoint(**kwargs).state_key == ModelCheckpoint(**kwargs).state_key
        assert LatestCheckpoint(**kwargs).state_key.startswith("ModelCheckpoint{")
