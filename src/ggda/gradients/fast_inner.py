"""Inner products with per-example gradients straight from layer factors (no n × p matrix).

For an MLP layer (L = 1) a per-example gradient is the outer product ``δ_i a_iᵀ``, so

    ⟨∇_W ℓ_i, ∇_W f_t⟩ = (δ_iᵀ δ_t)(a_iᵀ a_t),        ⟨∇_b ℓ_i, ∇_b f_t⟩ = δ_iᵀ δ_t,

and Grad-Dot against T single-example targets costs two (T × d)(d × n) products per layer —
about the cost of a forward pass — instead of forming n × p gradients (p ≈ Σ d_in·d_out) and a
T × p × n product. Norms factorise the same way (Grad-Cos). A target whose gradient is *not*
rank one per layer (a mean loss, a preconditioned IF target) is handled exactly with
``Σ_o δ_{i,o} (W_t a_i)_o``: one GEMM per layer, still without n × p memory.

Group scores of inner-product methods are linear in the group gradient, so the score of group S
is the sum of its members' scores (segment sum) — exact, not an approximation.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ggda.gradients.fast_factors import ExampleFn, Factors, LayerPlan, layer_factors
from ggda.task import AttributionTask, Params


def factor_bytes(plan: LayerPlan, n: int, itemsize: int = 4) -> int:
    """Memory of the rank-one factors of n examples (L = 1)."""
    return n * sum(s.d_in + s.d_out for s in plan.layers) * itemsize


def iter_factors(
    task: AttributionTask,
    plan: LayerPlan,
    Xt: torch.Tensor,
    yt: torch.Tensor,
    fn: ExampleFn,
    params: Params,
    chunk_size: int = 2048,
) -> Iterator[tuple[slice, Factors]]:
    """Factors of consecutive row chunks (one forward/backward each)."""
    for start in range(0, len(Xt), chunk_size):
        rows = slice(start, min(start + chunk_size, len(Xt)))
        yield rows, layer_factors(task, plan, Xt[rows], yt[rows], fn, params)


def is_rank_one(factors: Factors) -> bool:
    """Every layer is applied once per example to a vector (an MLP), so gradients are outer products."""
    return all(a.shape[1] == 1 for a in factors.A)


def squeeze(factors: Factors) -> Factors:
    return Factors([a[:, 0] for a in factors.A], [d[:, 0] for d in factors.D])


def rank_one_scores(plan: LayerPlan, train: Factors, target: Factors) -> torch.Tensor:
    """(T, B) inner products of per-example gradients given squeezed (B, d) factors."""
    out = None
    for spec, a, d, at, dt in zip(plan.layers, train.A, train.D, target.A, target.D, strict=True):
        dd = dt @ d.T
        if spec.weight is not None:
            term = dd * (at @ a.T)
            if spec.bias is not None:
                term += dd
        else:
            term = dd
        out = term if out is None else out + term
    return out


def rank_one_param_sq_norms(plan: LayerPlan, factors: Factors) -> dict[str, torch.Tensor]:
    """Per attributed parameter, (B,) squared norms of its part of each per-example gradient:
    ‖δ_i‖²‖a_i‖² for a weight, ‖δ_i‖² for a bias (squeezed factors)."""
    out = {}
    for spec, a, d in zip(plan.layers, factors.A, factors.D, strict=True):
        dn = d.pow(2).sum(1)
        if spec.weight is not None:
            out[spec.weight] = dn * a.pow(2).sum(1)
        if spec.bias is not None:
            out[spec.bias] = dn
    return out


def rank_one_sq_norms(plan: LayerPlan, factors: Factors) -> torch.Tensor:
    """(B,) squared gradient norms ‖g_i‖² = Σ_l ‖δ_i‖² (‖a_i‖² [+ 1 for the bias])."""
    return sum(rank_one_param_sq_norms(plan, factors).values())


def dense_target_param_scores(
    plan: LayerPlan, train: Factors, Gf: torch.Tensor, max_mb: float = 64.0
) -> dict[str, torch.Tensor]:
    """Per attributed parameter, (T, B) inner products of its block of the dense targets Gf (T, p)
    with the same block of the per-example gradients in ``train``.

    ``Σ_o δ_{i,o} (W_t a_i)_o`` for a weight (summed over positions, any L), ``δ_iᵀ b_t`` for a
    bias; never forms per-example gradients; rows are processed in slices so the (rows, T·d_out)
    product stays under ``max_mb``.
    """
    T = Gf.shape[0]
    B = train.A[0].shape[0]
    out = {}
    for spec, a, d in zip(plan.layers, train.A, train.D, strict=True):
        L = a.shape[1]
        if spec.weight is not None:
            W = Gf[:, plan.slices[spec.weight]].reshape(T * spec.d_out, spec.d_in)
            scores = torch.empty(T, B, dtype=Gf.dtype, device=Gf.device)
            step = max(1, int(max_mb * 2**20 // (4 * max(1, L * T * spec.d_out))))
            for s in range(0, B, step):
                z = (a[s : s + step] @ W.T).view(-1, L, T, spec.d_out)  # (b, L, T, d_out)
                scores[:, s : s + step] = torch.einsum("bltd,bld->tb", z, d[s : s + step])
            out[spec.weight] = scores
        if spec.bias is not None:
            out[spec.bias] = Gf[:, plan.slices[spec.bias]] @ d.sum(1).T
    return out


def dense_target_scores(
    plan: LayerPlan, train: Factors, Gf: torch.Tensor, max_mb: float = 64.0
) -> torch.Tensor:
    """(T, B) inner products of dense targets Gf (T, p) with the per-example gradients in ``train``
    (the sum of :func:`dense_target_param_scores` over parameters)."""
    return sum(dense_target_param_scores(plan, train, Gf, max_mb).values())


def segment_sum(scores: torch.Tensor, labels: torch.Tensor, n_groups: int, out: torch.Tensor | None = None):
    """(T, K) += per-example scores (T, B) summed into their groups."""
    if out is None:
        out = torch.zeros(scores.shape[0], n_groups, dtype=scores.dtype, device=scores.device)
    out.index_add_(1, labels, scores)
    return out


def as_labels(labels: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(labels, dtype=torch.long, device=device)
