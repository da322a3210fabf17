"""Arnoldi low-rank eigendecomposition of H and the damped inverse on that subspace
(Schioppa et al. 2022, "Scaling Up Influence Functions").

``iterations`` Arnoldi steps (one HVP each, full re-orthogonalisation for stability) build an
orthonormal Krylov basis Q and the projected matrix Qᵀ H Q; its eigenpairs give Ritz pairs
(μ_k, u_k) of H, of which the ``rank`` largest in magnitude are kept (the outliers of the
spectrum that dominate influence). The inverse is then applied on that subspace only:

    (H + λI)⁻¹ v ≈ U diag(1/(μ + λ)) Uᵀ v,

dropping the complement (Schioppa et al.'s choice: it projects gradients onto the top
eigendirections), or — ``complement=μ_c`` — treating the complement as if its eigenvalues were
μ_c (e.g. the smallest kept Ritz value, an upper bound for them):

    (H + λI)⁻¹ v ≈ U diag(1/(μ + λ)) Uᵀ v + (v − U Uᵀ v)/(μ_c + λ).

With ``iterations`` and ``rank`` ≥ p the result is the exact damped inverse either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ggda.errors import GGDAError
from ggda.progress import Iterations

Matvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LowRankEigen:
    """Ritz pairs of H: ``values`` (r,), ``vectors`` (p, r) orthonormal columns."""

    values: torch.Tensor
    vectors: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.values.numel())


def arnoldi(
    matvec: Matvec,
    p: int,
    iterations: int = 200,
    rank: int = 50,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    breakdown_tol: float | None = None,
    progress: bool | None = None,
) -> LowRankEigen:
    """Top-``rank`` (by |μ|) Ritz pairs of a symmetric operator from ``iterations`` Arnoldi steps.

    The iteration stops early when the Krylov space becomes invariant (exact for p ≤ iterations).
    ``progress`` reports each step with the relative size of the new Krylov direction, β_k / scale
    (the residual of the projection; ``None``: the process default of :mod:`ggda.progress`).
    """
    if iterations < 1 or rank < 1:
        raise GGDAError(
            "Arnoldi needs iterations >= 1 and rank >= 1; e.g. --opt rank=50 --opt iterations=200."
        )
    iterations = min(iterations, p)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(p, generator=gen, dtype=dtype).to(device)
    Q = torch.zeros(iterations + 1, p, dtype=dtype, device=device)
    Hm = torch.zeros(iterations + 1, iterations, dtype=dtype, device=device)
    Q[0] = q / q.norm()
    tol = breakdown_tol if breakdown_tol is not None else 100 * torch.finfo(dtype).eps
    m = iterations
    scale = None
    with Iterations(f"Arnoldi ({iterations} HVPs, rank {rank})", iterations, progress) as bar:
        for k in range(iterations):
            w = matvec(Q[k][None])[0]
            if not bool(torch.isfinite(w).all()):
                raise GGDAError(
                    "Arnoldi: the Hessian-vector product is not finite; check the model and loss."
                )
            for _ in range(2):  # classical Gram–Schmidt twice ("twice is enough")
                c = Q[: k + 1] @ w
                w = w - c @ Q[: k + 1]
                Hm[: k + 1, k] += c
            beta = w.norm()
            scale = max(float(scale or 0.0), float(Hm[: k + 1, k].abs().max()), float(beta))
            Hm[k + 1, k] = beta
            if bar.on:
                bar.step(residual=float(beta) / max(scale, 1e-300))
            if float(beta) <= tol * max(scale, 1e-300):
                m = k + 1
                break
            Q[k + 1] = w / beta
    T = Hm[:m, :m]
    T = 0.5 * (T + T.T)  # symmetric operator: the projected matrix is (numerically) tridiagonal
    mu, S = torch.linalg.eigh(T)
    order = torch.argsort(mu.abs(), descending=True)[: min(rank, m)]
    return LowRankEigen(mu[order], Q[:m].T @ S[:, order])


def ihvp_arnoldi(
    eig: LowRankEigen, B: torch.Tensor, damping: float = 0.0, complement: float | None = None
) -> torch.Tensor:
    """U diag(1/(μ + λ)) Uᵀ B for B (p,) or (T, p): the damped inverse on the Ritz subspace, plus
    (B − U Uᵀ B)/(complement + λ) on its orthogonal complement when ``complement`` is given."""
    coef = B @ eig.vectors  # (T, r)
    out = (coef / (eig.values + damping)) @ eig.vectors.T
    if complement is not None:
        rest = B - coef @ eig.vectors.T
        if float(complement) + damping <= 0:
            raise GGDAError("Arnoldi: the complement needs complement + damping > 0.")
        out = out + rest / (float(complement) + damping)
    return out
