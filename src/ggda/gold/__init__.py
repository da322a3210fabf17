"""Final-model-only gold standard: further training with and without each unit (FiMODA, NOTES B2).

Given only θ^f, the reference answer to "how sensitive is this model to training point/group i?"
is to continue training θ^f on D and on D∖i under the same randomness and compare a property f:

    a_i = mean_s [ f(θ^f + Δθ(D∖i, s)) − f(θ^f + Δθ(D, s)) ]      (eq. 17, paired seeds)
    ã_i = a_i − mean_{j∈I} a_j                                      (eq. 13, centring, default)

recorded after every epoch (optionally every k steps). Units are points or whole groups.
:func:`compute_gold` runs it resumably (a :class:`~ggda.execution.ResultStore` per
(seed, chunk of units)); small models train all runs of a chunk as one stacked model.
:mod:`ggda.gold.compare` scores attribution methods against it.
"""

from ggda.gold.config import DTYPES, PATHS, REMOVALS, VECTORISE_LIMIT, GoldConfig
from ggda.gold.runner import GoldResult, compute_gold, resolve_path_and_chunk
from ggda.gold.units import Units, select_units

__all__ = [
    "DTYPES",
    "PATHS",
    "REMOVALS",
    "VECTORISE_LIMIT",
    "GoldConfig",
    "GoldResult",
    "Units",
    "compute_gold",
    "resolve_path_and_chunk",
    "select_units",
]
