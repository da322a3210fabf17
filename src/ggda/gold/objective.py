"""The per-run further-training objective, shared by the sequential and vectorised paths.

``obj(θ) = Σ_b w_b ℓ(z_b; θ) / divisor  -  Σ_j c_j ℓ(z_j; θ)``: the weighted batch term covers
``mask`` and ``sampler`` removal; the second term is ``weight`` mode's ``-ε Σ_{j∈unit} ℓ_j``.
Both paths call this one function (the vectorised path through ``vmap(grad(...))``), so they
compute the same math.
"""

from __future__ import annotations

import torch

from ggda.errors import GGDAError
from ggda.task import AttributionTask, Params


def objective(
    task: AttributionTask,
    params: Params,
    X: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    divisor: torch.Tensor,
    Xe: torch.Tensor | None = None,
    ye: torch.Tensor | None = None,
    coef: torch.Tensor | None = None,
) -> torch.Tensor:
    obj = (task.losses(params, X, y) * weight).sum() / divisor
    if Xe is not None:
        obj = obj - (task.losses(params, Xe, ye) * coef).sum()
    return obj


def diverged(what: str, seed: int, epoch: int, value: float, lr: float) -> GGDAError:
    return GGDAError(
        f"Further training diverged (objective {value}) in run {what}, seed {seed}, epoch {epoch}; "
        f"lower --lr (now {lr}). Results of finished jobs are kept; rerun to resume."
    )
