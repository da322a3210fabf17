"""ggda: Generalized Group Data Attribution.

Pipeline: data -> models/training -> gradients -> groups -> methods -> gold -> evaluate -> report.
Every attribution method is written once, for groups of training points; per-point attribution is
the special case of singleton groups.
"""

from ggda.data.dataset import Dataset
from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.results import AttributionResult, load_attribution
from ggda.task import AttributionTask

__all__ = ["AttributionResult", "AttributionTask", "Dataset", "GGDAError", "Grouping", "load_attribution"]
__version__ = "0.1.0"
