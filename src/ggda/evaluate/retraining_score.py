"""Retraining score (GGDA): act on an attribution and see whether the model notices.

Protocol (GGDA §5, NOTES A5): attribute the *mean test loss* to training units, rank the units
from most helpful down, remove the top k% of training **points** taking whole groups in rank
order, retrain from scratch with R seeds and report test accuracy (mean ± standard error). A
faithful attribution removes what the model needs, so **lower accuracy = better attribution**.
The same machinery, ranked from the other end, is dataset pruning (:mod:`ggda.evaluate.pruning`).

Two baselines the GGDA reviewers asked for are always included: the **no-removal** accuracy and
**random removal** of the same number of points (a fresh random set per seed).

Budget rule (``fill``): a group never splits in rank order, except at the budget boundary:

* ``exact`` (default): whole groups while they fit, then a seeded random part of the next group,
  so every ranking removes exactly ``round(k·n)`` points and rankings at different K compare
  fairly;
* ``cover``: whole groups until at least ``round(k·n)`` points are removed (overshoots by less
  than one group; the count actually removed is reported).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.evaluate.retraining import Outcomes, Retrainer

FRACTIONS = (0.01, 0.05, 0.10, 0.20)
FILLS = ("exact", "cover")
ORDERS = ("helpful", "harmful")


def unit_scores(scores: np.ndarray) -> np.ndarray:
    """(K,) scores of a mean-test-loss attribution; (T, K) per-target scores are averaged."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 2:
        scores = scores.mean(axis=0)
    if scores.ndim != 1:
        raise GGDAError(f"Scores must be (K,) or (T, K); got shape {scores.shape}.")
    if not np.isfinite(scores).all():
        raise GGDAError("Attribution scores contain NaN or inf; check the method's damping/options.")
    return scores


def rank_units(scores: np.ndarray, order: str = "helpful", seed: int = 0) -> np.ndarray:
    """Unit ids in removal order: most helpful first (``helpful``) or most harmful first.

    Ties (e.g. zero scores) are broken by a seeded random order, never by position.
    """
    if order not in ORDERS:
        raise GGDAError(f"Unknown order '{order}'; choose one of {', '.join(ORDERS)}.")
    s = unit_scores(scores)
    tiebreak = np.random.default_rng(seed).permutation(len(s))
    key = -s if order == "helpful" else s
    return np.lexsort((tiebreak, key))


def removal_set(
    scores: np.ndarray,
    grouping: Grouping,
    fraction: float,
    order: str = "helpful",
    fill: str = "exact",
    seed: int = 0,
) -> np.ndarray:
    """Training positions to remove: the top ``fraction`` of points, whole groups in rank order."""
    if fill not in FILLS:
        raise GGDAError(f"Unknown fill '{fill}'; choose one of {', '.join(FILLS)}.")
    if not 0.0 <= fraction < 1.0:
        raise GGDAError(f"Removal fraction {fraction} must be in [0, 1), e.g. 0.05.")
    s = unit_scores(scores)
    if len(s) != grouping.n_groups:
        raise GGDAError(f"{len(s)} scores for {grouping.n_groups} groups; pass the grouping they came from.")
    n = len(grouping)
    budget = int(round(fraction * n))
    members = grouping.member_lists()
    taken: list[np.ndarray] = []
    count = 0
    for g in rank_units(s, order, seed):
        if count >= budget:
            break
        m = members[g]
        if fill == "exact" and count + len(m) > budget:
            rng = np.random.default_rng([seed, int(g)])
            m = rng.choice(m, budget - count, replace=False)
        taken.append(m)
        count += len(m)
    return np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64)


def random_removal(n: int, fraction: float, seed: int) -> np.ndarray:
    """``round(fraction·n)`` random positions (the baseline every ranking must beat)."""
    rng = np.random.default_rng([seed, int(round(fraction * 1_000_000)), 7919])
    return np.sort(rng.choice(n, int(round(fraction * n)), replace=False))


@dataclass
class RemovalCurve:
    """Outcomes of removing increasing fractions by one ranking (or at random)."""

    label: str
    fractions: np.ndarray  # (F,)
    n_removed: np.ndarray  # (F,)
    accuracy: np.ndarray | None  # (F, R)
    loss: np.ndarray  # (F, R) mean test loss
    correct: np.ndarray | None = None  # (F, R, T)
    meta: dict = field(default_factory=dict)

    @staticmethod
    def _sem(a: np.ndarray) -> np.ndarray:
        r = a.shape[1]
        return a.std(axis=1, ddof=1) / np.sqrt(r) if r > 1 else np.zeros(a.shape[0])

    @property
    def acc_mean(self) -> np.ndarray:
        return self.accuracy.mean(axis=1)

    @property
    def acc_sem(self) -> np.ndarray:
        return self._sem(self.accuracy)

    def class_accuracy(self, y_test: np.ndarray, cls: int) -> np.ndarray:
        """(F, R) accuracy on the test points of one class."""
        return self.correct[:, :, np.asarray(y_test) == cls].mean(axis=2)

    def rows(self) -> list[dict]:
        out = []
        for i, f in enumerate(self.fractions):
            row = {
                "label": self.label,
                "fraction": float(f),
                "n_removed": int(self.n_removed[i]),
                "loss_mean": float(self.loss[i].mean()),
                "loss_sem": float(self._sem(self.loss)[i]),
                **self.meta,
            }
            if self.accuracy is not None:
                row.update(acc_mean=float(self.acc_mean[i]), acc_sem=float(self.acc_sem[i]))
            out.append(row)
        return out


