"""How well a grouping keeps per-point gradient information: within-group gradient variance.

GGDA's argument (NOTES §A4): a group score splits well among its members (τ_S/|S| ≈ τ_i) when the
members' gradients g_i are close to their group mean. The measure is the mean squared distance of
a point's gradient to its group's mean gradient,

    W = (1/n) Σ_S Σ_{i∈S} ‖g_i − ḡ_S‖² = (1/n) (Σ_i ‖g_i‖² − Σ_S ‖g_S‖² / |S|),   g_S = Σ_{i∈S} g_i,

reported with the total variance T (one group) and the ratio W/T (0 for singletons, 1 for one
group). The right-hand form needs only per-example squared norms and the *group* gradients g_S —
what GGDA computes anyway — so the n × p gradient matrix is never held.
"""

from __future__ import annotations

import numpy as np

from ggda.data.grouping import Grouping


def within_group_variance(features: np.ndarray, grouping: Grouping) -> float:
    """W for an explicit (n, d) feature/gradient matrix: mean squared distance to the group mean.

    Uses the same sum-of-squares identity as :func:`gradient_variance` (float64 accumulation),
    so no n × d temporaries beyond one reordered copy are made.
    """
    F = np.asarray(features).reshape(len(features), -1)
    grouping.check_matches(len(F), "the feature matrix")
    sq = sum(float(np.square(F[i : i + 4096], dtype=np.float64).sum()) for i in range(0, len(F), 4096))
    order = np.argsort(grouping.labels, kind="stable")
    starts = np.r_[0, np.cumsum(grouping.sizes)[:-1]]
    sums = np.add.reduceat(F[order], starts, axis=0, dtype=np.float64)  # groups are non-empty
    between = float((np.square(sums).sum(1) / grouping.sizes).sum())
    return max(sq - between, 0.0) / len(F)


def gradient_variance(
    task,
    X: np.ndarray,
    y: np.ndarray,
    grouping: Grouping,
    fn=None,
    params=None,
    chunk_size: int = 256,
) -> dict:
    """Within-group (W), total (T) and relative (W/T) variance of per-example loss gradients.

    Streams per-example gradients for Σ‖g_i‖² and uses batched group gradients for ‖g_S‖²;
    accumulates in float64.
    """
    import torch

    from ggda.gradients import iter_group_gradients, iter_per_example_gradients

    grouping.check_matches(len(X))
    n = len(X)
    sq_norms = 0.0
    total = None
    for _, G in iter_per_example_gradients(task, X, y, fn=fn, params=params, chunk_size=chunk_size):
        G64 = G.double()
        sq_norms += float((G64**2).sum())
        total = G64.sum(0) if total is None else total + G64.sum(0)
    sizes = torch.as_tensor(grouping.sizes, dtype=torch.float64)
    between = 0.0
    for gids, GS in iter_group_gradients(task, X, y, grouping, fn=fn, params=params):
        between += float(((GS.double() ** 2).sum(1).cpu() / sizes[torch.as_tensor(gids)]).sum())
    total_var = (sq_norms - float((total**2).sum()) / n) / n
    within = max(sq_norms - between, 0.0) / n
    return {
        "within": within,
        "total": total_var,
        "ratio": within / total_var if total_var > 0 else 0.0,
        "K": grouping.n_groups,
    }
