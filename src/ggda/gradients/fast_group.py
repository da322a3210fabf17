"""All K group gradients from one forward/backward pass per chunk, by segment sums of layer factors.

For a Linear/Conv2d layer the group gradient is ``Σ_{i∈S} Σ_l δ_{i,l} a_{i,l}ᵀ``
(:mod:`ggda.gradients.fast_factors`). Rows are ordered group by group, so a chunk of k groups
of equal size s is a free reshape to (k, s·L, ·) and one ``bmm`` per layer gives all k weight
gradients; groups of mixed sizes are padded with a zero row. The matrix products do the same
FLOPs as the weight-gradient step of an ordinary backward over the same rows, which is why the
whole computation costs about one epoch's forward + backward (the "floor"), whatever K is —
instead of K separate backwards.

Groups larger than ``max_batch`` are summed over row slices with one GEMM each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from ggda.gradients.fast_factors import BlockRecycler, ExampleFn, Factors, LayerPlan, layer_factors
from ggda.groups.grouping import Grouping
from ggda.task import AttributionTask, Params

_BLOCK_BYTES = 4 * 2**20  # recycled blocks this small stay in the L3 cache between producer and consumer


def _scatter_groups(plan: LayerPlan, factors: Factors, sizes: np.ndarray, out: torch.Tensor) -> None:
    """Write the k group gradients of a chunk (rows grouped contiguously, ``sizes`` rows each)."""
    k = len(sizes)
    s_max = int(sizes.max())
    equal = bool((sizes == s_max).all())
    if not equal:
        B = int(sizes.sum())
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        offs = np.arange(s_max)[None, :]
        index = np.where(offs < sizes[:, None], starts[:, None] + offs, B)  # B = the zero row
        idx = torch.as_tensor(index.reshape(-1), device=out.device)
    for spec, a, d in zip(plan.layers, factors.A, factors.D, strict=True):
        L = a.shape[1]
        if not equal:
            a = torch.cat([a, a.new_zeros(1, *a.shape[1:])])[idx]
            d = torch.cat([d, d.new_zeros(1, *d.shape[1:])])[idx]
        ap = a.reshape(k, s_max * L, spec.d_in)
        dp = d.reshape(k, s_max * L, spec.d_out)
        if spec.weight is not None:
            # written straight into the (k, p) block: rows are strided views, no temporary
            w = out[:, plan.slices[spec.weight]].view(k, spec.d_out, spec.d_in)
            if s_max * L == 1:
                torch.mul(dp[:, 0, :, None], ap[:, 0, None, :], out=w)
            else:
                torch.bmm(dp.transpose(1, 2), ap, out=w)
        if spec.bias is not None:
            out[:, plan.slices[spec.bias]] = dp.sum(1)


def _add_single_group(plan: LayerPlan, factors: Factors, out: torch.Tensor) -> None:
    """Add the summed gradient of all rows of ``factors`` (one group) to ``out`` (p,)."""
    for spec, a, d in zip(plan.layers, factors.A, factors.D, strict=True):
        a2 = a.reshape(-1, spec.d_in)
        d2 = d.reshape(-1, spec.d_out)
        if spec.weight is not None:
            out[plan.slices[spec.weight]] += (d2.T @ a2).reshape(-1)
        if spec.bias is not None:
            out[plan.slices[spec.bias]] += d2.sum(0)


def iter_group_gradients_fast(
    task: AttributionTask,
    plan: LayerPlan,
    Xt: torch.Tensor,
    yt: torch.Tensor,
    grouping: Grouping,
    fn: ExampleFn,
    params: Params,
    max_batch: int = 2048,
    max_rows: int = 1024,
    block_mb: float | None = None,
    values_out: torch.Tensor | None = None,
    allocate: Callable[[int], torch.Tensor] | None = None,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(group_ids, G (k, p))`` for every group once, from layer factors.

    A chunk holds at most ``max_batch`` training rows and ``max_rows`` groups (the memory cap on
    the (k, p) block); groups are visited in increasing size so chunks pad little. ``values_out``
    (n,), if given, receives every row's ``fn`` value from the same forward passes; ``allocate(k)``,
    if given, supplies the (k, p) tensor each block is written into.
    """
    max_batch = min(max_batch, plan.max_rows())  # unfolded conv inputs can be large
    sizes = grouping.sizes
    members = grouping.member_lists()
    order = np.argsort(sizes, kind="stable")
    p = plan.n_params
    blocks = BlockRecycler()
    i = 0
    while i < len(order):
        gid = order[i]
        if sizes[gid] > max_batch:  # one large group: summed over row slices
            m = members[gid]
            g = torch.zeros(p, dtype=task.dtype, device=task.device)
            for start in range(0, len(m), max_batch):
                rows = torch.as_tensor(m[start : start + max_batch], device=task.device)
                f = layer_factors(task, plan, Xt.index_select(0, rows), yt.index_select(0, rows), fn, params)
                if values_out is not None:
                    values_out[rows] = f.values.to(values_out.dtype)
                _add_single_group(plan, f, g)
            yield np.array([gid]), g[None]
            i += 1
            continue
        # greedy chunk of consecutive (size-sorted) groups within both budgets
        total, j = 0, i
        while j < len(order) and j - i < max_rows and total + sizes[order[j]] <= max_batch:
            total += sizes[order[j]]
            j += 1
        chunk = order[i:j]
        rows = torch.as_tensor(np.concatenate([members[g] for g in chunk]), device=task.device)
        factors = layer_factors(task, plan, Xt.index_select(0, rows), yt.index_select(0, rows), fn, params)
        if values_out is not None:  # the forward's per-row values, for callers that need them too
            values_out[rows] = factors.values.to(values_out.dtype)
        # yield in blocks of <= _BLOCK_BYTES: one forward serves several blocks, and blocks this
        # small are recycled by the allocator instead of page-faulting fresh memory every time
        block_bytes = _BLOCK_BYTES if block_mb is None else int(block_mb * 2**20)
        per_block = max(1, block_bytes // (p * Xt.element_size()))
        row0 = 0
        for b0 in range(0, len(chunk), per_block):
            sub = chunk[b0 : b0 + per_block]
            row1 = row0 + int(sizes[sub].sum())
            part = Factors([a[row0:row1] for a in factors.A], [d[row0:row1] for d in factors.D])
            if allocate is not None:
                G = allocate(len(sub))
            else:
                G = blocks.empty((len(sub), p), task.dtype, task.device)
            _scatter_groups(plan, part, sizes[sub], G)
            yield sub, G
            del G  # no reference left here, so the recycler can tell when the consumer is done
            row0 = row1
        i = j
