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
    return METHODS[name](task, **options)


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
        """Remember the training set and grouping and do the training-side precomputation."""
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
    """

    normalize: ClassVar[bool] = False  # cosine instead of dot product

    def _cache(self) -> None:
        self._G: torch.Tensor | None = None
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

    def _attribute(self, prop: Property) -> np.ndarray:
        Gf = self.precondition(prop.gradients(self.task))
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
