"""The attributor interface and the registry every method joins.

Layout (after dattri): a *task* says what is attributed, an *attributor* says how; ``cache``
does the training-side work once (group gradients, Hessian factors, features) and ``attribute``
scores any property function against it. Following pyDVL, gradient methods are written as
``score = precondition(∇f)ᵀ g_S``: a new influence variant only supplies ``precondition``
(identity for Grad-Dot, (H + λI)⁻¹ for influence functions), and every variant is group-native
because ``g_S`` is a group gradient.

Scores are (n_targets × n_groups) NumPy arrays, **positive = helpful**, group score = **sum**
over members unless ``aggregate="mean"``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.gradients.group import iter_group_gradients
from ggda.groups.grouping import Grouping
from ggda.properties import Property
from ggda.task import AttributionTask

METHODS: dict[str, type[Attributor]] = {}
AGGREGATES = ("sum", "mean")


def register(name: str) -> Callable[[type[Attributor]], type[Attributor]]:
    def deco(cls: type[Attributor]) -> type[Attributor]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def make_method(name: str, task: AttributionTask, **options) -> Attributor:
    """Instantiate a registered method by name (``ggda attribute --method NAME``)."""
    import ggda.methods  # noqa: F401  (registers every method module)

    if name not in METHODS:
        raise GGDAError(f"Unknown method '{name}'; choose one of {', '.join(sorted(METHODS))}.")
    cls = METHODS[name]
    accepted = method_options(cls)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise GGDAError(
            f"Method '{name}' has no option {', '.join(unknown)}; its options are {', '.join(sorted(accepted))}."
        )
    return cls(task, **options)


def method_options(cls: type) -> set[str]:
    """Keyword options a method's constructor accepts (following ``**options`` up the class chain)."""
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names - {"self", "task"}


class Attributor(ABC):
    """Group-native attribution method: ``cache(train, grouping)`` then ``attribute(property)``."""

    name: ClassVar[str] = "attributor"

    def __init__(
        self, task: AttributionTask, aggregate: str = "sum", max_batch: int = 2048, memory_mb: float = 1024.0
    ) -> None:
        if aggregate not in AGGREGATES:
            raise GGDAError(f"Unknown aggregate '{aggregate}'; choose one of {', '.join(AGGREGATES)}.")
        self.task, self.aggregate = task, aggregate
        self.max_batch, self.memory_mb = max_batch, memory_mb
        self.train: Dataset | None = None
        self.grouping: Grouping | None = None

    def cache(self, train: Dataset, grouping: Grouping | None = None) -> Attributor:
        """Remember the training set and grouping and do the training-side precomputation.

        ``train``: a ggda :class:`~ggda.data.Dataset`, ``(X, y)`` arrays, a map-style torch
        ``Dataset``, an unshuffled ``DataLoader`` or a Hugging Face ``datasets.Dataset``.
        """
        from ggda.data.sources import as_dataset

        train = as_dataset(train)
        grouping = grouping or Grouping.singleton(len(train))
        grouping.check_matches(len(train), f"training set '{train.name}'")
        self.train, self.grouping = train, grouping
        self._cache()
        return self

    def _cache(self) -> None:  # noqa: B027  (optional hook)
        """Training-side work; default none."""

    def attribute(self, prop: Property) -> np.ndarray:
        """(n_targets, n_groups) scores, positive = helpful."""
        if self.train is None or self.grouping is None:
            raise GGDAError(f"Call {type(self).__name__}.cache(train, grouping) before attribute().")
        scores = self._attribute(prop)
        if self.aggregate == "mean":
            scores = scores / self.grouping.sizes[None, :]
        return scores

    @abstractmethod
    def _attribute(self, prop: Property) -> np.ndarray: ...


