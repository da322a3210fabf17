"""First-order methods: Grad-Dot, Grad-Cos and TracInCP, written once for groups.

In FiMODA's unified view (NOTES B3) these drop the Hessian: Grad-Dot ∝ the change of f after a
short further training, TracInCP sums that over the training trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ggda.errors import GGDAError
from ggda.methods.base import Attributor, InnerProductAttributor, register
from ggda.models.checkpoint import Checkpoint, learning_rate, load_state
from ggda.properties import Property
from ggda.task import AttributionTask


@register("grad-dot")
class GradDot(InnerProductAttributor):
    """score_j = ∇f(θ)ᵀ g_{S_j}: influence with H := I. Linear in the group, so group = Σ members."""


@register("grad-cos")
class GradCos(InnerProductAttributor):
    """score_j = cos(∇f(θ), g_{S_j}): Grad-Dot normalised by both gradient norms (group gradient
    normalised as a whole, so it is *not* the sum of member cosines)."""

    normalize = True


class _RateWeightedDot(InnerProductAttributor):
    """score_j = ∇f(θ)ᵀ diag(η) g_{S_j}: Grad-Dot with one learning rate per parameter — the
    first-order change of f after one SGD step whose parameter groups have different rates."""

    preconditioned = True

    def __init__(self, task: AttributionTask, rates: torch.Tensor, **options) -> None:
        super().__init__(task, **options)
        self.rates = rates

    def precondition(self, target_grads: torch.Tensor) -> torch.Tensor:
        return target_grads * self.rates.to(target_grads.dtype)


@register("tracin")
class TracInCP(Attributor):
    """TracInCP: score_j = Σ_c η_c ∇f(θ_c)ᵀ g_{S_j}(θ_c) over saved checkpoints.

    With parameter groups of different learning rates η_c is per parameter,
    ``Σ_c ∇f(θ_c)ᵀ diag(η_c) g_{S_j}(θ_c)``: each group moved at its own rate, so one rate for all
    would mis-weigh (say) a new head trained 10× faster than its pretrained body.

    Args:
        checkpoints: checkpoint files (as saved by training) or ``(path_or_state_dict, lr)`` pairs,
            ``lr`` a number or ``{parameter name: rate}`` (as
            :func:`ggda.integrations.load_checkpoints` returns for groups of different rates).
            Default: just the task's current model with η = 1 (which is Grad-Dot).
        use_lr: weight each checkpoint by its learning rate (Pruthi et al.); ``False`` gives
            GGDA's variant without η.
    """

    def __init__(
        self, task: AttributionTask, checkpoints: Sequence | None = None, use_lr: bool = True, **options
    ) -> None:
        super().__init__(task, **options)
        self.use_lr = use_lr
        self.checkpoints = [self._normalise(c) for c in (checkpoints or [])]

    @staticmethod
    def _normalise(c) -> tuple[object, float | dict[str, float]]:
        if isinstance(c, Checkpoint):
            return c.path, c.lr
        if isinstance(c, (str, Path)):
            payload = load_state(c)
            meta = payload.get("meta", {})
            lr = meta.get("param_lrs") or meta.get("lr")
            if lr is None:
                raise GGDAError(f"Checkpoint {c} records no learning rate; pass (path, lr) pairs.")
            return payload["state_dict"], learning_rate(lr, f"Checkpoint {c}")
        if isinstance(c, tuple) and len(c) == 2:
            return c[0], learning_rate(c[1], "A TracIn (state, lr) pair")
        raise GGDAError("TracIn checkpoints must be paths, Checkpoint objects or (state, lr) pairs.")

    def _rates(self, task: AttributionTask, lr: float | dict[str, float]) -> float | torch.Tensor:
        """The step's rate: one number, or a (p,) vector over the attributed parameters when
        their groups' rates differ."""
        if not self.use_lr:
            return 1.0
        if not isinstance(lr, dict):
            return lr
        missing = [n for n in task.param_names if n not in lr]
        if missing:
            raise GGDAError(
                f"The checkpoint's learning rates name no rate for attributed parameters {missing[:3]}; "
                "attribute only the parameters the optimizer trained (AttributionTask(layers=...)) or pass "
                "(state, lr) with one rate."
            )
        values = {lr[n] for n in task.param_names}
        if len(values) == 1:
            return values.pop()
        params = task.params()
        return task.flatten({n: torch.full_like(params[n], lr[n]) for n in task.param_names})

    def _attribute(self, prop: Property) -> np.ndarray:
        steps = self.checkpoints or [(None, 1.0)]
        total = None
        for state, lr in steps:
            task = self.task if state is None else self.task.at(state)
            rate = self._rates(task, lr)
            options = {"max_batch": self.max_batch, "memory_mb": self.memory_mb}
            if isinstance(rate, torch.Tensor):
                inner = _RateWeightedDot(task, rate, **options).cache(self.train, self.grouping)
                scores = inner.attribute(prop)
            else:
                inner = GradDot(task, **options).cache(self.train, self.grouping)
                scores = inner.attribute(prop) * rate
            total = scores if total is None else total + scores
        return total
