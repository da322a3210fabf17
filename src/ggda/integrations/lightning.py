"""A PyTorch Lightning callback that records checkpoints and learning rates for ggda.

Usage::

    from ggda.integrations.lightning import GGDACheckpointCallback
    trainer = lightning.Trainer(max_epochs=3, callbacks=[GGDACheckpointCallback("runs/pl")])
    trainer.fit(module, train_loader)
    checkpoints = load_checkpoints("runs/pl", module)       # from ggda.integrations
    make_method("tracin", AttributionTask(module, ...), checkpoints=checkpoints)

Built on ``lightning.pytorch.Callback`` (the ``lightning`` package), or on
``pytorch_lightning.Callback`` where only ``pytorch-lightning`` is installed (``pip install
'ggda[lightning]'``). State-dict keys are the LightningModule's own (``net.0.weight`` for a
module that holds ``self.net``), so attribute through that same module.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ggda.errors import GGDAError
from ggda.integrations.checkpoints import CheckpointRecorder

try:
    from lightning.pytorch import Callback
except ImportError:
    try:
        from pytorch_lightning import Callback
    except ImportError as exc:  # the base install has no Lightning: say which extra brings it
        raise GGDAError(
            "ggda.integrations.lightning needs PyTorch Lightning; pip install 'ggda[lightning]'."
        ) from exc

__all__ = ["GGDACheckpointCallback"]


class GGDACheckpointCallback(Callback):
    """Save the trainable parameters (or ``layers``) and the learning rate every ``every`` epochs
    or optimizer steps into ``run_dir``, for TracIn and TRAK ensembles.

    Args are those of :class:`ggda.integrations.CheckpointRecorder`. Steps are
    ``trainer.global_step`` (optimizer steps); only global rank 0 writes. The rate is read in
    ``on_before_optimizer_step``: Lightning steps a per-step scheduler before
    ``on_train_batch_end``, so the optimizer shows the next step's rate there.
    """

    def __init__(
        self,
        run_dir: str | Path,
        every: int = 1,
        unit: str = "epoch",
        layers: Iterable[str] | None = None,
        final: bool = True,
    ) -> None:
        super().__init__()
        self.recorder = CheckpointRecorder(run_dir, every, unit, layers, final, trainer="lightning.Trainer")

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.recorder.begin(resume_step=trainer.global_step)  # > 0 when fit resumes from ckpt_path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.recorder.note_lr(optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and self.recorder.due(step, "step") and self.recorder.last_step != step:
            self.recorder.save(pl_module, step, self._epoch(trainer, batch_idx))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if trainer.is_global_zero and self.recorder.due(epoch, "epoch"):
            self.recorder.save(pl_module, trainer.global_step, float(epoch))

    def on_train_end(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and self.recorder.final and self.recorder.last_step != step and step > 0:
            self.recorder.save(pl_module, step, float(trainer.current_epoch))

    @staticmethod
    def _epoch(trainer, batch_idx: int) -> float:
        """Fractional epoch after batch ``batch_idx`` (as the HF Trainer reports it)."""
        n = trainer.num_training_batches
        if isinstance(n, (int, float)) and 0 < n < float("inf"):
            return trainer.current_epoch + (batch_idx + 1) / n
        return float(trainer.current_epoch)
