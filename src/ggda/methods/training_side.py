"""The training side of inner-product methods: every group gradient g_S, in the cheapest exact form.

Why a component: Grad-Dot, Grad-Cos, TracIn's per-checkpoint passes, the influence functions,
DataInf and the batched-Fisher IF all score ``precondition(∇f)ᵀ g_S`` against the same group
gradients; only how those are held and multiplied differs with the model and the sizes. The
attributor composes one :class:`TrainingGradients` in ``cache()`` and says whether it
preconditions; the representation is chosen here, once:

* ``factors`` — when every training gradient is a rank-one outer product of layer factors (an
  MLP; decided by the gradient paths' verified plan) and the factors (n × Σ(d_in + d_out)) are
  smaller than the K × p group gradients, or for per-point attribution without a preconditioner.
  Scores are inner products of factors summed into groups (:mod:`ggda.gradients.fast_inner`):
  per-example targets of an identity-preconditioned method never form a p-vector at all.
* ``dense`` — a (K × p) matrix when it fits ``memory_mb``;
* ``streamed`` — group gradients recomputed block by block for every property, never all held.

A preconditioned method's dense targets cost n·p each through factors and K·p each against
group gradients streamed again, so above :data:`FACTOR_MAX_TARGETS` targets (and below K = n)
the group gradients are used even in factor mode.
"""

from __future__ import annotations

import numpy as np
import torch

from ggda.data.dataset import Dataset
from ggda.data.grouping import Grouping
from ggda.gradients import fast_inner
from ggda.gradients.fast_factors import fast_plan
from ggda.gradients.group import iter_group_gradients
from ggda.properties import ExampleProperty, Property
from ggda.task import AttributionTask

#: Dense (preconditioned) targets above this many are scored against streamed group gradients.
FACTOR_MAX_TARGETS = 2


