"""Arnoldi low-rank eigendecomposition of H and the damped inverse on that subspace
(Schioppa et al. 2022, "Scaling Up Influence Functions").

``iterations`` Arnoldi steps (one HVP each, or ``block`` HVPs at a time in one pass; full
re-orthogonalisation for stability) build an orthonormal Krylov basis Q and the projected matrix Qᵀ H Q; its eigenpairs give Ritz pairs
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
    block: int = 1,
) -> LowRankEigen:
    """Top-``rank`` (by |μ|) Ritz pairs of a symmetric operator from ``iterations`` products.

    ``block`` = b > 1 runs block Arnoldi (block Lanczos with full re-orthogonalisation): each step
    multiplies b basis vectors at once, so the ``iterations`` products (rounded down to whole
    blocks) come in iterations / b passes over the data, each a GEMM over b vectors instead of b
    sequential matrix–vector passes; the Krylov space per product is smaller than with b = 1
    (depth iterations / b), which costs little when only a few eigenvalues are outliers (the
    if-cg preconditioner). The projected matrix Qᵀ H Q is formed
    from each step's products as they are made (Rayleigh–Ritz, no extra product, none kept).

    The iteration stops early when the Krylov space becomes invariant (exact for p ≤ iterations).
    ``progress`` reports each step with the relative size of the new Krylov directions, β_k / scale
    (the residual of the projection; ``None``: the process default of :mod:`ggda.progress`).
    """
    if iterations < 1 or rank < 1 or block < 1:
        raise GGDAError(
            "Arnoldi needs iterations >= 1, rank >= 1 and block >= 1; e.g. --opt rank=50 --opt iterations=200."
        )
    iterations = min(iterations, p)
    b = min(block, iterations)
    steps = max(1, iterations // b)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Q = torch.zeros(steps * b + b, p, dtype=dtype, device=device)
    Tm = torch.zeros(steps * b, steps * b, dtype=dtype, device=device)  # Qᵀ H Q, filled per step
    start = torch.randn(b, p, generator=gen, dtype=dtype).to(device)
    Q[:b] = torch.linalg.qr(start.T).Q.T
    tol = breakdown_tol if breakdown_tol is not None else 100 * torch.finfo(dtype).eps
    m = 0  # basis vectors whose products are known
    scale = 0.0
    label = f"Arnoldi ({steps * b} HVPs" + (f" in blocks of {b}" if b > 1 else "") + f", rank {rank})"
    with Iterations(label, steps, progress) as bar:
        for _ in range(steps):
            W = matvec(Q[m : m + b])
            if not bool(torch.isfinite(W).all()):
                raise GGDAError(
                    "Arnoldi: the Hessian-vector product is not finite; check the model and loss."
                )
            m += b
            # this block's column of Qᵀ H Q (its row follows by symmetry): no product is kept
            Tm[:m, m - b : m] = Q[:m] @ W.T
            Tm[m - b : m, : m - b] = Tm[: m - b, m - b : m].T
            scale = max(scale, float(W.norm(dim=1).max()))
            for _ in range(2):  # classical Gram–Schmidt twice ("twice is enough")
                W = W - (W @ Q[:m].T) @ Q[:m]
            # orthonormal basis of the new directions; columns that vanish (an invariant space)
            # are dropped by the rank test, and the iteration stops when none is left
            U, S, _ = torch.linalg.svd(W.T, full_matrices=False)
            if bar.on:
                bar.step(residual=float(S[0]) / max(scale, 1e-300))
            if m >= steps * b:
                break
            keep = int((S > tol * max(scale, 1e-300)).sum())
            if keep == 0:
                break
            new = U[:, :keep].T
            new = new - (new @ Q[:m].T) @ Q[:m]
            new = torch.linalg.qr(new.T).Q.T
            if keep < b:  # pad with fresh random directions orthogonal to the basis
                extra = torch.randn(b - keep, p, generator=gen, dtype=dtype).to(device)
                for _ in range(2):
                    extra = extra - (extra @ Q[:m].T) @ Q[:m] - (extra @ new.T) @ new
                new = torch.cat([new, torch.linalg.qr(extra.T).Q.T])
            Q[m : m + b] = new
    Qm = Q[:m]
    T = Tm[:m, :m]
    T = 0.5 * (T + T.T)  # symmetric operator: Qᵀ H Q (block tridiagonal up to rounding)
    mu, S = torch.linalg.eigh(T)
    order = torch.argsort(mu.abs(), descending=True)[: min(rank, m)]
    return LowRankEigen(mu[order], Qm.T @ S[:, order])


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
