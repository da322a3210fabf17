"""On-disk feature/gradient store and block-wise scoring (scale to n = 10⁶ without n × p in memory).

* :class:`FeatureStore` — chunked ``.npy`` files + ``manifest.json`` (layout in
  :mod:`ggda.store.features`), written atomically chunk by chunk, resumable, memory-mapped reads;
* :func:`build_gradient_store` — group gradients (optionally randomly projected) streamed into a
  store, in process or as executor jobs (``local``/``ray``);
* :func:`score_store` — targets × training chunks, streamed top-k / bottom-k, optional full matrix
  (in memory or as a ``.npy`` memmap); ``kernel="fisher"`` for projected-Fisher influence;
* :func:`target_features`, :func:`self_scores`, :func:`store_gram`.
"""

from ggda.store.build import build_gradient_store, compute_chunk, task_fingerprint
from ggda.store.features import FORMAT, VERSION, FeatureStore
from ggda.store.scoring import (
    KERNELS,
    StoreScores,
    fisher_preconditioner,
    score_store,
    self_scores,
    store_gram,
    target_features,
)

__all__ = [
    "FORMAT",
    "KERNELS",
    "VERSION",
    "FeatureStore",
    "StoreScores",
    "build_gradient_store",
    "compute_chunk",
    "fisher_preconditioner",
    "score_store",
    "self_scores",
    "store_gram",
    "target_features",
    "task_fingerprint",
]
