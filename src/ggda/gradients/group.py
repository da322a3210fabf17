"""Group gradients g_S = ∇_θ Σ_{i∈S} ℓ(z_i; θ) for every group of a grouping.

GGDA's cost argument: one *batched* backward per group replaces |S| per-example backwards, and
with layer factors all K group gradients cost about one training epoch for any K. Entry points
over :mod:`ggda.gradients.backend`, which chooses the way once per task: layer factors and
segment sums for Linear/Conv2d models, ``torch.func`` tiles and batched backwards otherwise.
Chunk sizes respect a memory budget so a (groups × p) block never exceeds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from ggda.data.grouping import Grouping
from ggda.gradients.backend import ExampleFn, GenericBackend, gradient_backend
from ggda.task import AttributionTask, Params


def summed_gradient(
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    fn: ExampleFn | None = None,
    params: Params | None = None,
    chunk_size: int = 2048,
    weights: np.ndarray | None = None,
) -> torch.Tensor:
    """(p,) gradient of Σ_i w_i fn(z_i) over all rows, by batched backwards in chunks."""
    Xt, yt = task.to_tensor(X, y)
    wt = None if weights is None else torch.as_tensor(weights, dtype=task.dtype, device=task.device)
    return GenericBackend(task, fn, params).summed(Xt, yt, chunk_size, wt)


def iter_group_gradients(
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    grouping: Grouping | None = None,
    fn: ExampleFn | None = None,
    params: Params | None = None,
    max_batch: int = 2048,
    memory_mb: float = 256.0,
    block_mb: float | None = None,
    values_out: torch.Tensor | None = None,
    allocate: Callable[[int], torch.Tensor] | None = None,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(group_ids, G)``: complete gradients G (k, p) of the summed ``fn`` of groups ``group_ids``.

    Every group is yielded exactly once. Default ``fn`` is the training loss; default grouping is
    singletons (per-example gradients). ``block_mb`` sets the size of the blocks the factor path
    yields (default: an eighth of the core's share of the last-level cache, 1–16 MB,
    :func:`ggda.buffers.cache_block_bytes`): a consumer that multiplies each block by a large matrix (a projection)
    runs its GEMMs more efficiently on taller blocks. ``values_out`` (n,): the factor path writes
    every row's ``fn`` value there (from the forward it runs anyway); the generic path leaves it as
    is. ``allocate(k)``: on the factor path, a (k, p) tensor to write the next block of k groups
    into — a consumer that gathers blocks (to project many rows per pass) hands out slices of its
    own buffer, so no block is copied; it is called after the previous block has been consumed.
    """
    grouping = grouping or Grouping.singleton(len(X))
    grouping.check_matches(len(X))
    Xt, yt = task.to_tensor(X, y)
    bytes_per_grad = task.n_params * torch.finfo(task.dtype).bits // 8
    max_rows = max(1, int(memory_mb * 2**20 // bytes_per_grad))  # gradient rows per chunk
    backend = gradient_backend(task, Xt, yt, fn, params)
    yield from backend.group_sums(Xt, yt, grouping, max_batch, max_rows, block_mb, values_out, allocate)


def group_gradients(
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    grouping: Grouping | None = None,
    fn: ExampleFn | None = None,
    params: Params | None = None,
    max_batch: int = 2048,
) -> torch.Tensor:
    """(K, p) group gradients, rows in group-id order (materialised)."""
    grouping = grouping or Grouping.singleton(len(X))
    out = torch.zeros(grouping.n_groups, task.n_params, dtype=task.dtype, device=task.device)
    for gids, G in iter_group_gradients(task, X, y, grouping, fn, params, max_batch):
        out[torch.as_tensor(gids, device=task.device)] = G
    return out
