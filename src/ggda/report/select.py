"""Which examples a report shows: targets, their most helpful/harmful training points, the groups
of a gallery and their example members.

Pure functions of saved arrays, shared by the experiment (which saves the display form of exactly
the examples these pick) and the report (which picks them again from the saved scores), so the
page always shows what the saved numbers say and nothing else.
"""

from __future__ import annotations

import numpy as np

TOP_K = 5  # training examples shown per target and direction
GALLERY_GROUPS = 4  # groups per grouping in the gallery
GALLERY_MEMBERS = 6  # example members per gallery group
FLAGGED = 12  # flagged noisy-label examples per method and ranking


def pick_targets(y: np.ndarray, n: int) -> np.ndarray:
    """Positions of ``n`` test points, one per class in turn (first occurrence), so the sample
    covers as many classes as possible; deterministic."""
    y = np.asarray(y)
    if n <= 0 or len(y) == 0:
        return np.zeros(0, dtype=np.int64)
    chosen: list[int] = []
    used: set[int] = set()
    while len(chosen) < min(n, len(y)):
        seen: set = set()
        for i, label in enumerate(y.tolist()):
            if i in used or label in seen:
                continue
            seen.add(label)
            chosen.append(i)
            used.add(i)
            if len(chosen) == n:
                break
    return np.asarray(sorted(chosen), dtype=np.int64)


def top_bottom(scores: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the ``k`` highest (most helpful, positive) and ``k`` lowest (most harmful)
    scores, best first; ties broken by position so the choice is reproducible."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    order = np.lexsort((np.arange(len(s)), -s))
    k = min(k, len(s))
    helpful = order[:k]
    harmful = np.lexsort((np.arange(len(s)), s))[:k]
    return helpful, harmful


def gallery_groups(group_scores: np.ndarray, n: int = GALLERY_GROUPS) -> np.ndarray:
    """Group ids of the ``n`` most helpful groups (highest mean-test-loss score), best first."""
    s = np.asarray(group_scores, dtype=np.float64).ravel()
    return np.lexsort((np.arange(len(s)), -s))[: min(n, len(s))]


def gallery_members(labels: np.ndarray, group: int, m: int = GALLERY_MEMBERS, seed: int = 0) -> np.ndarray:
    """Positions of up to ``m`` members of ``group``, drawn at random (seeded by the group id) so
    they represent the group rather than its extreme points; sorted."""
    members = np.flatnonzero(np.asarray(labels) == group)
    if len(members) <= m:
        return members
    rng = np.random.default_rng([seed, int(group)])
    return np.sort(rng.choice(members, size=m, replace=False))


def gallery_k(ks: list[int]) -> int | None:
    """The K a gallery shows: the smallest (largest groups, fewest to read)."""
    return min(ks) if ks else None
