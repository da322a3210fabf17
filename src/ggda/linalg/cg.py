"""Batched (preconditioned) conjugate gradient for (H + λI) X = B with an HVP operator
(Martens 2010; Koh & Liang 2017; Saad 2003, Alg. 9.1 for the preconditioned form).

CG needs only products with H, converges in at most p steps in exact arithmetic and much faster
when the spectrum of H + λI is clustered. All T right-hand sides (one per target of a property)
run in lock-step so each iteration costs one *batched* HVP pass over the data; a column stops
updating once its relative residual ‖b − (H+λI)x‖ / ‖b‖ is below ``tol`` (the stopping rule is on
the residual itself, not on the preconditioned residual, so the answer's accuracy does not depend
on the preconditioner).

A preconditioner M ≈ H + λI (applied as M⁻¹, symmetric positive definite: EK-FAC/K-FAC factors or
low-rank Ritz pairs of the same curvature) clusters the spectrum of M⁻¹(H + λI) around 1, so the
same tolerance is met in fewer iterations, i.e. fewer curvature products — the only expensive
step. Products are counted per column (one HVP of one vector) in :class:`CGResult`.

CG requires H + λI positive definite. A direction with non-positive curvature means the damping
is too small for a non-convex model; that is reported as an error rather than silently producing
a meaningless solution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ggda.errors import GGDAError
from ggda.progress import Iterations

Matvec = Callable[[torch.Tensor], torch.Tensor]
MAX_CHECKS = 3  # true-residual confirmations per solve (``verify``)


@dataclass
class CGResult:
    """Solution and convergence record of :func:`ihvp_cg`.

    Attributes:
        x: (T, p) (or (p,)) solutions.
        iterations: iterations run (of the slowest column).
        residual: (T,) final relative residuals ‖B − (H+λI)X‖ / ‖B‖ (the recurrence's residual).
        converged: whether every column reached ``tol``.
        products: curvature products used, one per column per product (the initial residual of a
            warm start included): the cost that does not depend on how columns are batched.
        column_iterations: (T,) iterations each column ran before it met ``tol``.
    """

    x: torch.Tensor
    iterations: int
    residual: torch.Tensor
    converged: bool
    products: int = 0
    column_iterations: torch.Tensor | None = None


def ihvp_cg(
    matvec: Matvec,
    B: torch.Tensor,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iter: int = 100,
    x0: torch.Tensor | None = None,
    progress: bool | None = None,
    precondition: Matvec | None = None,
    verify: bool = False,
) -> CGResult:
    """Solve (H + λI) X = B by (preconditioned) conjugate gradient, column-wise and vectorised.

    Args:
        matvec: V (T, p) -> H V (T, p).
        B: (p,) or (T, p) right-hand sides.
        damping: λ added to the diagonal.
        tol: stop a column when ‖r‖ ≤ tol · ‖b‖ (the true relative residual's recurrence, whatever
            the preconditioner).
        max_iter: iteration cap.
        x0: optional warm start (p,) or (T, p); costs one product per column for its residual.
        progress: report each iteration with the largest relative residual and the columns still
            running (``None``: the process default of :mod:`ggda.progress`, off in the library).
        precondition: R (k, p) -> M⁻¹ R for a symmetric positive definite M ≈ H + λI (``None``:
            plain CG). It changes how fast the residual falls, not the solution it converges to.
        verify: when every column has met ``tol`` by the recurrence, recompute b − (H+λI)x (one
            product per column) and continue the columns above ``tol`` from there (at most
            ``MAX_CHECKS`` times): the returned residuals are then true residuals.

    Raises:
        GGDAError: when H + λI shows non-positive curvature along a search direction.
    """
    single = B.ndim == 1
    B = B[None] if single else B
    op = (lambda V: matvec(V) + damping * V) if damping else matvec
    pre = precondition if precondition is not None else (lambda R: R)
    products = 0
    if x0 is None:
        X, R = torch.zeros_like(B), B.clone()
    else:
        X = (x0[None] if single else x0).to(B.dtype).clone()
        R = B - op(X)
        products += len(B)
    bnorm = B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)
    rs = (R * R).sum(1)
    active = rs.sqrt() > tol * bnorm
    Z = torch.zeros_like(B)
    Z[active] = pre(R[active]) if bool(active.any()) else Z[active]
    P = Z.clone()
    rz = (R * Z).sum(1)
    col_iters = torch.zeros(len(B), dtype=torch.long)
    it, checks = 0, 0
    what = "PCG" if precondition is not None else "CG"
    with Iterations(f"{what} solve ({B.shape[0]} right-hand sides, tol {tol:g})", max_iter, progress) as bar:
        while it < max_iter:
            if not bool(active.any()):
                # the recurrence's residual drifts from b − A x in finite precision: confirm it with
                # one product per column (counted) and restart the columns that are not there yet
                if not verify or checks >= MAX_CHECKS:
                    break
                checks += 1
                R = B - op(X)
                products += len(B)
                rs = (R * R).sum(1)
                active = rs.sqrt() > tol * bnorm
                if not bool(active.any()):
                    break
                idx = active.nonzero()[:, 0]
                Z[idx] = pre(R[idx])
                P[idx] = Z[idx]
                rz[idx] = (R[idx] * Z[idx]).sum(1)
            it += 1
            idx = active.nonzero()[:, 0]
            Pa = P[idx]
            AP = op(Pa)
            products += len(idx)
            col_iters[idx.cpu()] += 1
            curv = (Pa * AP).sum(1)
            if bool((curv <= 0).any()):
                raise GGDAError(
                    f"CG met non-positive curvature at iteration {it}: H + λI (λ={damping:.3g}) is not "
                    "positive definite; raise the damping (--opt damping_scale=...) or use --opt hessian=gn."
                )
            alpha = rz[idx] / curv
            X[idx] += alpha[:, None] * Pa
            Ra = R[idx] - alpha[:, None] * AP
            R[idx] = Ra
            Za = pre(Ra)
            rz_new = (Ra * Za).sum(1)
            beta = rz_new / rz[idx]
            P[idx] = Za + beta[:, None] * Pa
            rz[idx] = rz_new
            rs[idx] = (Ra * Ra).sum(1)
            active[idx] = rs[idx].sqrt() > tol * bnorm[idx]
            if bar.on:
                bar.step(
                    residual=float((rs.sqrt() / bnorm).max()), active=f"{int(active.sum())}/{len(active)}"
                )
    residual = rs.sqrt() / bnorm
    return CGResult(X[0] if single else X, it, residual, not bool(active.any()), products, col_iters)
