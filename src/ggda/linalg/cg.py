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

:func:`ihvp_block_cg` solves the T systems together in one shared block Krylov space (O'Leary 1980;
breakdown-free variant of Ji & Li 2017): each iteration multiplies one block of search directions
drawn from all T residuals, and every column takes its Galerkin-optimal step in it, so an outlying
eigendirection that CG would have to find once per target is found once for all of them — the
residuals of related targets (test gradients of one model) share their outliers at both ends of
the spectrum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ggda.errors import GGDAError
from ggda.progress import Iterations

Matvec = Callable[[torch.Tensor], torch.Tensor]
#: block CG keeps a new direction only if the residuals carry at least this much along it, in
#: units of each column's tolerance tol·‖b‖: weaker directions cannot hold any column above tol
#: by themselves, so the last iterations multiply fewer vectors than there are active columns
#: (MLP, 50 targets to 1e-4: 313 products instead of 346 with every direction kept)
BLOCK_DROP = 1.0
#: previous blocks block CG conjugates each new block against: with the shrinking, adaptive
#: blocks the short recurrence (the last block only) loses conjugacy to older ones (their share
#: of a new block grows to ~2e-3 in float32), but two suffice in practice — MLP, 50 targets: 313
#: products against 309 with every block kept, at 0.9 s instead of 1.5–2.1 s of orthogonalisation
#: (memory-bound: every kept vector is read twice per iteration); LR, 100 targets: 330 either way
BLOCK_HISTORY = 2
MAX_CHECKS = 3  # true-residual confirmations per solve (``verify``)


def damped(matvec: Matvec, damping: float) -> Matvec:
    """V ↦ H V + λ V, with one new tensor per product (a block of 50 MLP-sized vectors is 20 MB)."""
    if not damping:
        return matvec
    return lambda V: torch.add(matvec(V), V, alpha=damping)


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


def _start(
    matvec: Matvec, B: torch.Tensor, damping: float, x0: torch.Tensor | None
) -> tuple[torch.Tensor, Matvec, torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """What both CG solvers start from: (T, p) right-hand sides, the damped operator, X₀ and its
    residual (one product per column for a warm start, counted), and the columns' norms ‖b‖."""
    B = B[None] if B.ndim == 1 else B
    op = damped(matvec, damping)
    products = 0
    if x0 is None:
        X, R = torch.zeros_like(B), B.clone()
    else:
        X = (x0[None] if x0.ndim == 1 else x0).to(B.dtype).clone()
        R = B - op(X)
        products += len(B)
    return B, op, X, R, products, B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)


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
    B, op, X, R, products, bnorm = _start(matvec, B, damping, x0)
    pre = precondition if precondition is not None else (lambda R: R)
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
            if not bool(torch.isfinite(curv).all()):  # a NaN residual would otherwise read as converged
                raise GGDAError("CG: the curvature product is not finite; check the model and loss.")
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


