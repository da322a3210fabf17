"""Dataset pruning: drop the *least valuable* training units and check the model does not care.

The mirror image of the retraining score (:mod:`ggda.evaluate.retraining_score`): units are ranked
by their attribution to the mean test loss from most *harmful* (most negative) up, the lowest
ranked fraction is removed, the model is retrained from scratch and test accuracy is reported per
fraction removed. A good valuation keeps accuracy at (or above) the no-removal level for longer
than random pruning does. GGDA reports that grouped attribution sometimes prunes *better* than
per-point attribution; this module measures that with the same retrain jobs and store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ggda.data.grouping import Grouping
from ggda.evaluate.retraining import Retrainer
from ggda.evaluate.retraining_score import RemovalResults, removal_curves

PRUNE_FRACTIONS = (0.1, 0.2, 0.3, 0.5)


def pruning_curves(
    retrainer: Retrainer,
    rankings: Mapping[str, tuple[np.ndarray, Grouping]],
    fractions: Sequence[float] = PRUNE_FRACTIONS,
    seeds: Sequence[int] = (0, 1, 2),
    fill: str = "exact",
) -> RemovalResults:
    """Accuracy vs fraction pruned, lowest-valued units first, with random and no-removal baselines.

    ``rankings`` maps a label to ``(scores, grouping)``; scores attribute the mean test loss
    (positive = helpful), so the most negative units go first.
    """
    return removal_curves(retrainer, rankings, fractions, seeds, order="harmful", fill=fill)
