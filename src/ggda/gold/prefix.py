"""Further training (and scoring) of a model with a frozen prefix on its cached prefix states.

A text run's model (``ggda text-train``: MiniLM + head, the encoder frozen except its last
``train_layers`` layers) is attributed and further-trained only through its tail; the frozen
layers never change, so their outputs are a fixed function of the input. Running the tail on
rows ``[hidden after the frozen layers | attention mask]`` (:func:`ggda.models.text.prefix_dataset`,
the same rows text fine-tuning trains on) gives the same losses, the same gradients and the same
further-training trajectory as the whole classifier, at the cost of the tail alone. Without it
every further-training step of every run would push its batch through the frozen encoder again
(measured: 11 s per run on 96 reviews for one epoch, under contention), which is what made text
runs impractical for ``ggda gold``.

:func:`frozen_prefix_view` is the one switch: a task whose model has no frozen prefix is
returned unchanged, so the gold standard, ``ggda compare`` and the reproduction grid call it
unconditionally.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from ggda.data.dataset import Dataset
from ggda.task import AttributionTask


def has_frozen_prefix(task: AttributionTask) -> bool:
    """True for a text classifier (``ggda.models.text.TextClassifier``) attributed through all of
    its trainable parameters: the tail then holds every parameter that further training moves."""
    text = sys.modules.get("ggda.models.text")  # imported whenever such a model exists
    if text is None or not isinstance(task.model, text.TextClassifier):
        return False
    trainable = [n for n, p in task.model.named_parameters() if p.requires_grad]
    return task.param_names == trainable


def frozen_prefix_view(
    task: AttributionTask, *datasets: Dataset, batch_size: int = 64
) -> tuple[AttributionTask, tuple[Dataset, ...]]:
    """``(task, datasets)`` seen through the frozen prefix: the tail's task and each dataset as
    prefix rows (same ids and labels); unchanged when the model has no frozen prefix.

    The tail shares the classifier's parameters, so the tail task's gradients are the
    classifier's for the same parameters (under the tail's names), and attribution scores and
    further-training runs are those of the whole model.
    """
    if not has_frozen_prefix(task):
        return task, datasets
    from ggda.models.text import prefix_dataset

    model = task.model
    views = tuple(
        replace(prefix_dataset(model, d, batch_size=batch_size, device=task.device), name=d.name)
        for d in datasets
    )
    tail = AttributionTask(
        model.tail(),
        loss=task.loss_fn,
        device=task.device,
        loss_kind=task.loss_kind,
        gradients=task.gradients,
    )
    return tail, views