def ihvp_block_cg(
    matvec: Matvec,
    B: torch.Tensor,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iter: int = 100,
    x0: torch.Tensor | None = None,
    progress: bool | None = None,
    precondition: Matvec | None = None,
    history: int | None = BLOCK_HISTORY,
    drop: float = BLOCK_DROP,
) -> CGResult:
    """Solve (H + λI) X = B by block (preconditioned) conjugate gradient over all columns at once.

    Iteration k multiplies one block P_k of search directions (one product each) and updates every
    column still above ``tol`` by its Galerkin step X += α P_k, R −= α (H+λI)P_k with
    α = (R P_kᵀ)(P_k (H+λI) P_kᵀ)⁻¹. The next block spans the active columns' (preconditioned)
    residuals, each scaled to ‖r‖ / (tol·‖b‖) — its distance from done —, made (H+λI)-orthogonal
    to the blocks kept (``history``) and reduced by a rank-revealing eigendecomposition of its
    Gram matrix: directions that carry
    less than ``drop`` (in those units) or that are numerically dependent (e.g. two identical
    targets) are left out. The block therefore never has more vectors than active columns and
    shrinks as they converge; a column stops updating once ‖b − (H+λI)x‖ ≤ tol·‖b‖.

    Conjugacy is explicit, against the last ``history`` blocks, because the directions are chosen
    adaptively (dropped ones, a preconditioner): O'Leary's short recurrence (the last block only)
    would not make them conjugate to older ones. Losing conjugacy costs iterations, never
    accuracy: every step is a Galerkin step on its own block and the residual is tracked exactly.
    That residual is the recurrence b − Σ_k (H+λI)P_k α_k of the products as made (it differs
    from a recomputed b − (H+λI)x only by the rounding of those products), so no product is
    spent on a final check.

    Args:
        matvec: V (k, p) -> H V (k, p).
        B: (p,) or (T, p) right-hand sides.
        damping: λ added to the diagonal.
        tol: stop a column when ‖r‖ ≤ tol · ‖b‖.
        max_iter: iteration (block product) cap.
        x0: optional warm start (p,) or (T, p); costs one product per column for its residual.
        progress: report each iteration with the largest relative residual and the block size.
        precondition: R (k, p) -> M⁻¹ R for a symmetric positive definite M ≈ H + λI (``None``:
            none); a nonlinear or changing M is allowed (the blocks are orthogonalised explicitly).
        history: previous blocks each new one is made (H+λI)-orthogonal to (``None``: all; at
            least the last). Memory: 2·p floats per kept direction, at most 2·history·T·p.
        drop: the smallest residual content, in units of tol·‖b‖, for which a direction is kept.

    Raises:
        GGDAError: when H + λI shows non-positive curvature on a block of search directions.
    """
    single = B.ndim == 1
    B, op, X, R, products, bnorm = _start(matvec, B, damping, x0)
    rel = R.norm(dim=1) / bnorm
    active = rel > tol
    col_iters = torch.zeros(len(B), dtype=torch.long)
    # numerical rank: the block's singular values S come from its Gram matrix, whose eigenvalues
    # S² are resolved down to ~eps·S₀², so S only down to ~√eps·S₀; below 10√eps·S₀ (float32:
    # 3.5e-3) a direction is rounding (or too weak to matter now: the residual keeps it for later)
    rank_tol = 10 * torch.finfo(B.dtype).eps ** 0.5
    # kept blocks: directions P, their products Q = (H+λI)P and W = (P Qᵀ)⁻¹, so that the
    # (H+λI)-orthogonal projection onto span(P) is V ↦ (V Qᵀ) W P (a list: concatenating them
    # would copy every kept vector at each iteration)
    blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    it = 0
    what = "block PCG" if precondition is not None else "block CG"
    with Iterations(f"{what} solve ({len(B)} right-hand sides, tol {tol:g})", max_iter, progress) as bar:
        while it < max_iter and bool(active.any()):
            idx = active.nonzero()[:, 0]
            every = len(idx) == len(B)  # no gather/scatter copies while every column runs
            Ra = R if every else R[idx]
            Z = Ra if precondition is None else precondition(Ra)
            scale = rel[idx] / tol / Z.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)
            Z = Z * scale[:, None]
            # (H+λI)-orthogonal to the kept blocks, one pass (MLP, 50 targets: a second pass
            # removes ~3e-7 of the block; blocks older than the last hold up to ~2e-3 of it as
            # the residuals shrink in float32, hence BLOCK_HISTORY = 2 rather than 1)
            for P_old, Q_old, W_old in blocks:
                Z = Z - ((Z @ Q_old.T) @ W_old) @ P_old
            # rank-revealing basis of the block from its Gram matrix (a third of a QR's time); the
            # kept directions need not be orthonormal, (H+λI)-orthonormality comes from W below
            G = (Z @ Z.T).double()
            S2, U = torch.linalg.eigh(0.5 * (G + G.T))
            S2, U = S2.flip(0), U.flip(1)
            S = S2.clamp_min(0).sqrt()
            keep = int(((S > drop) & (S > rank_tol * S[0])).sum())
            if keep == 0 and float(S[0]) > 0:
                keep = 1  # nothing above drop: the strongest direction still moves the columns
            if keep == 0:
                break  # the residuals lie in the space already searched (rounding): stalled
            P = (U[:, :keep] / S[:keep]).T.to(B.dtype) @ Z
            Q = op(P)
            products += keep
            it += 1
            col_iters[idx.cpu()] += 1
            C = (P @ Q.T).double()
            if not bool(torch.isfinite(C).all()):
                raise GGDAError("block CG: the curvature product is not finite; check the model and loss.")
            L, info = torch.linalg.cholesky_ex(0.5 * (C + C.T))
            if int(info) != 0:
                raise GGDAError(
                    f"block CG met non-positive curvature at iteration {it}: H + λI (λ={damping:.3g}) is not "
                    "positive definite; raise the damping (--opt damping_scale=...) or use --opt hessian=gn."
                )
            W = torch.cholesky_inverse(L).to(B.dtype)
            alpha = (Ra @ P.T) @ W  # each column's Galerkin step in span(P)
            if every:
                X += alpha @ P
                R -= alpha @ Q
                rel = R.norm(dim=1) / bnorm
            else:
                X[idx] += alpha @ P
                R[idx] = Ra - alpha @ Q
                rel[idx] = R[idx].norm(dim=1) / bnorm[idx]
            active[idx] = rel[idx] > tol
            blocks.append((P, Q, W))
            if history is not None and len(blocks) > max(1, history):
                blocks.pop(0)
            if bar.on:
                bar.step(residual=float(rel.max()), block=keep, active=f"{int(active.sum())}/{len(active)}")
    return CGResult(X[0] if single else X, it, rel, not bool(active.any()), products, col_iters)
