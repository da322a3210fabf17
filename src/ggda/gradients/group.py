"""Group gradients g_S = ∇_θ Σ_{i∈S} ℓ(z_i; θ) for every group of a grouping.

GGDA's cost argument: one *batched* backward per group replaces |S| per-example backwards.
Two exact strategies, chosen per group by size, never materialising members' per-example
gradients:

* **small groups** (≤ ``max_batch // 2`` points, singletons included) are padded into tiles and
  processed many groups at a time with ``vmap(grad(summed loss of a tile))`` — one vectorised
  forward/backward per chunk of groups (for singletons this *is* per-example gradients);
* **large groups** get a plain batched backward of their summed loss, ``max_batch`` points at a
  time, accumulated.

Chunk sizes respect a memory budget so a (groups × p) block never exceeds it.

When every attributed parameter belongs to an ``nn.Linear``/``nn.Conv2d`` (checked, and verified
against ``torch.func`` on a few rows), :func:`iter_group_gradients` instead uses the layer-factor
path of :mod:`ggda.gradients.fast_group`: one forward/backward per chunk of rows and a segment
sum of outer products, about the cost of one training epoch for any K. The vmap path above is
the fallback for every other model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.func import grad, vmap

from ggda.gradients.fast_factors import fast_plan
from ggda.gradients.fast_group import iter_group_gradients_fast
from ggda.groups.grouping import Grouping
from ggda.task import AttributionTask, Params

ExampleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    fn = fn or task.loss_fn
    params = task.params() if params is None else params
    Xt, yt = task.to_tensor(X, y)
    wt = None if weights is None else torch.as_tensor(weights, dtype=task.dtype, device=task.device)

    def total(p: Params, xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor | None) -> torch.Tensor:
        values = fn(task.forward(p, xb), yb)
        return (values * wb).sum() if wb is not None else values.sum()

    g = grad(total)
    out = torch.zeros(task.n_params, dtype=task.dtype, device=task.device)
    for start in range(0, len(Xt), chunk_size):
        rows = slice(start, start + chunk_size)
        out += task.flatten(g(params, Xt[rows], yt[rows], None if wt is None else wt[rows]))
    return out


def _tile_grad(task: AttributionTask, fn: ExampleFn):
    def tile_value(params: Params, xs: torch.Tensor, ys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (fn(task.forward(params, xs), ys) * mask).sum()

    return vmap(grad(tile_value), in_dims=(None, 0, 0, 0))


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
    singletons (per-example gradients). ``block_mb`` sets the size of the blocks the fast path
    yields (default 4 MB): a consumer that multiplies each block by a large matrix (a projection)
    runs its GEMMs more efficiently on taller blocks. ``values_out`` (n,): the fast path writes every
    row's ``fn`` value there (from the forward it runs anyway); the generic path leaves it as is.
    ``allocate(k)``: on the fast path, a (k, p) tensor to write the next block of k groups into —
    a consumer that gathers blocks (to project many rows per pass) hands out slices of its own
    buffer, so no block is copied; it is called after the previous block has been consumed.
    """
    fn = fn or task.loss_fn
    params = task.params() if params is None else params
    grouping = grouping or Grouping.singleton(len(X))
    grouping.check_matches(len(X))
    Xt, yt = task.to_tensor(X, y)
    p = task.n_params
    bytes_per_grad = p * torch.finfo(task.dtype).bits // 8
    max_rows = max(1, int(memory_mb * 2**20 // bytes_per_grad))  # gradient rows per chunk
    plan = fast_plan(task, Xt, yt, fn, params)
    if plan is not None:
        yield from iter_group_gradients_fast(
            task,
            plan,
            Xt,
            yt,
            grouping,
            fn,
            params,
            max_batch,
            max_rows,
            block_mb=block_mb,
            values_out=values_out,
            allocate=allocate,
        )
        return
    members = grouping.member_lists()
    sizes = grouping.sizes
    small_cut = max(1, max_batch // 2)
    small = np.flatnonzero(sizes <= small_cut)
    large = np.flatnonzero(sizes > small_cut)

    # Small groups: sort by size so padding inside a chunk is small, then vmap over groups.
    tile_grad = _tile_grad(task, fn)
    small = small[np.argsort(sizes[small], kind="stable")]
    i = 0
    while i < len(small):
        s_max_first = int(sizes[small[i]])
        k = max(1, min(max_rows, max_batch // max(s_max_first, 1)))
        chunk = small[i : i + k]
        s_max = int(sizes[chunk].max())
        while len(chunk) > 1 and len(chunk) * s_max > max_batch:  # sizes grow within the chunk
            chunk = chunk[: max(1, max_batch // s_max)]
            s_max = int(sizes[chunk].max())
        index = np.zeros((len(chunk), s_max), dtype=np.int64)
        mask = np.zeros((len(chunk), s_max), dtype=np.float32)
        for row, gid in enumerate(chunk):
            m = members[gid]
            index[row, : len(m)] = m
            mask[row, : len(m)] = 1.0
        idx = torch.as_tensor(index, device=task.device)
        mask_t = torch.as_tensor(mask, dtype=task.dtype, device=task.device)
        grads = tile_grad(params, Xt[idx], yt[idx], mask_t)
        yield chunk, task.flatten(grads, batch_dims=1)
        i += len(chunk)

    # Large groups: batched backward of the summed loss, chunked over members.
    for gid in large:
        m = members[gid]
        g = summed_gradient(task, X[m], y[m], fn=fn, params=params, chunk_size=max_batch)
        yield np.array([gid]), g[None]


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
