"""Property functions f(θ): the model behaviour being attributed (GGDA Definition 3).

Orientation convention: every property is expressed as a *cost* (lower = better), so that for
every method a **positive score means helpful** — removing the unit would raise the cost. Loss
properties are costs already; "higher-is-better" quantities such as the correct-class margin are
negated internally (documented per class). A property has ``n_targets`` outputs; scores have one
row per target.

- :class:`ExampleLoss` — one target per test example: its loss (classic per-test attribution).
- :class:`MeanLoss` — one target: the mean loss over a test set (the model-level property GGDA
  uses for retraining scores).
- :class:`Margin` — one target per example: the negated correct-class margin
  ``-(z_y - logsumexp_{c≠y} z_c)`` (TRAK's output function).
- :class:`CallableProperty` — any user function of the model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch

from ggda.data.batches import as_inputs, iter_rows
from ggda.errors import GGDAError
from ggda.task import AttributionTask, Params


class Property(ABC):
    """A vector of ``n_targets`` cost-oriented scalar functions of the parameters."""

    name: str = "property"

    @property
    @abstractmethod
    def n_targets(self) -> int: ...

    @abstractmethod
    def values(self, task: AttributionTask, params: Params | None = None) -> torch.Tensor:
        """(n_targets,) cost-oriented values at ``params`` (default: the task's current model)."""

    @abstractmethod
    def gradients(
        self, task: AttributionTask, params: Params | None = None, chunk_size: int = 512
    ) -> torch.Tensor:
        """(n_targets, p) gradients of :meth:`values` w.r.t. the attributed parameters."""


def target_data(X, y) -> tuple:
    """Target inputs and labels from arrays, or from any data source (``y`` omitted): a ggda
    ``Dataset``, torch ``Dataset``/``DataLoader`` or Hugging Face dataset (read lazily)."""
    if y is None:
        from ggda.data.sources import as_dataset

        data = as_dataset(X)
        X, y = data.X, data.y
    X, y = as_inputs(X), np.asarray(y)
    if len(X) != len(y):
        raise GGDAError(f"Targets: X has {len(X)} rows but y has {len(y)}; pass one label per row.")
    if len(X) == 0:
        raise GGDAError("The property needs at least one target example.")
    return X, y


class ExampleProperty(Property):
    """A property that is one per-example function over a set of target examples.

    ``X, y``: target inputs and labels, or one data source as ``X`` (``ExampleLoss(test_loader)``).
    """

    chunk_size: int = 1024

    def __init__(self, X, y: np.ndarray | None = None) -> None:
        self.X, self.y = target_data(X, y)

    @property
    def n_targets(self) -> int:
        return len(self.y)

    @abstractmethod
    def example_value(self, task: AttributionTask, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) cost-oriented value per example from model outputs."""

    def example_fn(self, task: AttributionTask) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda out, y: self.example_value(task, out, y)

    def values(self, task: AttributionTask, params: Params | None = None) -> torch.Tensor:
        params = task.params() if params is None else params
        X, y = task.to_tensor(self.X, self.y)
        with torch.no_grad():
            parts = [
                self.example_value(task, task.forward(params, xb), y[rows])
                for rows, xb in iter_rows(X, self.chunk_size)
            ]
        return torch.cat(parts)

    def gradients(
        self, task: AttributionTask, params: Params | None = None, chunk_size: int = 512
    ) -> torch.Tensor:
        from ggda.gradients.per_example import per_example_gradients

        return per_example_gradients(
            task, self.X, self.y, fn=self.example_fn(task), params=params, chunk_size=chunk_size
        )


class ExampleLoss(ExampleProperty):
    """f_t(θ) = ℓ(z_t; θ) for each target example t (the classic per-test-point target)."""

    name = "test-loss"

    def example_value(self, task, outputs, y):
        return task.loss_fn(outputs, y)


class Margin(ExampleProperty):
    """Negated correct-class margin per example (classification only); TRAK's output function."""

    name = "margin"

    def example_value(self, task, outputs, y):
        if outputs.ndim != 2 or outputs.shape[-1] < 2:
            raise GGDAError(
                "The margin property needs a classifier with >= 2 logits; use test-loss for regression."
            )
        y = y.long()
        correct = outputs.gather(-1, y[:, None])[:, 0]
        # Boolean mask by comparison, not one_hot: one_hot has no vmap batching rule.
        is_correct = torch.arange(outputs.shape[-1], device=outputs.device) == y[:, None]
        others = outputs.masked_fill(is_correct, float("-inf"))
        return -(correct - torch.logsumexp(others, dim=-1))


class MeanLoss(Property):
    """f(θ) = mean test loss over a set (one target): the model-level property of GGDA."""

    name = "mean-test-loss"

    def __init__(self, X, y: np.ndarray | None = None) -> None:
        self.inner = ExampleLoss(X, y)

    @property
    def n_targets(self) -> int:
        return 1

    def values(self, task, params=None):
        return self.inner.values(task, params).mean()[None]

    def gradients(self, task, params=None, chunk_size=512):
        from ggda.gradients.group import summed_gradient

        g = summed_gradient(task, self.inner.X, self.inner.y, params=params, chunk_size=chunk_size)
        return (g / self.inner.n_targets)[None]


class CallableProperty(Property):
    """Any user function ``fn(forward) -> Tensor (T,)`` where ``forward(X)`` runs the model.

    Set ``higher_is_better=True`` for accuracy-like quantities: they are negated so positive
    scores still mean helpful.
    """

    def __init__(
        self,
        fn: Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor],
        higher_is_better: bool = False,
        name: str = "custom",
    ) -> None:
        self.fn, self.sign, self.name = fn, (-1.0 if higher_is_better else 1.0), name
        self._n: int | None = None

    def _eval(self, task: AttributionTask, params: Params) -> torch.Tensor:
        out = self.fn(lambda X: task.forward(params, task.batch(X)))
        out = torch.as_tensor(out).reshape(-1)
        return self.sign * out

    @property
    def n_targets(self) -> int:
        if self._n is None:
            raise GGDAError("Evaluate the custom property once (values/gradients) before asking n_targets.")
        return self._n

    def values(self, task, params=None):
        params = task.params() if params is None else params
        with torch.no_grad():
            v = self._eval(task, params)
        self._n = len(v)
        return v

    def gradients(self, task, params=None, chunk_size=512):
        params = task.params() if params is None else params
        jac = torch.func.jacrev(lambda p: self._eval(task, p))(params)
        g = task.flatten(jac, batch_dims=1)
        self._n = g.shape[0]
        return g


PROPERTIES = {"test-loss": ExampleLoss, "mean-test-loss": MeanLoss, "margin": Margin}


def make_property(name: str, X, y: np.ndarray | None = None) -> Property:
    """Build a named property over target examples (CLI entry point)."""
    if name not in PROPERTIES:
        raise GGDAError(f"Unknown property '{name}'; choose one of {', '.join(PROPERTIES)}.")
    return PROPERTIES[name](X, y)