class TrainingGradients:
    """The K group gradients of the training loss over ``grouping``, held as factors, a dense
    matrix or streamed (see the module docstring).

    Args:
        preconditioned: the method transforms target gradients before the product (influence
            functions, DataInf): then per-point factors are used only when n × p does not fit.
        normalize: cosine instead of dot product (per point only through factors).

    Attributes:
        mode: ``"factors"``, ``"dense"`` or ``"streamed"``.
        G: the (K, p) matrix in dense mode; ``plan`` / ``factors``: the layer plan and the cached
        factor chunks (None when streamed) once factors are in use.
    """

    def __init__(
        self,
        task: AttributionTask,
        train: Dataset,
        grouping: Grouping,
        max_batch: int = 2048,
        memory_mb: float = 1024.0,
        preconditioned: bool = False,
        normalize: bool = False,
    ) -> None:
        self.task, self.train, self.grouping = task, train, grouping
        self.max_batch, self.memory_mb = max_batch, memory_mb
        self.preconditioned, self.normalize = preconditioned, normalize
        self.G: torch.Tensor | None = None
        self.plan = None
        self.factors: list | None = None
        self.mode = "factors" if self._choose_factors() else "streamed"
        if self.mode == "streamed":
            K, p = grouping.n_groups, task.n_params
            if K * p * torch.finfo(task.dtype).bits / 8 <= memory_mb * 2**20:
                G = torch.zeros(K, p, dtype=task.dtype, device=task.device)
                for gids, block in self.blocks():
                    G[torch.as_tensor(gids, device=G.device)] = block
                self.G, self.mode = G, "dense"

    # -- choosing the representation ------------------------------------------------------------
    @property
    def itemsize(self) -> int:
        return torch.finfo(self.task.dtype).bits // 8

    def _choose_factors(self) -> bool:
        K, n, p = self.grouping.n_groups, len(self.train), self.task.n_params
        singleton = K == n
        if self.normalize and not singleton:
            return False  # the norm of a group gradient does not factorise
        plan = self.factor_plan()
        if plan is None:
            return False
        gbytes = K * p * self.itemsize
        if singleton:  # per point: factors, unless a preconditioned method can hold n × p gradients
            if self.preconditioned and gbytes <= self.memory_mb * 2**20:
                return False
        elif fast_inner.factor_bytes(plan, n, self.itemsize) > gbytes:
            return False
        self.use_factors(plan)
        return True

    def factor_plan(self):
        """The layer plan when every training gradient is a rank-one outer product of layer
        factors (an MLP), else None (convolutions, sequences, unsupported modules)."""
        Xt, yt = self.task.to_tensor(self.train.X, self.train.y)
        params = self.task.params()
        plan = fast_plan(self.task, Xt[:8], yt[:8], self.task.loss_fn, params)
        if plan is None:
            return None
        first = fast_inner.layer_factors(self.task, plan, Xt[:2], yt[:2], self.task.loss_fn, params)
        return plan if fast_inner.is_rank_one(first) else None

    def use_factors(self, plan) -> None:
        """Serve factors from ``plan``: cached when they fit ``memory_mb``, else streamed."""
        self.plan = plan
        if fast_inner.factor_bytes(plan, len(self.train), self.itemsize) <= self.memory_mb * 2**20:
            self.factors = list(self.factor_chunks())

    def ensure_factors(self) -> bool:
        """Make factors available beside a dense/streamed representation (DataInf's layer norms
        need them); False when the model's gradients are not rank-one factors."""
        if self.plan is None:
            plan = self.factor_plan()
            if plan is None:
                return False
            self.use_factors(plan)
        return True

    # -- reading the training side --------------------------------------------------------------
    def blocks(self):
        """``(group ids, G block)`` over every group (the dense matrix, or computed again)."""
        if self.G is not None:
            yield np.arange(self.grouping.n_groups), self.G
            return
        yield from iter_group_gradients(
            self.task,
            self.train.X,
            self.train.y,
            self.grouping,
            max_batch=self.max_batch,
            memory_mb=min(256.0, self.memory_mb),
        )

    def factor_chunks(self):
        """(rows, squeezed factors) of the training loss over the training set, cached or streamed."""
        if self.factors is not None:
            yield from self.factors
            return
        Xt, yt = self.task.to_tensor(self.train.X, self.train.y)
        for rows, f in fast_inner.iter_factors(
            self.task, self.plan, Xt, yt, self.task.loss_fn, self.task.params(), self.max_batch
        ):
            yield rows, fast_inner.squeeze(f)

    # -- scoring ----------------------------------------------------------------------------------
    def example_scores(self, prop: Property) -> np.ndarray | None:
        """(T, K) scores of an identity-preconditioned method for per-example targets straight
        from factors (no p-vector formed); None when that path does not apply."""
        if self.mode != "factors" or self.preconditioned:
            return None
        targets = self._rank_one_targets(prop)
        return None if targets is None else self._factor_scores(targets=targets)

    def scores(self, Gf: torch.Tensor) -> np.ndarray:
        """(T, K) scores of (preconditioned) target gradients ``Gf`` (T, p) against every group."""
        if self.mode == "factors" and (
            not self.preconditioned
            or self.grouping.n_groups == len(self.train)
            or len(Gf) <= FACTOR_MAX_TARGETS
        ):
            return self._factor_scores(Gf=Gf)
        return self._dense_scores(Gf)

    def _rank_one_targets(self, prop: Property):
        if not isinstance(prop, ExampleProperty):
            return None
        Xt, yt = self.task.to_tensor(prop.X, prop.y)
        fn, params = prop.example_fn(self.task), self.task.params()
        if fast_plan(self.task, Xt, yt, fn, params) is None:
            return None
        parts = [
            f for _, f in fast_inner.iter_factors(self.task, self.plan, Xt, yt, fn, params, self.max_batch)
        ]
        if not all(fast_inner.is_rank_one(f) for f in parts):
            return None
        parts = [fast_inner.squeeze(f) for f in parts]
        return type(parts[0])(
            [torch.cat([f.A[i] for f in parts]) for i in range(len(parts[0].A))],
            [torch.cat([f.D[i] for f in parts]) for i in range(len(parts[0].D))],
        )

    def _factor_scores(self, Gf: torch.Tensor | None = None, targets=None) -> np.ndarray:
        plan = self.plan
        if targets is None:
            T = Gf.shape[0]
            t_norm = Gf.norm(dim=1) if self.normalize else None
        else:
            T = targets.A[0].shape[0]
            t_norm = fast_inner.rank_one_sq_norms(plan, targets).sqrt() if self.normalize else None
        labels = fast_inner.as_labels(self.grouping.labels, self.task.device)
        scores = torch.zeros(T, self.grouping.n_groups, dtype=self.task.dtype, device=self.task.device)
        for rows, f in self.factor_chunks():
            if targets is not None:
                s = fast_inner.rank_one_scores(plan, f, targets)
            else:
                s = fast_inner.dense_target_scores(
                    plan, fast_inner.Factors([a[:, None] for a in f.A], [d[:, None] for d in f.D]), Gf
                )
            if self.normalize:  # singleton grouping only (see _choose_factors)
                s = s / fast_inner.rank_one_sq_norms(plan, f).sqrt().clamp_min(1e-30)[None, :]
            fast_inner.segment_sum(s, labels[rows], self.grouping.n_groups, out=scores)
        if self.normalize:
            scores = scores / t_norm.clamp_min(1e-30)[:, None]
        return scores.cpu().numpy()

    def _dense_scores(self, Gf: torch.Tensor) -> np.ndarray:
        if self.normalize:
            Gf = Gf / Gf.norm(dim=1, keepdim=True).clamp_min(1e-30)
        scores = torch.zeros(Gf.shape[0], self.grouping.n_groups, dtype=Gf.dtype, device=Gf.device)
        for gids, G in self.blocks():
            if self.normalize:
                G = G / G.norm(dim=1, keepdim=True).clamp_min(1e-30)
            scores[:, torch.as_tensor(gids, device=Gf.device)] = Gf @ G.T
        return scores.cpu().numpy()
