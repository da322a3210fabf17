"""Per-example gradients, in chunks.

Linear/Conv2d models take the layer-factor path (:mod:`ggda.gradients.fast_factors`: one
forward/backward per chunk, then outer products); every other model uses ``torch.func``
(``vmap(grad(...))``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.func import grad, vmap

from ggda.data.batches import unsqueeze
from ggda.gradients.buffers import BlockRecycler
from ggda.gradients.fast_factors import fast_plan, layer_factors, per_example_from_factors
from ggda.task import AttributionTask, Params

ExampleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _one_example_grad(task: AttributionTask, fn: ExampleFn):
    def value(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return fn(task.forward(params, unsqueeze(x)), y[None])[0]

    return vmap(grad(value), in_dims=(None, 0, 0))


def iter_per_example_gradients(
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    fn: ExampleFn | None = None,
    params: Params | None = None,
    chunk_size: int = 256,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, G)`` with G the (rows, p) flat gradients of ``fn`` (default: the training loss)."""
    fn = fn or task.loss_fn
    params = task.params() if params is None else params
    Xt, yt = task.to_tensor(X, y)
    plan = fast_plan(task, Xt, yt, fn, params)
    n = len(yt)
    if plan is not None:
        blocks = BlockRecycler()
        for start in range(0, n, chunk_size):  # chunk_size rows per yielded block
            rows = slice(start, min(start + chunk_size, n))
            factors = layer_factors(task, plan, Xt[rows], yt[rows], fn, params)
            out = blocks.empty((rows.stop - rows.start, task.n_params), task.dtype, task.device)
            per_example_from_factors(plan, factors, out=out)
            yield rows, out
            del out  # see BlockRecycler
        return
    per_grad = _one_example_grad(task, fn)
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        grads = per_grad(params, Xt[rows], yt[rows])
        yield rows, task.flatten(grads, batch_dims=1)


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