class InnerProductAttributor(Attributor):
    """score_j(t) = precondition(∇f_t)ᵀ g_{S_j}, the common form of Grad-Dot, Grad-Cos and IFs.

    Group gradients are cached as a (K × p) matrix when it fits ``memory_mb``; otherwise they are
    recomputed chunk by chunk at attribution time and never held at once.

    Fast path (internal, same scores): for MLPs (every attributed parameter in an ``nn.Linear``
    applied once per example) the training side is cached as per-layer *factors* — inputs a_i
    and output gradients δ_i, n × Σ(d_in + d_out) numbers instead of K × p — whenever that is
    smaller (always for per-point attribution). Scores are then inner products of factors
    (:mod:`ggda.gradients.fast_inner`), summed into groups; with the identity ``precondition``
    and per-example targets, ⟨δ_i a_iᵀ, δ_t a_tᵀ⟩ = (δ_iᵀδ_t)(a_iᵀa_t) makes per-point Grad-Dot
    cost about one forward pass. Subclasses that override ``precondition`` (influence functions)
    get factor scoring for per-point attribution when the n × p gradients do not fit
    ``memory_mb``, and for groups whenever the factors are smaller than the K × p gradients: a
    property with at most ``_FACTOR_MAX_TARGETS`` targets is then scored through the factors,
    one with more against group gradients streamed again (dense targets cost n·p each through
    the factors, K·p each against group gradients). Subclasses that override ``_group_blocks``
    always get the dense path.
    """

    normalize: ClassVar[bool] = False  # cosine instead of dot product

    def _cache(self) -> None:
        self._G: torch.Tensor | None = None
        self._factor_mode = self._choose_factor_mode()
        if self._factor_mode:
            return
        K, p = self.grouping.n_groups, self.task.n_params
        if K * p * torch.finfo(self.task.dtype).bits / 8 <= self.memory_mb * 2**20:
            G = torch.zeros(K, p, dtype=self.task.dtype, device=self.task.device)
            for gids, block in self._group_blocks():
                G[torch.as_tensor(gids, device=G.device)] = block
            self._G = G

    def _group_blocks(self):
        yield from iter_group_gradients(
            self.task,
            self.train.X,
            self.train.y,
            self.grouping,
            max_batch=self.max_batch,
            memory_mb=min(256.0, self.memory_mb),
        )

    def precondition(self, target_grads: torch.Tensor) -> torch.Tensor:
        """Transform (T, p) target gradients before the inner product; identity by default."""
        return target_grads

    # -- factor fast path (internal) ------------------------------------------------------------
    def _identity_precondition(self) -> bool:
        return type(self).precondition is InnerProductAttributor.precondition

    def _choose_factor_mode(self) -> bool:
        """Cache layer factors instead of group gradients when that is exact and cheaper."""
        from ggda.gradients import fast_inner

        self._plan = None
        self._factors: list | None = None
        if type(self)._group_blocks is not InnerProductAttributor._group_blocks:
            return False
        K, n, p = self.grouping.n_groups, len(self.train), self.task.n_params
        singleton = K == n
        if self.normalize and not singleton:
            return False  # the norm of a group gradient does not factorise
        plan = self._factor_plan()
        if plan is None:
            return False
        itemsize = torch.finfo(self.task.dtype).bits // 8
        gbytes = K * p * itemsize
        if singleton:  # per point: factors, unless a preconditioned method can hold n × p gradients
            if not self._identity_precondition() and gbytes <= self.memory_mb * 2**20:
                return False
        elif fast_inner.factor_bytes(plan, n, itemsize) > gbytes:
            return False
        self._use_factors(plan)
        return True

    def _factor_plan(self):
        """The layer plan when every training gradient is a rank-one outer product of layer
        factors (an MLP), else None (convolutions, sequences, unsupported modules)."""
        from ggda.gradients import fast_inner
        from ggda.gradients.fast_factors import fast_plan

        Xt, yt = self.task.to_tensor(self.train.X, self.train.y)
        params = self.task.params()
        plan = fast_plan(self.task, Xt[:8], yt[:8], self.task.loss_fn, params)
        if plan is None:
            return None
        first = fast_inner.layer_factors(self.task, plan, Xt[:2], yt[:2], self.task.loss_fn, params)
        return plan if fast_inner.is_rank_one(first) else None

    def _use_factors(self, plan) -> None:
        """Serve the training side from ``plan``'s factors: cached when they fit ``memory_mb``."""
        from ggda.gradients import fast_inner

        self._plan = plan
        itemsize = torch.finfo(self.task.dtype).bits // 8
        if fast_inner.factor_bytes(plan, len(self.train), itemsize) <= self.memory_mb * 2**20:
            self._factors = list(self._factor_chunks())

    def _factor_chunks(self):
        """(rows, squeezed factors) of the training loss over the training set, cached or streamed."""
        from ggda.gradients import fast_inner

        if self._factors is not None:
            yield from self._factors
            return
        Xt, yt = self.task.to_tensor(self.train.X, self.train.y)
        for rows, f in fast_inner.iter_factors(
            self.task, self._plan, Xt, yt, self.task.loss_fn, self.task.params(), self.max_batch
        ):
            yield rows, fast_inner.squeeze(f)

    def _rank_one_targets(self, prop: Property):
        """Squeezed target factors when targets are per-example functions (identity precondition)."""
        from ggda.gradients import fast_inner
        from ggda.gradients.fast_factors import fast_plan
        from ggda.properties import ExampleProperty

        if not (self._identity_precondition() and isinstance(prop, ExampleProperty)):
            return None
        Xt, yt = self.task.to_tensor(prop.X, prop.y)
        fn, params = prop.example_fn(self.task), self.task.params()
        if fast_plan(self.task, Xt, yt, fn, params) is None:
            return None
        parts = [
            f for _, f in fast_inner.iter_factors(self.task, self._plan, Xt, yt, fn, params, self.max_batch)
        ]
        if not all(fast_inner.is_rank_one(f) for f in parts):
            return None
        parts = [fast_inner.squeeze(f) for f in parts]
        return type(parts[0])(
            [torch.cat([f.A[i] for f in parts]) for i in range(len(parts[0].A))],
            [torch.cat([f.D[i] for f in parts]) for i in range(len(parts[0].D))],
        )

    def _attribute_factors(self, prop: Property, Gf: torch.Tensor | None = None) -> np.ndarray:
        from ggda.gradients import fast_inner

        plan = self._plan
        targets = None if Gf is not None else self._rank_one_targets(prop)
        if targets is None:
            Gf = self.precondition(prop.gradients(self.task)) if Gf is None else Gf
            T = Gf.shape[0]
            t_norm = Gf.norm(dim=1) if self.normalize else None
        else:
            T = targets.A[0].shape[0]
            t_norm = fast_inner.rank_one_sq_norms(plan, targets).sqrt() if self.normalize else None
        labels = fast_inner.as_labels(self.grouping.labels, self.task.device)
        scores = torch.zeros(T, self.grouping.n_groups, dtype=self.task.dtype, device=self.task.device)
        for rows, f in self._factor_chunks():
            if targets is not None:
                s = fast_inner.rank_one_scores(plan, f, targets)
            else:
                s = fast_inner.dense_target_scores(
                    plan, fast_inner.Factors([a[:, None] for a in f.A], [d[:, None] for d in f.D]), Gf
                )
            if self.normalize:  # singleton grouping only (see _choose_factor_mode)
                s = s / fast_inner.rank_one_sq_norms(plan, f).sqrt().clamp_min(1e-30)[None, :]
            fast_inner.segment_sum(s, labels[rows], self.grouping.n_groups, out=scores)
        if self.normalize:
            scores = scores / t_norm.clamp_min(1e-30)[:, None]
        return scores.cpu().numpy()

    # Dense preconditioned targets scored through factors cost n·p MACs each; streaming the K
    # group gradients again costs about two passes of n·p plus K·p per target. Above this many
    # targets (and below K = n) the group gradients are the cheaper route.
    _FACTOR_MAX_TARGETS: ClassVar[int] = 2

    def _attribute(self, prop: Property) -> np.ndarray:
        if getattr(self, "_factor_mode", False):
            if self._identity_precondition():
                return self._attribute_factors(prop)
            Gf = self.precondition(prop.gradients(self.task))
            if self.grouping.n_groups == len(self.train) or len(Gf) <= self._FACTOR_MAX_TARGETS:
                return self._attribute_factors(prop, Gf)
            return self._dense_scores(Gf)
        return self._dense_scores(self.precondition(prop.gradients(self.task)))

    def _dense_scores(self, Gf: torch.Tensor) -> np.ndarray:
        """(T, K) scores of (preconditioned) target gradients against the group gradients."""
        if self.normalize:
            Gf = Gf / Gf.norm(dim=1, keepdim=True).clamp_min(1e-30)
        scores = torch.zeros(Gf.shape[0], self.grouping.n_groups, dtype=Gf.dtype, device=Gf.device)
        blocks = (
            [(np.arange(self.grouping.n_groups), self._G)] if self._G is not None else self._group_blocks()
        )
        for gids, G in blocks:
            if self.normalize:
                G = G / G.norm(dim=1, keepdim=True).clamp_min(1e-30)
            scores[:, torch.as_tensor(gids, device=Gf.device)] = Gf @ G.T
        return scores.cpu().numpy()
