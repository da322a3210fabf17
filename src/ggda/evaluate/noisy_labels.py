"""Noisy-label detection: can the attribution point a data cleaner at the flipped labels?

Flip a fraction of training labels (:func:`ggda.data.flip_labels` records which), score every
training point by how *suspicious* it is, and measure how well that ranks the flipped points
first: ROC AUC (1 = every flipped label ranked above every clean one, 0.5 = chance, 0 = reversed)
and the fraction of flipped labels found when a person inspects the top 5/10/20% of the data.

Two suspicion scores, both group-native (NOTES A5, gotcha 9):

* **self-influence** (default): the attribution of a unit to *its own* training loss,
  τ(f = Σ_{i∈S} ℓ_i, S). A mislabeled point fights the rest of the data, so its own loss depends
  on it unusually strongly. For a group the score is divided by the group size to give each
  member a per-point score.
* **test harm**: the unit's attribution to the mean test loss, negated (most harmful first),
  divided by the group size.

Some methods have no usable self-influence, and then no AUC is reported (NaN, with the reason
in ``note``) instead of a number that only looks like one (:func:`detect_by_self_influence`):

* **Grad-Cos**: cos(g_S, g_S) = 1 for every unit, so the "ranking" is floating-point rounding
  (or, with groups, 1/|S|). Any method whose self-influence is the same for every unit up to a
  relative 1e-6 is caught the same way.
* **RepSim**: a representation similarity; it sees neither labels nor the loss, so a flipped
  label cannot change it (the method says so in ``self_influence_note``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from ggda.data.batches import as_inputs, iter_rows
from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.methods.base import Attributor
from ggda.properties import Property
from ggda.task import AttributionTask, Params

FOUND_AT = (0.05, 0.10, 0.20)


class GroupLoss(Property):
    """One target per group: f_j(θ) = Σ_{i∈S_j} ℓ(z_i; θ), the group's own training loss.

    Its gradients are exactly the group gradients g_{S_j}, so for Grad-Dot the self-influence is
    ‖g_{S_j}‖² and for influence functions g_{S_j}ᵀ(H + λI)⁻¹g_{S_j}.
    """

    name = "group-loss"

    def __init__(self, X: np.ndarray, y: np.ndarray, grouping: Grouping) -> None:
        grouping.check_matches(len(X), "the property's examples")
        self.X, self.y, self.grouping = as_inputs(X), np.asarray(y), grouping

    @property
    def n_targets(self) -> int:
        return self.grouping.n_groups

    def values(self, task: AttributionTask, params: Params | None = None) -> torch.Tensor:
        params = task.params() if params is None else params
        X, y = task.to_tensor(self.X, self.y)
        with torch.no_grad():
            losses = torch.cat([task.losses(params, xb, y[rows]) for rows, xb in iter_rows(X, 1024)])
        labels = torch.as_tensor(self.grouping.labels, device=losses.device)
        return torch.zeros(self.n_targets, dtype=losses.dtype, device=losses.device).index_add_(
            0, labels, losses
        )

    def gradients(
        self, task: AttributionTask, params: Params | None = None, chunk_size: int = 512
    ) -> torch.Tensor:
        from ggda.gradients.group import group_gradients

        return group_gradients(task, self.X, self.y, self.grouping, params=params)


def self_influence(attributor: Attributor, block: int = 1024) -> np.ndarray:
    """(K,) self-influence of every unit of a cached attributor, computed ``block`` units at a time.

    The attributor must have been ``cache``d on the training set and grouping to score; each block
    of units becomes a :class:`GroupLoss` property and only the diagonal is kept, so memory stays
    at (block × K).
    """
    if attributor.train is None or attributor.grouping is None:
        raise GGDAError("Call attributor.cache(train, grouping) before self_influence().")
    train, grouping = attributor.train, attributor.grouping
    members = grouping.member_lists()
    K = grouping.n_groups
    out = np.empty(K)
    for start in range(0, K, block):
        ids = np.arange(start, min(start + block, K))
        rows = np.concatenate([members[g] for g in ids])
        local = np.repeat(np.arange(len(ids)), [len(members[g]) for g in ids])
        prop = GroupLoss(train.X[rows], train.y[rows], Grouping(local, method="block"))
        scores = attributor.attribute(prop)  # (len(ids), K)
        out[ids] = scores[np.arange(len(ids)), ids]
    return out


def suspicion_from_self_influence(self_scores: np.ndarray, grouping: Grouping) -> np.ndarray:
    """(n,) per-point suspicion: the unit's self-influence divided by its size."""
    return grouping.expand(np.asarray(self_scores, dtype=np.float64))


def suspicion_from_test_scores(scores: np.ndarray, grouping: Grouping) -> np.ndarray:
    """(n,) per-point suspicion from a mean-test-loss attribution: harmful first (−score / size)."""
    s = np.asarray(scores, dtype=np.float64)
    s = s.mean(axis=0) if s.ndim == 2 else s
    return -grouping.expand(s)


