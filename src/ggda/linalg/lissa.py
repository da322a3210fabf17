"""LiSSA: the damped inverse-HVP as a truncated, optionally stochastic Neumann series
(Agarwal et al. 2017; Koh & Liang 2017).

With A = (H + λI)/s and the spectrum of A inside (0, 2),

    (H + λI)⁻¹ v = (1/s) Σ_k (I − A)^k v,

computed by the recursion h₀ = v, h_j = v + (1 − λ/s) h_{j−1} − H h_{j−1}/s, answer h_J/s.
The scale s must exceed the largest eigenvalue of H + λI (of the *mini-batch* Hessians when the
operator samples batches) or the series diverges; ``repeat`` independent runs are averaged to
reduce the sampling noise.

Divergence check: while the series converges, ‖h_j‖ ≤ min(j+1, s/λ)·‖v‖. A norm that exceeds
that bound by ``divergence_factor`` (or becomes non-finite) means s is too small or H + λI is
indefinite; that raises a :class:`GGDAError` naming the fix instead of returning NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ggda.errors import GGDAError
from ggda.progress import Iterations

Matvec = Callable[[torch.Tensor], torch.Tensor]


def ihvp_lissa(
    matvec: Matvec,
    B: torch.Tensor,
    damping: float = 0.0,
    scale: float = 10.0,
    depth: int = 1000,
    repeat: int = 1,
    divergence_factor: float = 10.0,
    progress: bool | None = None,
) -> torch.Tensor:
    """(H + λI)⁻¹ B by LiSSA.

    Args:
        matvec: V (T, p) -> H V; may be stochastic (a fresh mini-batch Hessian per call).
        B: (p,) or (T, p) right-hand sides.
        damping: λ.
        scale: s > λ_max(H + λI).
        depth: recursion steps J per repetition.
        repeat: independent repetitions averaged.
        divergence_factor: slack over the convergent-series norm bound before giving up.
        progress: report each step with the relative change ‖h_j − h_{j−1}‖/‖h_j‖ (the series'
            residual; ``None``: the process default of :mod:`ggda.progress`, off in the library).
    """
    if scale <= 0 or depth < 1 or repeat < 1:
        raise GGDAError(
            "LiSSA needs scale > 0, depth >= 1 and repeat >= 1; e.g. --opt scale=10 --opt depth=1000."
        )
    single = B.ndim == 1
    V = B[None] if single else B
    vnorm = V.norm(dim=1)
    total = torch.zeros_like(V)
    with Iterations(f"LiSSA ({repeat} x {depth} steps)", repeat * depth, progress) as bar:
        for r in range(repeat):
            h = V.clone()
            for j in range(1, depth + 1):
                previous = h
                h = V + (1.0 - damping / scale) * h - matvec(h) / scale
                if bar.on:
                    change = float(((h - previous).norm(dim=1) / h.norm(dim=1).clamp_min(1e-300)).max())
                    bar.step(residual=change, repetition=r + 1)
                bound = min(j + 1.0, scale / damping if damping > 0 else float("inf"))
                hnorm = h.norm(dim=1)
                if not bool(torch.isfinite(hnorm).all()) or bool(
                    (hnorm > divergence_factor * bound * vnorm).any()
                ):
                    raise GGDAError(
                        f"LiSSA diverged at step {j} of repetition {r + 1} (scale={scale:.3g}, damping={damping:.3g}): "
                        "increase --opt scale=... above the largest Hessian eigenvalue, or raise the damping."
                    )
            total += h / scale
    out = total / repeat
    return out[0] if single else out
