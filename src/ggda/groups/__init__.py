"""Groupings of training points: an integer group id per point, 0..K-1, no group empty."""

from __future__ import annotations

import time

import numpy as np

from ggda.errors import GGDAError
from ggda.groups.grouping import Grouping

GROUPING_SPECS = ("singleton", "column", "random:K")


def random_grouping(n: int, n_groups: int, seed: int = 0) -> Grouping:
    """Seeded random partition into ``n_groups`` groups of (almost) equal size."""
    if not 1 <= n_groups <= n:
        raise GGDAError(f"Number of groups {n_groups} must be between 1 and n={n}.")
    t0 = time.perf_counter()
    labels = np.empty(n, dtype=np.int64)
    labels[np.random.default_rng(seed).permutation(n)] = np.arange(n) % n_groups
    return Grouping(labels, method="random", seconds=time.perf_counter() - t0)


def build_grouping_from_spec(spec: str, run) -> Grouping:
    """Grouping from a CLI spec such as ``random:50``."""
    name, _, arg = spec.partition(":")
    if name == "random" and arg.isdigit():
        return random_grouping(len(run.train), int(arg))
    raise GGDAError(
        f"Unknown grouping '{spec}'; use one of {', '.join(GROUPING_SPECS)} or a .npy/.csv/.parquet file of group ids."
    )


__all__ = ["GROUPING_SPECS", "Grouping", "build_grouping_from_spec", "random_grouping"]
