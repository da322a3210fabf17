"""Second-order group influence (Basu, You & Feizi, ICML 2020), in ggda's conventions.

First-order group influence is linear in the group: it scores removing S by ∇fᵀ H⁻¹ g_S / n and
misses that removing S also removes S's own curvature (and renormalises the mean loss). For
groups whose members pull the same way (class-coherent groups, clusters) the actual effect is
several times the first-order estimate. Basu et al. keep the next term of the expansion in the
removed fraction. Derived here for ggda's objective and conventions:

* training objective L(θ) = (1/n) Σ_i ℓ_i(θ) + (wd/2)‖θ‖²; H = (1/n) Σ_i ∇²ℓ_i + wd·I (+ λI
  damping), the mean Hessian (or Gauss–Newton) the IF solvers invert;
* removing S (m = |S|) means retraining on the rest with the same recipe, i.e. the *mean* loss
  over the n − m remaining points: L_{−S}(θ) = (1/(n−m)) Σ_{i∉S} ℓ_i + (wd/2)‖θ‖²;
* g_S = Σ_{i∈S} ∇ℓ_i (sum), H_S = Σ_{i∈S} ∇²ℓ_i (sum), ḡ = (1/n) Σ_i ∇ℓ_i, H_D = (1/n) Σ_i ∇²ℓ_i;
* score = f(θ_{−S}) − f(θ̂), positive = helpful.

At θ̂ (∇L = 0, so wd·θ̂ = −ḡ) the gradient and Hessian of L_{−S} are

    ∇L_{−S}(θ̂) = −(g_S − m ḡ) / (n − m) =: −ĝ_S / (n − m),
    ∇²L_{−S}(θ̂) = H + E_S,   E_S = (m H_D − H_S) / (n − m).

One Newton step on L_{−S} from θ̂ (third derivatives of the loss dropped) gives
Δ = (H + E_S)⁻¹ ĝ_S / (n − m); expanding the inverse to first order in E_S (which is O(m/n)) —
the second-order term in the removed fraction, Basu et al.'s expansion — gives

    Δ ≈ [H⁻¹ ĝ_S − H⁻¹ E_S H⁻¹ ĝ_S] / (n − m),

and with u = H⁻¹ ∇f (the vector every IF solver computes once per target)

    score₂(S) = uᵀ c_S,   c_S = [ĝ_S − E_S H⁻¹ ĝ_S] / (n − m).

The first-order score uᵀ g_S / n is recovered when m ≪ n and ḡ = 0. The terms, in words: the
1/(n − m) renormalisation (removing m of n points raises every remaining weight), the centring
by m ḡ (under weight decay ḡ = −wd θ̂ ≠ 0: the renormalised loss weighs the L2 term less), and
the curvature correction −E_S H⁻¹ ĝ_S: when the group's mean curvature exceeds the data's
(H_S/m ≻ H_D along H⁻¹ĝ_S, typical of coherent groups, which dominate the curvature along
their own gradient), E_S is negative there and the estimate grows — the under-estimation of
first-order influence for such groups.

More terms of the same expansion, c_S = Σ_{k<order} (−E_S H⁻¹)^k ĝ_S / (n − m), converge to the
Newton step (H + E_S)⁻¹ ĝ_S / (n − m) (their spectrum lies in (−1, m/(n−m)) for an exact H⁻¹);
``order=2`` is Basu et al.'s second order, ``order=k`` keeps k terms. On L2 logistic regression the
Newton step matches exact leave-group-out retraining (median score/actual 0.98–1.0): what the
second order misses is the truncation, not the dropped third derivatives.

Cost: the "effective group vectors" c_S are computed once in ``cache``: K solves with the
method's own (H + λI)⁻¹ (shared with every property), one curvature product of the K vectors
over all n rows, and one product per group over its own rows (together one more pass over the
data), per order above 1. They are held as a K × p matrix (refused above ``memory_mb``); scoring a property is then
the IF's usual solve for ∇f and a (T × p)·(p × K) product. For singleton groups this is n solves:
use it for groups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from ggda.data.grouping import Grouping
from ggda.errors import GGDAError


class Curvature(Protocol):
    """What the expansion needs of the curvature the method inverts (sums, no weight decay)."""

    def data_product(self, W: torch.Tensor) -> torch.Tensor:
        """Σ_i ∇²ℓ_i W over all n training points, W (K, p)."""

    def group_product(self, j: int, w: torch.Tensor) -> torch.Tensor:
        """Σ_{i∈S_j} ∇²ℓ_i w for group j, w (p,)."""


class HessianCurvature:
    """:class:`Curvature` from a :class:`~ggda.methods.curvature.TrainingCurvature` (Hessian or
    Gauss–Newton products over rows)."""

    def __init__(self, curvature, grouping: Grouping) -> None:
        self.curvature = curvature
        self.members = [torch.as_tensor(m) for m in grouping.member_lists()]

    def data_product(self, W: torch.Tensor) -> torch.Tensor:
        return self.curvature.sum_product(W)

    def group_product(self, j: int, w: torch.Tensor) -> torch.Tensor:
        return self.curvature.sum_product(w, self.members[j])


def effective_group_vectors(
    side,
    grouping: Grouping,
    inverse: Callable[[torch.Tensor], torch.Tensor],
    curvature: Curvature,
    memory_mb: float,
    order: int = 2,
    block: int = 256,
) -> torch.Tensor:
    """(K, p) effective group vectors c_S (module docstring) to ``order`` terms of the series
    c_S = Σ_{k<order} (−E_S P)^k ĝ_S / (n − |S|), P = (H + λI)⁻¹ the method's inverse.

    Args:
        side: the method's :class:`~ggda.methods.training_side.TrainingGradients` (group gradients).
        grouping: the K groups.
        inverse: V (T, p) ↦ (H + λI)⁻¹ V with the method's own solver.
        curvature: the curvature that ``inverse`` inverts, as sums over all rows and over a group
            (:class:`Curvature`; :class:`HessianCurvature` for the IF solvers).
        memory_mb: the method's memory budget; four K × p matrices must fit.
        order: 2 = Basu et al.'s second order; more terms converge to one Newton step on the
            group-removed objective (when the series converges, i.e. |S| < n/2 and P exact).
        block: groups solved together.
    """
    if order < 2:
        raise GGDAError(f"effective group vectors are for order >= 2 (got {order}).")
    K, n = grouping.n_groups, len(grouping)
    dtype, device = side.task.dtype, side.task.device
    p = side.task.n_params
    need = 4 * K * p * torch.finfo(dtype).bits / 8
    if need > memory_mb * 2**20:
        raise GGDAError(
            f"order={order} holds {K:,} x {p:,} effective group vectors ({need / 2**20:,.0f} MB > "
            f"memory_mb={memory_mb:g}); use fewer groups (--grouping) or raise --opt memory_mb=..."
        )
    if int(grouping.sizes.max()) >= n:
        raise GGDAError(f"order={order} needs every group to leave some training points (|S| < n).")
    R = torch.zeros(K, p, dtype=dtype, device=device)
    for gids, Gb in side.blocks():
        R[torch.as_tensor(gids, device=device)] = Gb.to(dtype)
    sizes = torch.as_tensor(grouping.sizes, dtype=dtype, device=device)
    R -= sizes[:, None] * (R.sum(0) / n)[None, :]  # ĝ_S = g_S − |S| ḡ
    C = R.clone()
    rest = (n - sizes)[:, None]
    for _ in range(order - 1):
        W = torch.cat([inverse(R[s : s + block]) for s in range(0, K, block)])  # P r
        R = sizes[:, None] * curvature.data_product(W) / n  # |S| H_D w
        for j in range(K):
            R[j] -= curvature.group_product(j, W[j])  # − H_S w
        R /= -rest  # −E_S w
        C += R
        del W
    return C / rest


def second_order_scores(U: torch.Tensor, C: torch.Tensor) -> np.ndarray:
    """(T, K) scores uᵀ c_S for (T, p) solved targets U = (H + λI)⁻¹ ∇f."""
    return (U.to(C.dtype) @ C.T).cpu().numpy()
