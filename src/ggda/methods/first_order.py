"""First-order methods: Grad-Dot, Grad-Cos and TracInCP, written once for groups.

In FiMODA's unified view (NOTES B3) these drop the Hessian: Grad-Dot ∝ the change of f after a
short further training, TracInCP sums that over the training trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ggda.errors import GGDAError
from ggda.methods.base import Attributor, InnerProductAttributor, register
from ggda.models.checkpoint import Checkpoint, load_state
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


@register("tracin")
class TracInCP(Attributor):
    """TracInCP: score_j = Σ_c η_c ∇f(θ_c)ᵀ g_{S_j}(θ_c) over saved checkpoints.

    Args:
        checkpoints: checkpoint files (as saved by training) or ``(path_or_state_dict, lr)`` pairs.
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
    def _normalise(c) -> tuple[object, float]:
        if isinstance(c, Checkpoint):
            return c.path, c.lr
        if isinstance(c, (str, Path)):
            payload = load_state(c)
            lr = payload.get("meta", {}).get("lr")
            if lr is None:
                raise GGDAError(f"Checkpoint {c} records no learning rate; pass (path, lr) pairs.")
            return payload["state_dict"], float(lr)
        if isinstance(c, tuple) and len(c) == 2:
            return c[0], float(c[1])
        raise GGDAError("TracIn checkpoints must be paths, Checkpoint objects or (state, lr) pairs.")

    def _attribute(self, prop: Property) -> np.ndarray:
        steps = self.checkpoints or [(None, 1.0)]
        total = None
        for state, lr in steps:
            task = self.task if state is None else self.task.at(state)
            inner = GradDot(task, max_batch=self.max_batch, memory_mb=self.memory_mb).cache(
                self.train, self.grouping
            )
            scores = inner.attribute(prop) * (lr if self.use_lr else 1.0)
            total = scores if total is None else total + scores
        return total
