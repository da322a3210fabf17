"""Attribution methods, all group-native. Importing this package registers every method."""

from ggda.methods import first_order  # noqa: F401  (registration)
from ggda.methods.base import METHODS, Attributor, InnerProductAttributor, make_method, register
from ggda.methods.first_order import GradCos, GradDot, TracInCP

__all__ = [
    "METHODS",
    "Attributor",
    "GradCos",
    "GradDot",
    "InnerProductAttributor",
    "TracInCP",
    "make_method",
    "register",
]
