"""Checkpoints from the trainers people use, for TracIn and TRAK ensembles.

``GGDACheckpointCallback`` in :mod:`ggda.integrations.hf_trainer` (Hugging Face ``Trainer``) and
:mod:`ggda.integrations.lightning` (PyTorch Lightning) record the trained parameters and the
learning rate at chosen epochs or steps into a directory; :func:`load_checkpoints` reads it back
as the ``(state, lr)`` pairs ``make_method("tracin", task, checkpoints=...)`` takes. The callback
modules import their framework; this package does not (the base install has neither).
"""

from ggda.integrations.checkpoints import (
    INDEX_FILE,
    CheckpointRecorder,
    SavedCheckpoint,
    load_checkpoints,
    read_index,
)

__all__ = ["INDEX_FILE", "CheckpointRecorder", "SavedCheckpoint", "load_checkpoints", "read_index"]
