"""Gradients: per-example, per-group (summed loss of a group) and of property functions.

All routines are chunked so memory stays bounded, and work on the task's chosen layers only.
"""

from ggda.gradients.group import group_gradients, iter_group_gradients, summed_gradient
from ggda.gradients.per_example import iter_per_example_gradients, per_example_gradients

__all__ = [
    "group_gradients",
    "iter_group_gradients",
    "iter_per_example_gradients",
    "per_example_gradients",
    "summed_gradient",
]