def inspection_order(suspicion: np.ndarray, seed: int = 0) -> np.ndarray:
    """Positions from most to least suspicious; ties (members of one group) in seeded random order."""
    tiebreak = np.random.default_rng(seed).permutation(len(suspicion))
    return np.lexsort((tiebreak, -np.asarray(suspicion)))


@dataclass
class DetectionResult:
    """How well a suspicion score finds flipped labels (NaN with a ``note`` when it cannot)."""

    auc: float
    found: dict[float, float]  # fraction inspected -> fraction of flipped labels found
    inspected: np.ndarray  # curve x: fraction of the data inspected (0..1)
    recall: np.ndarray  # curve y: fraction of flipped labels found
    note: str | None = None  # why there is no score (auc NaN)
    #: training positions from most to least suspicious (who to inspect first); empty when undefined
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def row(self) -> dict:
        row = {"auc": self.auc, **{f"found@{int(round(q * 100))}%": v for q, v in self.found.items()}}
        if self.note:
            row["note"] = self.note
        return row

    @classmethod
    def undefined(cls, note: str, fractions: Sequence[float] = FOUND_AT) -> DetectionResult:
        """No ranking to evaluate: NaN AUC and recalls, and the reason."""
        nan = float("nan")
        return cls(nan, {float(q): nan for q in fractions}, np.zeros(0), np.zeros(0), note)


#: Self-influence whose spread is below this fraction of its magnitude is treated as constant.
CONSTANT_RTOL = 1e-6


def constant_scores(scores: np.ndarray, rtol: float = CONSTANT_RTOL) -> bool:
    """True when every entry equals the others up to ``rtol`` of the largest magnitude."""
    s = np.asarray(scores, dtype=np.float64)
    scale = float(np.abs(s).max()) if s.size else 0.0
    return s.size > 1 and float(np.ptp(s)) <= rtol * max(scale, 1e-300)


def detect_by_self_influence(
    attributor: Attributor,
    noisy: np.ndarray,
    fractions: Sequence[float] = FOUND_AT,
    seed: int = 0,
    block: int = 1024,
) -> DetectionResult:
    """Noisy-label detection by a cached attributor's self-influence, or a NaN row with the reason.

    The reason is given (``DetectionResult.note``, AUC NaN) instead of a score when the method
    declares it has no self-influence (``self_influence_note``, e.g. RepSim), when it cannot
    evaluate the group-loss property (its error message), or when its self-influence is the same
    for every unit (Grad-Cos: cos(g, g) = 1), where an AUC would only rank rounding errors.
    """
    note = getattr(attributor, "self_influence_note", None)
    if note:
        return DetectionResult.undefined(note, fractions)
    try:
        si = self_influence(attributor, block=block)
    except GGDAError as exc:
        return DetectionResult.undefined(f"no self-influence: {exc}", fractions)
    if not np.isfinite(si).all():
        return DetectionResult.undefined(
            "self-influence contains NaN or inf; check the method's options (damping).", fractions
        )
    name = getattr(attributor, "name", type(attributor).__name__)
    if getattr(attributor, "normalize", False):  # cosine methods: cos(g_S, g_S) = 1 by construction
        return DetectionResult.undefined(
            f"{name} self-influence is cos(g, g) = 1 for every unit (measured spread "
            f"{float(np.ptp(si)):.2g}), so an AUC would only order rounding errors (or group sizes); "
            "rank by test harm (--scores) or use grad-dot / an influence function.",
            fractions,
        )
    if constant_scores(si):
        return DetectionResult.undefined(
            f"{name} self-influence is {float(si[0]):.6g} for every unit, so an AUC would only order "
            "rounding errors; rank by test harm (--scores) or use another method.",
            fractions,
        )
    return detect_noisy_labels(suspicion_from_self_influence(si, attributor.grouping), noisy, fractions, seed)


def detect_noisy_labels(
    suspicion: np.ndarray, noisy: np.ndarray, fractions: Sequence[float] = FOUND_AT, seed: int = 0
) -> DetectionResult:
    """AUC and fraction found in the top ``fractions`` of a per-point suspicion score."""
    suspicion, noisy = np.asarray(suspicion, dtype=np.float64), np.asarray(noisy, dtype=bool)
    if suspicion.shape != noisy.shape:
        raise GGDAError(f"{len(suspicion)} suspicion scores for {len(noisy)} points; pass one per point.")
    if noisy.all() or not noisy.any():
        raise GGDAError("Noisy-label detection needs both flipped and clean points; flip e.g. 10% of labels.")
    if not np.isfinite(suspicion).all():
        raise GGDAError("Suspicion scores contain NaN or inf; check the attribution method's options.")
    auc = float(roc_auc_score(noisy, suspicion))
    order = inspection_order(suspicion, seed)
    hits = np.cumsum(noisy[order])
    n, total = len(noisy), int(noisy.sum())
    found = {float(q): float(hits[max(int(round(q * n)), 1) - 1] / total) for q in fractions}
    inspected = np.arange(0, n + 1) / n
    recall = np.concatenate([[0.0], hits / total])
    return DetectionResult(auc, found, inspected, recall, order=order)
