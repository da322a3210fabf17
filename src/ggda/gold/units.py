"""The left-out set I: training points or whole groups, each removed as one unit.

FiMODA evaluates 50–100 left-out instances (NOTES B5, gotcha 6): only relative scores within I
matter, so I is a small, fixed, seeded subset. A unit is a set of training positions; a point is
the singleton group, so points and groups share one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ggda.data.grouping import Grouping
from ggda.errors import GGDAError


@dataclass
class Units:
    """Left-out units: ``ids[k]`` (a training position or a group id) with ``members[k]`` positions.

    Attributes:
        kind: ``points`` or ``groups``.
        ids: (U,) point positions (points) or group ids in ``grouping`` (groups).
        members: training positions removed together for each unit.
        grouping: the grouping the unit ids refer to (singleton for points).
    """

    kind: str
    ids: np.ndarray
    members: list[np.ndarray]
    grouping: Grouping

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def max_size(self) -> int:
        return max(len(m) for m in self.members)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "ids": self.ids.tolist(), "sizes": [len(m) for m in self.members]}


def select_units(
    grouping: Grouping,
    n_units: int | None = None,
    ids: list[int] | np.ndarray | None = None,
    seed: int = 0,
    kind: str | None = None,
) -> Units:
    """Choose the left-out units of ``grouping``: explicit ``ids``, or ``n_units`` seeded at random.

    Ids are kept in the given order (explicit) or sorted (random), so the columns of the gold array
    are reproducible.
    """
    kind = kind or ("points" if grouping.is_singleton else "groups")
    K = grouping.n_groups
    what = "training point" if kind == "points" else "group id"
    if ids is not None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            raise GGDAError("The left-out set is empty; pass at least one unit id.")
        bad = ids[(ids < 0) | (ids >= K)]
        if len(bad):
            raise GGDAError(
                f"Left-out {what} {int(bad[0])} is not in the {'data' if kind == 'points' else 'grouping'} "
                f"(valid: 0..{K - 1})."
            )
        if len(np.unique(ids)) != len(ids):
            raise GGDAError("The left-out ids contain duplicates; list each unit once.")
    else:
        if n_units is None or n_units < 1:
            raise GGDAError(f"n_units must be >= 1 (got {n_units}).")
        if n_units > K:
            raise GGDAError(f"Asked for {n_units} left-out units but there are only {K}; lower --n-units.")
        ids = np.sort(np.random.default_rng(seed).choice(K, n_units, replace=False)).astype(np.int64)
    lists = grouping.member_lists()
    return Units(kind=kind, ids=ids, members=[lists[int(i)] for i in ids], grouping=grouping)
