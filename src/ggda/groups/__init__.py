"""Groupings of training points: an integer group id per point, 0..K-1, no group empty.

``make_grouping(method, train, n_groups | group_size, task, per_class, seed, **options)`` builds
Random, K-Means, Repr-K-Means, Grad-K-Means, given and singleton groupings (GGDA §A4);
``build_grouping_from_spec`` reads CLI specs such as ``grad-kmeans:100:per-class``;
``gradient_variance`` measures how much per-point gradient information a grouping keeps.
"""

from __future__ import annotations

from ggda.data.grouping import Grouping
from ggda.groups.make import (
    GROUPING_METHODS,
    allocate_groups,
    given_grouping,
    make_grouping,
    random_grouping,
    resolve_n_groups,
)
from ggda.groups.quality import gradient_variance, within_group_variance
from ggda.groups.spec import GROUPING_SPECS, build_grouping_from_spec, parse_grouping_spec

__all__ = [
    "GROUPING_METHODS",
    "GROUPING_SPECS",
    "Grouping",
    "allocate_groups",
    "build_grouping_from_spec",
    "given_grouping",
    "gradient_variance",
    "make_grouping",
    "parse_grouping_spec",
    "random_grouping",
    "resolve_n_groups",
    "within_group_variance",
]
