"""Lightning callbacks."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class LatestCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that also saves when training ends between its save points.

    With ``every_n_train_steps=250`` and ``trainer.max_steps=3400``, Lightning's own callback last saves at step
    3250 and the final 150 steps exist nowhere a later ``resume=true`` could continue from. This one writes the
    final state too. It only does so without a ``monitor`` (a latest-state checkpoint such as ``last.ckpt``): a
    monitored checkpoint keeps the best validation score, which the training end does not have.
    """

    @property
    def state_key(self) -> str:
        # Lightning keys a callback's state in the checkpoint by class name. Keep ModelCheckpoint's key, so
        # checkpoints written by either class restore each other's best score and paths on resume.
        return ModelCheckpoint.state_key.fget(self).replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.monitor is None and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


class SnapshotCheckpoint(LatestCheckpoint):
    """A :class:`LatestCheckpoint` for keeping every save point (``save_top_k=-1``), e.g. for checkpoint averaging.

    Its state is keyed by its own class name: the state key of a checkpoint callback without a monitor would
    otherwise be the same as ``last.ckpt``'s, which Lightning refuses.
    """

    @property
    def state_key(self) -> str:
        return ModelCheckpoint.state_key.fget(self)
