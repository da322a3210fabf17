"""Evaluations: act on an attribution and measure what happens.

* :mod:`~ggda.evaluate.retraining` — retrain-from-scratch jobs through :mod:`ggda.execution`
  (keyed, stored, resumable);
* :mod:`~ggda.evaluate.retraining_score` — GGDA's retraining score (remove the top-k% most helpful
  points, retrain, accuracy) with random and no-removal baselines;
* :mod:`~ggda.evaluate.lds` — linear datamodeling score over points or groups;
* :mod:`~ggda.evaluate.noisy_labels` — flipped-label detection (self-influence, AUC, found@k);
* :mod:`~ggda.evaluate.pruning` — accuracy after removing the lowest-valued units.

Whole studies built on these (``ggda experiment``) live in :mod:`ggda.applications`.
"""

from ggda.evaluate.lds import LDSResult, lds, lds_from_outcomes, lds_pairs, subset_masks
from ggda.evaluate.noisy_labels import (
    DetectionResult,
    GroupLoss,
    detect_noisy_labels,
    self_influence,
    suspicion_from_self_influence,
    suspicion_from_test_scores,
)
from ggda.evaluate.pruning import PRUNE_FRACTIONS, pruning_curves
from ggda.evaluate.retraining import Outcomes, Retrainer, RetrainSpec, retrain_job
from ggda.evaluate.retraining_score import (
    FRACTIONS,
    RemovalCurve,
    RemovalResults,
    random_removal,
    rank_units,
    removal_curves,
    removal_pairs,
    removal_set,
    retraining_score,
)

__all__ = [
    "FRACTIONS",
    "PRUNE_FRACTIONS",
    "DetectionResult",
    "GroupLoss",
    "LDSResult",
    "Outcomes",
    "RemovalCurve",
    "RemovalResults",
    "RetrainSpec",
    "Retrainer",
    "detect_noisy_labels",
    "lds",
    "lds_from_outcomes",
    "lds_pairs",
    "pruning_curves",
    "random_removal",
    "rank_units",
    "removal_curves",
    "removal_pairs",
    "removal_set",
    "retrain_job",
    "retraining_score",
    "self_influence",
    "subset_masks",
    "suspicion_from_self_influence",
    "suspicion_from_test_scores",
]
