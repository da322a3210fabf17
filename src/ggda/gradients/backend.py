"""The gradient backend: one interface for what methods ask of gradients, two implementations.

Methods, groupings and evaluations ask for per-example gradients, group sums g_S, summed
gradients and squared gradient norms of a per-example function (the training loss or a
property) over some examples. :func:`gradient_backend` chooses, once per task, function and
input layout, how they are computed:

* :class:`FactorBackend` — every attributed parameter sits in a plain ``nn.Linear`` / supported
  ``nn.Conv2d`` (the model analysis of :mod:`ggda.models.analysis`) and the layer factors match
  ``torch.func`` on a few examples (:func:`~ggda.gradients.fast_factors.fast_plan`): one
  forward/backward per chunk, then outer products (:mod:`ggda.gradients.fast_factors`) and
  segment sums (:mod:`ggda.gradients.fast_group`);
* :class:`GenericBackend` — ``torch.func`` for any model: ``vmap(grad(...))`` per example, padded
  tiles of small groups, batched backwards of large ones.

Both give the same numbers (to float rounding); callers do not know which one they got. The
module-level functions of :mod:`ggda.gradients.per_example` and :mod:`ggda.gradients.group` are
thin entry points over it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.func import grad, vmap

from ggda.buffers import BlockRecycler
from ggda.data.batches import unsqueeze
from ggda.data.grouping import Grouping
from ggda.gradients import fast_inner
from ggda.gradients.fast_factors import LayerPlan, fast_plan, layer_factors, per_example_from_factors
from ggda.gradients.fast_group import iter_group_gradients_fast
from ggda.task import AttributionTask, Params

ExampleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GradientBackend(ABC):
    """Gradients of ``fn`` (default: the training loss) at ``params`` for one task.

    ``X`` is what :meth:`AttributionTask.to_tensor` returns (a whole-set tensor or a
    batch-fetching view) and ``y`` the targets tensor.
    """

    name: str = "backend"

    def __init__(
        self, task: AttributionTask, fn: ExampleFn | None = None, params: Params | None = None
    ) -> None:
        self.task = task
        self.fn = fn or task.loss_fn
        self.params = task.params() if params is None else params

    @abstractmethod
    def per_example(self, X, y: torch.Tensor, chunk_size: int = 256) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(rows, G)`` with G the (rows, p) flat per-example gradients, in order."""

    @abstractmethod
    def group_sums(
        self,
        X,
        y: torch.Tensor,
        grouping: Grouping,
        max_batch: int = 2048,
        max_rows: int = 1024,
        block_mb: float | None = None,
        values_out: torch.Tensor | None = None,
        allocate: Callable[[int], torch.Tensor] | None = None,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(group_ids, G (k, p))``: every group's summed gradient, each group exactly once."""

    def summed(
        self, X, y: torch.Tensor, chunk_size: int = 2048, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(p,) gradient of Σ_i w_i fn(z_i) over all rows, by batched backwards in chunks."""
        task, fn = self.task, self.fn

        def total(p: Params, xb, yb: torch.Tensor, wb: torch.Tensor | None) -> torch.Tensor:
            values = fn(task.forward(p, xb), yb)
            return (values * wb).sum() if wb is not None else values.sum()

        g = grad(total)
        out = torch.zeros(task.n_params, dtype=task.dtype, device=task.device)
        for start in range(0, len(y), chunk_size):
            rows = slice(start, start + chunk_size)
            out += task.flatten(g(self.params, X[rows], y[rows], None if weights is None else weights[rows]))
        return out

    def sq_norms(self, X, y: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
        """(n,) squared norms ‖∇fn(z_i)‖² (float64)."""
        parts = [(G.double() ** 2).sum(1) for _, G in self.per_example(X, y, chunk_size)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


class GenericBackend(GradientBackend):
    """``torch.func`` for any model (see the module docstring)."""

    name = "generic"

    def _one_example_grad(self):
        task, fn = self.task, self.fn

        def value(params: Params, x, y: torch.Tensor) -> torch.Tensor:
            return fn(task.forward(params, unsqueeze(x)), y[None])[0]

        return vmap(grad(value), in_dims=(None, 0, 0))

    def _tile_grad(self):
        task, fn = self.task, self.fn

        def tile_value(params: Params, xs, ys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return (fn(task.forward(params, xs), ys) * mask).sum()

        return vmap(grad(tile_value), in_dims=(None, 0, 0, 0))

    def per_example(self, X, y, chunk_size=256):
        per_grad = self._one_example_grad()
        n = len(y)
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            yield rows, self.task.flatten(per_grad(self.params, X[rows], y[rows]), batch_dims=1)

    def group_sums(
        self, X, y, grouping, max_batch=2048, max_rows=1024, block_mb=None, values_out=None, allocate=None
    ):
        """Small groups (≤ ``max_batch // 2``) as padded tiles, many groups per vmapped
        forward/backward; large groups by batched backwards of their summed loss."""
        task = self.task
        members = grouping.member_lists()
        sizes = grouping.sizes
        small_cut = max(1, max_batch // 2)
        small = np.flatnonzero(sizes <= small_cut)
        large = np.flatnonzero(sizes > small_cut)
        tile_grad = self._tile_grad()
        small = small[np.argsort(sizes[small], kind="stable")]  # little padding inside a chunk
        i = 0
        while i < len(small):
            k = max(1, min(max_rows, max_batch // max(int(sizes[small[i]]), 1)))
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
            grads = tile_grad(self.params, X[idx], y[idx], mask_t)
            yield chunk, task.flatten(grads, batch_dims=1)
            i += len(chunk)
        for gid in large:
            m = torch.as_tensor(members[gid], device=task.device)
            yield np.array([gid]), self.summed(_Rows(X, m), y[m], chunk_size=max_batch)[None]


class _Rows:
    """Rows ``m`` of X, sliced lazily (a large group's members, chunked by ``summed``)."""

    def __init__(self, X, m: torch.Tensor) -> None:
        self.X, self.m = X, m

    def __getitem__(self, rows: slice):
        return self.X[self.m[rows]]


class FactorBackend(GradientBackend):
    """Layer factors (Linear/Conv2d models, verified): see the module docstring."""

    name = "factors"

    def __init__(self, task: AttributionTask, plan: LayerPlan, fn=None, params=None) -> None:
        super().__init__(task, fn, params)
        self.plan = plan

    def per_example(self, X, y, chunk_size=256):
        task, n = self.task, len(y)
        blocks = BlockRecycler()
        for start in range(0, n, chunk_size):  # chunk_size rows per yielded block
            rows = slice(start, min(start + chunk_size, n))
            factors = layer_factors(task, self.plan, X[rows], y[rows], self.fn, self.params)
            out = blocks.empty((rows.stop - rows.start, task.n_params), task.dtype, task.device)
            per_example_from_factors(self.plan, factors, out=out)
            yield rows, out
            del out  # see BlockRecycler

    def group_sums(
        self, X, y, grouping, max_batch=2048, max_rows=1024, block_mb=None, values_out=None, allocate=None
    ):
        yield from iter_group_gradients_fast(
            self.task,
            self.plan,
            X,
            y,
            grouping,
            self.fn,
            self.params,
            max_batch,
            max_rows,
            block_mb=block_mb,
            values_out=values_out,
            allocate=allocate,
        )

    def sq_norms(self, X, y, chunk_size=256):
        """‖δ aᵀ‖² = ‖δ‖²‖a‖² per layer when every example's factors are rank one (MLPs): no
        per-example gradient is formed; convolutions fall back to the outer products."""
        parts = []
        for _, f in fast_inner.iter_factors(self.task, self.plan, X, y, self.fn, self.params, chunk_size):
            if not fast_inner.is_rank_one(f):
                return super().sq_norms(X, y, chunk_size)
            parts.append(fast_inner.rank_one_sq_norms(self.plan, fast_inner.squeeze(f)).double())
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def gradient_backend(
    task: AttributionTask, X, y: torch.Tensor, fn: ExampleFn | None = None, params: Params | None = None
) -> GradientBackend:
    """The backend for ``fn`` (default: the training loss) on this task and input layout: layer
    factors where the model analysis allows them and they verify, ``torch.func`` otherwise."""
    fn = fn or task.loss_fn
    params = task.params() if params is None else params
    plan = fast_plan(task, X, y, fn, params)
    if plan is not None:
        return FactorBackend(task, plan, fn, params)
    return GenericBackend(task, fn, params)
