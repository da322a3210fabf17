"""How a batch reaches a model, in one place: ``model(x)``, ``model(*x)`` or ``model(**x)``.

Why one place: the attribution task's functional forward, the training loop, prediction and the
retraining jobs must all call a user's model the way the user's own code does, or a model fed
token ids and attention masks (a dict) would see different inputs in different stages.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ggda.errors import GGDAError


def call_args(batch: Any) -> tuple[tuple, dict]:
    """(args, kwargs) of a model call on ``batch``: a dict becomes keywords, a tuple positionals."""
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def model_output(out: Any) -> torch.Tensor:
    """The output tensor of a model call: Hugging Face outputs give ``.logits``, tuples their first."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise GGDAError(
        f"The model returned {type(out).__name__}; return a tensor (or an object with .logits), or "
        "subclass AttributionTask and override forward()."
    )


def call_model(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model`` applied to one batch, as the user's own loop would call it."""
    args, kwargs = call_args(batch)
    return model_output(model(*args, **kwargs))
