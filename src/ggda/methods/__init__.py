"""Attribution methods, all group-native. Importing this package registers every method.

Each method module calls :func:`ggda.methods.base.register`; every module of this package is
imported here, so adding a method is adding a file.
"""

import importlib
import pkgutil

from ggda.methods.base import METHODS, Attributor, InnerProductAttributor, make_method, register
from ggda.methods.first_order import GradCos, GradDot, TracInCP

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

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
