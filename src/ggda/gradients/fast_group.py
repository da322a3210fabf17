"""All K group gradients from one forward/backward pass per chunk, by segment sums of layer factors.

For a Linear/Conv2d layer the group gradient is ``Σ_{i∈S} Σ_l δ_{i,l} a_{i,l}ᵀ``
(:mod:`ggda.gradients.fast_factors`). Rows are ordered group by group, so a chunk of k groups
of equal size s is a free reshape to (k, s·L, ·) and one ``bmm`` per layer gives all k weight
gradients (a convolution: one grouped weight-gradient on its raw inputs,
:func:`~ggda.gradients.fast_factors.conv_weight_sums`, instead of unfolded patches); groups of
mixed sizes are padded with a zero row. The matrix products do the same
FLOPs as the weight-gradient step of an ordinary backward over the same rows, which is why the
whole computation costs about one epoch's forward + backward (the "floor"), whatever K is —
instead of K separate backwards.

Groups larger than ``max_batch`` are summed over row slices with one GEMM each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from ggda.buffers import BlockRecycler, cache_block_bytes
from ggda.data.grouping import Grouping
from ggda.gradients.fast_factors import (
    ExampleFn,
    Factors,
    LayerPlan,
    LayerSpec,
    conv_weight_sums,
    layer_factors,
)
from ggda.task import AttributionTask, Params


class ChunkGroups:
    """The group gradients of one chunk's groups (rows grouped contiguously, ``sizes`` rows each),
    written into output blocks of consecutive groups.

    Why per chunk: when the chunk's groups have equal sizes, the bias sums and the weight
    gradients of small layers (an MLP's last layer) cost one call for the whole chunk instead of
    one per block (a 2 MB block holds only 5 groups of a 100k-parameter model, and a tiny ``bmm``
    costs its call overhead, not its FLOPs). Those small parts are laid out per chunk in runs of
    adjacent parameter columns, so each block receives them in one copy per run (an MLP's
    ``b1, W2, b2`` are one run) instead of one small copy per tensor. Large layers are multiplied
    block by block, straight into the block, so their output stays in cache for the consumer.
    Groups of mixed sizes are padded with zero rows per block, so a large group never pads a
    whole chunk.
    """

    _SMALL_BYTES = 2 * 2**20  # a layer whose gradients for the whole chunk fit here is done at once

    def __init__(self, plan: LayerPlan, factors: Factors, sizes: np.ndarray) -> None:
        self.plan = plan
        self.factors = factors
        self.sizes = sizes
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.equal = bool((sizes == sizes[0]).all())
        self.large: list[tuple] = []  # (spec, ap, dp, conv calls, weight columns): per block
        self.runs: list[tuple[slice, torch.Tensor]] = []  # (columns, (k, width) values): per chunk
        if not self.equal:
            return
        k, s = len(sizes), int(sizes[0])
        small: list[tuple[slice, torch.Tensor]] = []
        conv = factors.conv or [None] * len(plan.layers)
        for spec, a, d, calls in zip(plan.layers, factors.A, factors.D, conv, strict=True):
            ap = None if a is None else a.reshape(k, s * a.shape[1], spec.d_in)
            dp = d.reshape(k, s * d.shape[1], spec.d_out)
            if spec.weight is not None:
                cols = plan.slices[spec.weight]
                if k * spec.d_out * spec.d_in * d.element_size() <= self._SMALL_BYTES:
                    small.append((cols, _weight_sums(spec, ap, dp, calls, k).reshape(k, -1)))
                else:
                    self.large.append((spec, ap, dp, calls, cols))
            if spec.bias is not None:
                small.append((plan.slices[spec.bias], dp.sum(1)))
        small.sort(key=lambda part: part[0].start)
        i = 0
        while i < len(small):  # maximal runs of adjacent columns
            j = i + 1
            while j < len(small) and small[j][0].start == small[j - 1][0].stop:
                j += 1
            parts = [t for _, t in small[i:j]]
            values = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            self.runs.append((slice(small[i][0].start, small[j - 1][0].stop), values))
            i = j

    def write(self, g0: int, g1: int, out: torch.Tensor) -> None:
        """Write the gradients of the chunk's groups ``g0:g1`` into ``out`` (g1 - g0, p)."""
        if not self.equal:
            r0, r1 = int(self.starts[g0]), int(self.starts[g1])
            _scatter_padded(self.plan, self.factors.rows(r0, r1), self.sizes[g0:g1], out)
            return
        k, s = g1 - g0, int(self.sizes[0])
        for spec, ap, dp, calls, cols in self.large:
            w = out[:, cols].view(k, spec.d_out, spec.d_in)
            if calls is not None:  # raw convolution: grouped weight-gradient of these rows
                part = [(x[g0 * s : g1 * s], g[g0 * s : g1 * s]) for x, g in calls]
                w.copy_(conv_weight_sums(spec.module, part, k))
            else:  # written straight into the block: rows are strided views, no temporary
                _outer_sums(dp[g0:g1], ap[g0:g1], out=w)
        for cols, values in self.runs:
            out[:, cols].copy_(values[g0:g1])


def _weight_sums(spec: LayerSpec, ap, dp: torch.Tensor, calls, k: int) -> torch.Tensor:
    """(k, d_out, d_in) weight gradients of k equal-size groups: grouped convolution
    weight-gradients for raw convolutions, one ``bmm`` of the factors otherwise."""
    if calls is not None:
        return conv_weight_sums(spec.module, calls, k)
    return _outer_sums(dp, ap)


def _scatter_padded(plan: LayerPlan, factors: Factors, sizes: np.ndarray, out: torch.Tensor) -> None:
    """Group gradients of groups of mixed sizes: each padded to the largest with a zero row."""
    k = len(sizes)
    s_max = int(sizes.max())
    B = int(sizes.sum())
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    offs = np.arange(s_max)[None, :]
    index = np.where(offs < sizes[:, None], starts[:, None] + offs, B)  # B = the zero row
    padded = factors.index_rows(torch.as_tensor(index.reshape(-1), device=out.device))
    conv = padded.conv or [None] * len(plan.layers)
    for spec, a, d, calls in zip(plan.layers, padded.A, padded.D, conv, strict=True):
        L = d.shape[1]
        ap = None if a is None else a.reshape(k, s_max * a.shape[1], spec.d_in)
        dp = d.reshape(k, s_max * L, spec.d_out)
        if spec.weight is not None:
            w = out[:, plan.slices[spec.weight]].view(k, spec.d_out, spec.d_in)
            if calls is not None:
                w.copy_(conv_weight_sums(spec.module, calls, k))
            else:
                _outer_sums(dp, ap, out=w)
        if spec.bias is not None:
            out[:, plan.slices[spec.bias]] = dp.sum(1)


def _outer_sums(dp: torch.Tensor, ap: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(k, d_out, d_in) = Σ_r dp[:, r, :, None] · ap[:, r, None, :]: one bmm (a product if r = 1)."""
    if dp.shape[1] == 1:
        return torch.mul(dp[:, 0, :, None], ap[:, 0, None, :], out=out)
    return torch.bmm(dp.transpose(1, 2), ap, out=out)


def scatter_groups(plan: LayerPlan, factors: Factors, sizes: np.ndarray, out: torch.Tensor) -> None:
    """Write the k group gradients of a chunk (rows grouped contiguously, ``sizes`` rows each)."""
    ChunkGroups(plan, factors, sizes).write(0, len(sizes), out)


class _RowGather:
    """Row gathers of the training inputs into one reused buffer, or no copy at all.

    Why a reused buffer: a fresh chunk-sized tensor per chunk is page-faulted in on first write
    (the allocator hands multi-MB blocks back to the OS between chunks), which costs more than
    the copy itself. The previous chunk's rows are dead when the next gather runs: its factors are
    only read while that chunk's blocks are written. Why no copy: when a chunk's rows are one
    ascending run (groups given in data order), the chunk is a slice of the inputs, read in place
    like the floor's own forward.
    """

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def rows(self, X, rows: torch.Tensor):
        if not isinstance(X, torch.Tensor):  # lazy inputs: the view fetches just these rows
            return X[rows]
        run = _as_range(rows)
        if run is not None:
            return X[run]
        buf = self._buf
        if buf is None or buf.shape[1:] != X.shape[1:] or len(buf) < len(rows) or buf.dtype != X.dtype:
            buf = self._buf = torch.empty((len(rows), *X.shape[1:]), dtype=X.dtype, device=X.device)
        return torch.index_select(X, 0, rows, out=buf[: len(rows)])


def _as_range(rows: torch.Tensor) -> slice | None:
    """``slice(r0, r1)`` when ``rows`` is exactly ``r0, r0 + 1, …, r1 - 1``, else None."""
    if len(rows) == 0:
        return None
    r0, last = int(rows[0]), int(rows[-1])
    if last - r0 != len(rows) - 1 or (len(rows) > 1 and not bool((rows.diff() == 1).all())):
        return None
    return slice(r0, last + 1)


def _add_single_group(plan: LayerPlan, factors: Factors, out: torch.Tensor) -> None:
    """Add the summed gradient of all rows of ``factors`` (one group) to ``out`` (p,)."""
    conv = factors.conv or [None] * len(plan.layers)
    for spec, a, d, calls in zip(plan.layers, factors.A, factors.D, conv, strict=True):
        d2 = d.reshape(-1, spec.d_out)
        if spec.weight is not None:
            if calls is not None:  # the ordinary weight-gradient kernel over all rows
                w = conv_weight_sums(spec.module, calls, 1)
                out[plan.slices[spec.weight]] += w.reshape(-1)
            else:
                out[plan.slices[spec.weight]] += (d2.T @ a.reshape(-1, spec.d_in)).reshape(-1)
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
    order = np.argsort(sizes, kind="stable")
    # all rows in visiting order (groups by increasing size, members by position): every chunk's
    # rows are then one contiguous slice, found without a Python list of K member arrays
    # (ranks in the smallest unsigned type: NumPy's stable sort is a radix sort up to 16 bits, 12x
    # faster than its merge sort of int64 keys at K = 2,000, n = 20,000)
    rank = np.empty(len(order), dtype=np.min_scalar_type(max(0, len(order) - 1)))
    rank[order] = np.arange(len(order))
    perm = torch.as_tensor(np.argsort(rank[grouping.labels], kind="stable"), device=task.device)
    sorted_sizes = sizes[order]
    ends = np.cumsum(sorted_sizes)
    p = plan.n_params
    blocks = BlockRecycler()
    gather = _RowGather()
    i = 0
    while i < len(order):
        gid = order[i]
        if sizes[gid] > max_batch:  # one large group: summed over row slices
            m = perm[int(ends[i] - sorted_sizes[i]) : int(ends[i])]
            g = torch.zeros(p, dtype=task.dtype, device=task.device)
            for start in range(0, len(m), max_batch):
                rows = m[start : start + max_batch]
                f = layer_factors(
                    task, plan, Xt.index_select(0, rows), yt.index_select(0, rows), fn, params, unfold=False
                )
                if values_out is not None:
                    values_out[rows] = f.values.to(values_out.dtype)
                _add_single_group(plan, f, g)
            yield np.array([gid]), g[None]
            i += 1
            continue
        # greedy chunk of consecutive (size-sorted) groups within both budgets
        first = int(ends[i] - sorted_sizes[i])
        j = min(i + max_rows, int(np.searchsorted(ends, first + max_batch, side="right")))
        chunk = order[i:j]
        rows = perm[first : int(ends[j - 1])]
        factors = layer_factors(
            task, plan, gather.rows(Xt, rows), yt.index_select(0, rows), fn, params, unfold=False
        )
        if values_out is not None:  # the forward's per-row values, for callers that need them too
            values_out[rows] = factors.values.to(values_out.dtype)
        # yield in blocks sized from the machine's cache: one forward serves several blocks, and
        # recycled blocks this small stay in cache between the producer and the consumer
        block_bytes = cache_block_bytes(task.device.type) if block_mb is None else int(block_mb * 2**20)
        per_block = max(1, block_bytes // (p * (torch.finfo(task.dtype).bits // 8)))
        groups = ChunkGroups(plan, factors, sizes[chunk])
        del factors
        for b0 in range(0, len(chunk), per_block):
            sub = chunk[b0 : b0 + per_block]
            if allocate is not None:
                G = allocate(len(sub))
            else:
                G = blocks.empty((len(sub), p), task.dtype, task.device)
            groups.write(b0, b0 + len(sub), G)
            yield sub, G
            del G  # no reference left here, so the recycler can tell when the consumer is done
        i = j
