"""Per-example gradients, in chunks (an entry point over :mod:`ggda.gradients.backend`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ggda.gradients.backend import ExampleFn, gradient_backend
from ggda.task import AttributionTask, Params


def iter_per_example_gradients(
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    fn: ExampleFn | None = None,
    params: Params | None = None,
    chunk_size: int = 256,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, G)`` with G the (rows, p) flat gradients of ``fn`` (default: the training loss)."""
    Xt, yt = task.to_tensor(X, y)
    yield from gradient_backend(task, Xt, yt, fn, params).per_example(Xt, yt, chunk_size)


def per_example_gradients(
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    fn: ExampleFn | None = None,
    params: Params | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """(n, p) per-example gradients (materialised; use the iterator for large n·p)."""
    parts = [G for _, G in iter_per_example_gradients(task, X, y, fn, params, chunk_size)]
    return torch.cat(parts) if parts else torch.zeros(0, task.n_params)


def per_example_sq_norms(
    task: AttributionTask, X: np.ndarray, y: np.ndarray, fn: ExampleFn | None = None, chunk_size: int = 256
) -> torch.Tensor:
    """(n,) ‖∇fn(z_i)‖² in float64 (from layer factors without forming gradients on MLPs)."""
    Xt, yt = task.to_tensor(X, y)
    return gradient_backend(task, Xt, yt, fn).sq_norms(Xt, yt, chunk_size)
