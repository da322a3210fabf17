"""A Hugging Face ``Trainer`` callback that records checkpoints and learning rates for ggda.

Usage::

    from ggda.integrations.hf_trainer import GGDACheckpointCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[GGDACheckpointCallback("runs/hf")])
    trainer.train()
    checkpoints = load_checkpoints("runs/hf", model)        # from ggda.integrations
    make_method("tracin", AttributionTask(model, ...), checkpoints=checkpoints)

Needs ``transformers`` and ``accelerate`` (``pip install 'ggda[hf]'``); see
:mod:`ggda.integrations.checkpoints` for what is written and how it is read back.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ggda.errors import GGDAError
from ggda.integrations.checkpoints import CheckpointRecorder

try:
    from transformers import TrainerCallback
except ImportError as exc:  # the base install has no transformers: say which extra brings it
    raise GGDAError(
        "ggda.integrations.hf_trainer needs transformers and accelerate; pip install 'ggda[hf]'."
    ) from exc

__all__ = ["GGDACheckpointCallback"]


class GGDACheckpointCallback(TrainerCallback):
    """Save the trainable parameters (or ``layers``) and the learning rate every ``every`` epochs
    or optimizer steps into ``run_dir``, for TracIn and TRAK ensembles.

    Args are those of :class:`ggda.integrations.CheckpointRecorder`. Only the main process
    writes (``state.is_world_process_zero``); steps are the Trainer's ``global_step`` (optimizer
    steps, so gradient accumulation counts once per update).
    """

    def __init__(
        self,
        run_dir: str | Path,
        every: int = 1,
        unit: str = "epoch",
        layers: Iterable[str] | None = None,
        final: bool = True,
    ) -> None:
        self.recorder = CheckpointRecorder(
            run_dir, every, unit, layers, final, trainer="transformers.Trainer"
        )

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.recorder.begin(resume_step=state.global_step)  # > 0 with resume_from_checkpoint

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # after optimizer.step(), before lr_scheduler.step(): the rate this step used
        self.recorder.note_lr(optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.is_world_process_zero and self.recorder.due(state.global_step, "step"):
            self.recorder.save(model, state.global_step, state.epoch, optimizer)

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        epoch = round(state.epoch or 0)
        if state.is_world_process_zero and self.recorder.due(epoch, "epoch"):
            self.recorder.save(model, state.global_step, state.epoch, optimizer)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        done = self.recorder.last_step == state.global_step
        if state.is_world_process_zero and self.recorder.final and not done and state.global_step > 0:
            self.recorder.save(model, state.global_step, state.epoch, optimizer)
