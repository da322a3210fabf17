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
from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.methods.training_side import TrainingGradients
from ggda.options import Spec
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
    from ggda.options import check_method_options  # types and ranges, by the constructor's annotations

    return cls(task, **check_method_options(cls, options, name))


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
    """Group-native attribution method: ``cache(train, grouping)`` then ``attribute(property)``.

    Args:
        aggregate: group score from its members: ``sum`` (default; the paper's group score) or
            ``mean`` (the sum divided by the group size).
        max_batch: training rows per forward/backward chunk (lower it when memory is short).
        memory_mb: memory budget in MB for cached group gradients and working blocks; above it
            group gradients are streamed instead of held.
    """

    name: ClassVar[str] = "attributor"
    option_specs: ClassVar[dict] = {"aggregate": Spec(str, choices=AGGREGATES)}

    def __init__(
        self, task: AttributionTask, aggregate: str = "sum", max_batch: int = 2048, memory_mb: float = 1024.0
    ) -> None:
        if aggregate not in AGGREGATES:
            raise GGDAError(f"Unknown aggregate '{aggregate}'; choose one of {', '.join(AGGREGATES)}.")
        self.task, self.aggregate = task, aggregate
        self.max_batch, self.memory_mb = max_batch, memory_mb
        self.train: Dataset | None = None
        self.grouping: Grouping | None = None

    def cache(self, train: Dataset, grouping: Grouping | np.ndarray | None = None) -> Attributor:
        """Remember the training set and grouping and do the training-side precomputation.

        ``train``: a ggda :class:`~ggda.data.Dataset`, ``(X, y)`` arrays, a map-style torch
        ``Dataset``, an unshuffled ``DataLoader`` or a Hugging Face ``datasets.Dataset``.
        ``grouping``: a :class:`~ggda.data.Grouping`, one group id per training point (any
        hashable values: a data-source column), or ``None`` for per-point attribution.
        """
        from ggda.data.sources import as_dataset

        train = as_dataset(train)
        if grouping is None:
            grouping = Grouping.singleton(len(train))
        elif not isinstance(grouping, Grouping):
            grouping = Grouping.from_ids(np.asarray(grouping))
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

    Composition: a method is a *preconditioner* (identity here; a damped inverse Hessian by
    explicit/CG/LiSSA/Arnoldi/EK-FAC solves, DataInf's per-layer closed form, the batched Fisher)
    plus the *training side* (:class:`~ggda.methods.training_side.TrainingGradients`, composed in
    ``cache()``: group gradients held as layer factors, a dense matrix or streamed — whichever is
    exact and cheapest for this model and these sizes). A method declares ``preconditioned =
    True`` when it overrides :meth:`precondition`; nothing is inferred from which methods a
    subclass overrides.
    """

    normalize: ClassVar[bool] = False  # cosine instead of dot product
    preconditioned: ClassVar[bool] = False  # precondition() is not the identity

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "precondition" in cls.__dict__ and not cls.__dict__.get("preconditioned", cls.preconditioned):
            raise TypeError(
                f"{cls.__name__} defines precondition(); declare preconditioned = True on the class so "
                "the training side scores dense targets (identity shortcuts would skip it)."
            )

    def _cache(self) -> None:
        self.side = TrainingGradients(
            self.task,
            self.train,
            self.grouping,
            max_batch=self.max_batch,
            memory_mb=self.memory_mb,
            preconditioned=self.preconditioned,
            normalize=self.normalize,
        )

    def precondition(self, target_grads: torch.Tensor) -> torch.Tensor:
        """Transform (T, p) target gradients before the inner product; identity by default."""
        return target_grads

    def _attribute(self, prop: Property) -> np.ndarray:
        if not self.preconditioned:
            direct = self.side.example_scores(prop)  # per-example targets straight from factors
            if direct is not None:
                return direct
        return self.side.scores(self.precondition(prop.gradients(self.task)))
