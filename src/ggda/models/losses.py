"""Per-example losses. Everything in ggda works with *per-example* losses (shape (B,)); the
training objective is their (weighted) mean, group losses are their sums."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ggda.errors import GGDAError

PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets.long(), reduction="none")


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * (outputs.reshape(targets.shape) - targets.to(outputs.dtype)) ** 2


LOSSES: dict[str, PerExampleLoss] = {"cross-entropy": cross_entropy, "mse": squared_error}
LOSS_KINDS = ("cross-entropy", "squared-error", "custom")


def loss_kind_of(loss: PerExampleLoss) -> str:
    """The closed-form kind of a loss: ggda's own, or an unweighted per-example
    ``nn.CrossEntropyLoss``; anything else is ``"custom"`` (declare it with ``loss_kind=``)."""
    if loss is cross_entropy:
        return "cross-entropy"
    if loss is squared_error:
        return "squared-error"
    if (
        isinstance(loss, torch.nn.CrossEntropyLoss)
        and loss.reduction == "none"
        and loss.weight is None
        and loss.label_smoothing == 0.0
    ):
        return "cross-entropy"
    return "custom"


def loss_for(kind: str) -> PerExampleLoss:
    """Default per-example loss for a data-set kind (classification/regression) or a loss name."""
    if kind == "classification":
        return cross_entropy
    if kind == "regression":
        return squared_error
    if kind in LOSSES:
        return LOSSES[kind]
    if kind == "squared-error":
        return squared_error
    raise GGDAError(f"Unknown loss '{kind}'; choose one of {', '.join(LOSSES)} or pass a callable.")