@dataclass
class RemovalResults:
    """Curves per ranking plus the random and no-removal baselines (accuracy over seeds)."""

    curves: dict[str, RemovalCurve]
    random: RemovalCurve
    none_accuracy: np.ndarray | None  # (R,)
    none_loss: np.ndarray  # (R,)
    order: str

    def table(self) -> pd.DataFrame:
        rows = [r for c in [*self.curves.values(), self.random] for r in c.rows()]
        frame = pd.DataFrame(rows)
        if self.none_accuracy is not None:
            frame["no_removal_acc"] = float(self.none_accuracy.mean())
            frame["drop"] = frame["no_removal_acc"] - frame["acc_mean"]
        return frame


def _plan(
    rankings: Mapping[str, tuple[np.ndarray, Grouping]],
    n: int,
    fractions: np.ndarray,
    seeds: list[int],
    order: str,
    fill: str,
) -> tuple[list[np.ndarray], dict[str, list[int]], list[tuple[np.ndarray, int]]]:
    removals: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]  # row 0: no removal
    index: dict[str, list[int]] = {}
    for label, (scores, grouping) in rankings.items():
        grouping.check_matches(n, "the retrainer's training set")
        index[label] = []
        for f in fractions:
            index[label].append(len(removals))
            removals.append(removal_set(scores, grouping, float(f), order=order, fill=fill))
    # Random baseline: a fresh random set per (fraction, seed), so its spread includes the draw.
    pairs = [(r, s) for r in removals for s in seeds]
    pairs += [(random_removal(n, float(f), s), s) for f in fractions for s in seeds]
    return removals, index, pairs


def removal_pairs(
    rankings: Mapping[str, tuple[np.ndarray, Grouping]],
    n: int,
    fractions: Sequence[float] = FRACTIONS,
    seeds: Sequence[int] = (0, 1, 2),
    order: str = "helpful",
    fill: str = "exact",
) -> list[tuple[np.ndarray, int]]:
    """Every (removal set, seed) retrain that :func:`removal_curves` will need, baselines included.

    Pass them (with other evaluations' pairs) to :meth:`Retrainer.run_pairs` once to run all the
    retrains of an experiment in a single worker pool; the curves then read them from the store.
    """
    return _plan(rankings, n, np.asarray(fractions, np.float64), [int(s) for s in seeds], order, fill)[2]


def removal_curves(
    retrainer: Retrainer,
    rankings: Mapping[str, tuple[np.ndarray, Grouping]],
    fractions: Sequence[float] = FRACTIONS,
    seeds: Sequence[int] = (0, 1, 2),
    order: str = "helpful",
    fill: str = "exact",
    keep_correct: bool = False,
) -> RemovalResults:
    """Remove each ranking's top ``fractions`` (in ``order``), retrain per seed, collect outcomes.

    Args:
        rankings: label -> (scores (K,) or (T, K), grouping the scores are over).
        seeds: retraining seeds; every removal set is retrained with the same seeds (paired).
        keep_correct: keep per-test-point correctness (per-class accuracy, oracle checks).
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    seeds = [int(s) for s in seeds]
    n = retrainer.n_train
    removals, index, pairs = _plan(rankings, n, fractions, seeds, order, fill)
    flat = retrainer.run_pairs(pairs)
    S, R, T = len(removals), len(seeds), len(retrainer.test)
    losses = flat.losses.reshape(-1, R, T)
    correct = None if flat.correct is None else flat.correct.reshape(-1, R, T)
    outcomes = Outcomes(losses[:S], None if correct is None else correct[:S])
    rl = losses[S:]  # (F, R, T)
    rc = None if correct is None else correct[S:]

    def curve(label: str, rows: list[int], meta: dict) -> RemovalCurve:
        acc = outcomes.accuracy[rows] if retrainer.classification else None
        return RemovalCurve(
            label,
            fractions,
            np.array([len(removals[r]) for r in rows]),
            acc,
            outcomes.mean_loss[rows],
            outcomes.correct[rows] if keep_correct and acc is not None else None,
            meta,
        )

    curves = {label: curve(label, rows, {}) for label, rows in index.items()}
    random_curve = RemovalCurve(
        "random",
        fractions,
        np.array([int(round(f * n)) for f in fractions]),
        rc.mean(axis=2) if rc is not None else None,
        rl.mean(axis=2),
        rc if keep_correct else None,
    )
    return RemovalResults(
        curves,
        random_curve,
        outcomes.accuracy[0] if retrainer.classification else None,
        outcomes.mean_loss[0],
        order,
    )


def retraining_score(
    retrainer: Retrainer,
    rankings: Mapping[str, tuple[np.ndarray, Grouping]],
    fractions: Sequence[float] = FRACTIONS,
    seeds: Sequence[int] = (0, 1, 2),
    fill: str = "exact",
    keep_correct: bool = False,
) -> RemovalResults:
    """GGDA retraining score: remove the most *helpful* top-k% and retrain (lower accuracy = better).

    ``rankings`` maps a label to ``(scores, grouping)`` where scores attribute the mean test loss
    (:class:`~ggda.properties.MeanLoss`, positive = helpful) over the retrainer's test set.
    """
    return removal_curves(retrainer, rankings, fractions, seeds, "helpful", fill, keep_correct)
