"""Linear datamodeling score (LDS; Park et al., 2023), for points and for groups.

An attribution τ (T targets × K units) is read as a *linear datamodel*: training on a subset S of
the units should change target t's loss by −Σ_{j∈S} τ_tj (positive τ = helpful lowers the loss).
LDS checks that prediction against reality: draw M random subsets, each keeping a fraction α of the
**units** (groups; points for singletons), retrain on each, and for every test target take the
Spearman correlation over the M subsets between the predicted −Σ_{j∈S} τ_tj and the actual test
loss. LDS is the mean over targets (1 = the attribution orders subsets exactly as retraining does;
0 = no better than chance). Subsets are shared by every method over the same grouping, so their
retrains are shared too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.evaluate.retraining import Retrainer


def subset_masks(n_units: int, n_subsets: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """(M, K) bool: each row keeps ``round(alpha·K)`` units chosen at random (seeded)."""
    if not 0.0 < alpha < 1.0:
        raise GGDAError(f"LDS subset fraction alpha={alpha} must lie strictly between 0 and 1, e.g. 0.5.")
    if n_subsets < 3:
        raise GGDAError("LDS needs at least 3 subsets for a rank correlation; use e.g. --subsets 50.")
    keep = int(round(alpha * n_units))
    if not 0 < keep < n_units:
        raise GGDAError(f"alpha={alpha} keeps {keep} of {n_units} units; use more groups or another alpha.")
    rng = np.random.default_rng([seed, n_units, 2023])
    masks = np.zeros((n_subsets, n_units), dtype=bool)
    for m in range(n_subsets):
        masks[m, rng.choice(n_units, keep, replace=False)] = True
    return masks


def rank_correlations(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """(T,) Spearman over subsets (axis 0) per target; NaN where either side is constant."""
    out = np.full(predicted.shape[1], np.nan)
    for t in range(predicted.shape[1]):
        p, a = predicted[:, t], actual[:, t]
        if np.ptp(p) > 0 and np.ptp(a) > 0:
            out[t] = spearmanr(p, a)[0]
    return out


@dataclass
class LDSResult:
    """LDS of one attribution: the mean and each target's correlation."""

    score: float
    per_target: np.ndarray  # (T,)
    predicted: np.ndarray  # (M, T) predicted loss change, −Σ_{j∈S} τ_tj
    actual: np.ndarray  # (M, T) test loss after retraining on S (mean over seeds)

    @property
    def sem(self) -> float:
        v = self.per_target[np.isfinite(self.per_target)]
        return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def lds_from_outcomes(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray) -> LDSResult:
    """LDS given scores (T, K), kept-unit masks (M, K) and actual losses (M, T)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise GGDAError(f"Scores of shape {scores.shape} do not match {masks.shape[1]} units.")
    if actual.shape != (masks.shape[0], scores.shape[0]):
        raise GGDAError(
            f"Actual losses {actual.shape} must be (subsets, targets) = ({masks.shape[0]}, {scores.shape[0]})."
        )
    predicted = -(masks.astype(np.float64) @ scores.T)
    per_target = rank_correlations(predicted, actual)
    score = float(np.nanmean(per_target)) if np.isfinite(per_target).any() else float("nan")
    return LDSResult(score, per_target, predicted, actual)


def lds_pairs(
    grouping: Grouping, n_subsets: int = 50, alpha: float = 0.5, seeds: Sequence[int] = (0,), seed: int = 0
) -> list[tuple[np.ndarray, int]]:
    """Every (removal set, seed) retrain :func:`lds` needs (to batch with other evaluations)."""
    masks = subset_masks(grouping.n_groups, n_subsets, alpha, seed)
    return [(np.flatnonzero(~m[grouping.labels]), int(s)) for m in masks for s in seeds]


def lds(
    retrainer: Retrainer,
    scores: Mapping[str, np.ndarray] | np.ndarray,
    grouping: Grouping,
    n_subsets: int = 50,
    alpha: float = 0.5,
    seeds: Sequence[int] = (0,),
    targets: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, LDSResult] | LDSResult:
    """LDS of one or several attributions over the same grouping (retrains shared).

    Args:
        scores: (T, K) per-target scores (property: per-example test loss) or label -> scores.
        grouping: the K units the scores are over; subsets are drawn over these units.
        n_subsets: M retrained subsets.
        alpha: fraction of units kept in each subset.
        seeds: retraining seeds per subset; actual losses are averaged over them.
        targets: test-set positions of the T targets (default: the first T test points).
    """
    single = not isinstance(scores, Mapping)
    named = {"scores": scores} if single else dict(scores)
    grouping.check_matches(retrainer.n_train, "the retrainer's training set")
    masks = subset_masks(grouping.n_groups, n_subsets, alpha, seed)
    labels = grouping.labels
    removals = [np.flatnonzero(~m[labels]) for m in masks]
    outcomes = retrainer.run(removals, seeds)
    actual_all = outcomes.losses.mean(axis=1)  # (M, T_test)
    results = {}
    for label, s in named.items():
        s = np.asarray(s)
        idx = np.arange(s.shape[0]) if targets is None else np.asarray(targets)
        if len(idx) != s.shape[0] or (len(idx) and idx.max() >= actual_all.shape[1]):
            raise GGDAError(
                f"{label}: {s.shape[0]} score rows but targets index {len(idx)} test points "
                f"(test set has {actual_all.shape[1]}); pass targets= the test positions of the rows."
            )
        results[label] = lds_from_outcomes(s, masks, actual_all[:, idx])
    return results["scores"] if single else results
