"""Batched conjugate gradient for (H + λI) X = B with an HVP operator (Martens 2010; Koh & Liang 2017).

CG needs only products with H, converges in at most p steps in exact arithmetic and much faster
when the spectrum of H + λI is clustered. All T right-hand sides (one per target of a property)
run in lock-step so each iteration costs one *batched* HVP pass over the data; a column stops
updating once its relative residual is below ``tol``.

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


@dataclass
class CGResult:
    """Solution and convergence record of :func:`ihvp_cg`.

    Attributes:
        x: (T, p) (or (p,)) solutions.
        iterations: iterations run.
        residual: (T,) final relative residuals ‖B − (H+λI)X‖ / ‖B‖.
        converged: whether every column reached ``tol``.
    """

    x: torch.Tensor
    iterations: int
    residual: torch.Tensor
    converged: bool


def ihvp_cg(
    matvec: Matvec,
    B: torch.Tensor,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iter: int = 100,
    x0: torch.Tensor | None = None,
    progress: bool | None = None,
) -> CGResult:
    """Solve (H + λI) X = B by conjugate gradient, column-wise and vectorised.

    Args:
        matvec: V (T, p) -> H V (T, p).
        B: (p,) or (T, p) right-hand sides.
        damping: λ added to the diagonal.
        tol: stop a column when ‖r‖ ≤ tol · ‖b‖.
        max_iter: iteration cap.
        x0: optional warm start.
        progress: report each iteration with the largest relative residual and the columns still
            running (``None``: the process default of :mod:`ggda.progress`, off in the library).

    Raises:
        GGDAError: when H + λI shows non-positive curvature along a search direction.
    """
    single = B.ndim == 1
    B = B[None] if single else B
    op = (lambda V: matvec(V) + damping * V) if damping else matvec
    X = torch.zeros_like(B) if x0 is None else (x0[None] if single else x0).clone()
    R = B - op(X) if x0 is not None else B.clone()
    P = R.clone()
    rs = (R * R).sum(1)
    bnorm = B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)
    active = rs.sqrt() > tol * bnorm
    it = 0
    with Iterations(f"CG solve ({B.shape[0]} right-hand sides, tol {tol:g})", max_iter, progress) as bar:
        while bool(active.any()) and it < max_iter:
            it += 1
            idx = active.nonzero()[:, 0]
            Pa = P[idx]
            AP = op(Pa)
            curv = (Pa * AP).sum(1)
            if bool((curv <= 0).any()):
                raise GGDAError(
                    f"CG met non-positive curvature at iteration {it}: H + λI (λ={damping:.3g}) is not "
                    "positive definite; raise the damping (--opt damping_scale=...) or use --opt hessian=gn."
                )
            alpha = rs[idx] / curv
            X[idx] += alpha[:, None] * Pa
            R[idx] -= alpha[:, None] * AP
            rs_new = (R[idx] * R[idx]).sum(1)
            beta = rs_new / rs[idx]
            P[idx] = R[idx] + beta[:, None] * Pa
            rs[idx] = rs_new
            active[idx] = rs_new.sqrt() > tol * bnorm[idx]
            if bar.on:
                bar.step(
                    residual=float((rs.sqrt() / bnorm).max()), active=f"{int(active.sum())}/{len(active)}"
                )
    residual = rs.sqrt() / bnorm
    return CGResult(X[0] if single else X, it, residual, not bool(active.any()))
