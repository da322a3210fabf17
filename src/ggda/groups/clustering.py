"""Seeded K-Means with scikit-learn, and the guarantee that no cluster comes back empty.

scikit-learn's ``KMeans`` (Lloyd, k-means++ init) is used up to ``MINIBATCH_ABOVE`` points and
``MiniBatchKMeans`` beyond, where full Lloyd iterations over n × K distances get slow (GGDA's
reviewers asked for grouping time to be counted, so it has to stay small next to attribution).
Either can leave clusters empty (duplicate points, fewer distinct points than K, mini-batch
drift). Empty clusters never reach the user: by default each one is *re-seeded* by splitting the
currently largest cluster in two with 2-means (so K stays what was asked for); ``empty="merge"``
drops them instead (fewer groups). Either way the count is recorded in the returned meta.
"""

from __future__ import annotations

import warnings

import numpy as np

from ggda.errors import GGDAError

MINIBATCH_ABOVE = 20_000
ALGORITHMS = ("auto", "kmeans", "minibatch")
EMPTY_POLICIES = ("reseed", "merge")


def choose_algorithm(n: int, algorithm: str = "auto") -> str:
    if algorithm not in ALGORITHMS:
        raise GGDAError(f"Unknown K-Means algorithm '{algorithm}'; choose one of {', '.join(ALGORITHMS)}.")
    if algorithm == "auto":
        return "kmeans" if n <= MINIBATCH_ABOVE else "minibatch"
    return algorithm


def kmeans_labels(
    features: np.ndarray,
    n_clusters: int,
    seed: int = 0,
    algorithm: str = "auto",
    n_init: int | str = "auto",
    max_iter: int | None = None,
    batch_size: int | None = None,
    empty: str = "reseed",
) -> tuple[np.ndarray, dict]:
    """Cluster the rows of ``features`` into ``n_clusters`` non-empty clusters (ids 0..K'-1).

    Returns ``(labels, meta)``; meta records the algorithm, inertia, iterations and how many
    empty clusters were re-seeded or merged.
    """
    F = np.ascontiguousarray(np.asarray(features, dtype=np.float32).reshape(len(features), -1))
    n = len(F)
    if not 1 <= n_clusters <= n:
        raise GGDAError(f"Number of groups {n_clusters} must be between 1 and n={n}.")
    if empty not in EMPTY_POLICIES:
        raise GGDAError(f"Unknown empty-cluster policy '{empty}'; choose one of {', '.join(EMPTY_POLICIES)}.")
    if not np.isfinite(F).all():
        raise GGDAError(
            "Clustering features contain NaN or inf (a diverged model?); retrain the model or use "
            "method='kmeans' on the inputs."
        )
    algo = choose_algorithm(n, algorithm)
    meta: dict = {"algorithm": algo, "feature_dim": int(F.shape[1])}
    if n_clusters == 1:
        return np.zeros(n, dtype=np.int64), meta | {"empty_clusters": 0}
    if n_clusters == n:
        return np.arange(n, dtype=np.int64), meta | {"empty_clusters": 0}

    from sklearn.cluster import KMeans, MiniBatchKMeans

    if algo == "kmeans":
        est = KMeans(n_clusters, n_init=n_init, max_iter=max_iter or 300, random_state=seed)
    else:
        est = MiniBatchKMeans(
            n_clusters,
            n_init=n_init,
            max_iter=max_iter or 100,
            batch_size=batch_size or max(1024, 4 * n_clusters),
            random_state=seed,
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est.fit(F)
    labels = np.asarray(est.labels_, dtype=np.int64)
    meta.update(inertia=float(est.inertia_), iterations=int(est.n_iter_))
    notes = sorted({str(w.message).split(".")[0] for w in caught if "Convergence" in w.category.__name__})
    if notes:
        meta["warnings"] = notes
    labels, fixed = fix_empty_clusters(F, labels, n_clusters, seed, empty)
    meta["empty_clusters"] = fixed
    if fixed:
        meta["empty_policy"] = empty
    return labels, meta


def fix_empty_clusters(
    F: np.ndarray, labels: np.ndarray, n_clusters: int, seed: int = 0, empty: str = "reseed"
) -> tuple[np.ndarray, int]:
    """Return labels with every id in 0..K'-1 used, and the number of empty clusters found.

    ``reseed``: each empty id takes one half of the currently largest cluster, split by 2-means
    on its features (by position if all its points coincide), so K' = K. ``merge``: empty ids are
    dropped and the rest renumbered, so K' = K − (number of empty clusters).
    """
    labels = labels.copy()
    counts = np.bincount(labels, minlength=n_clusters)
    empty_ids = np.flatnonzero(counts == 0)
    if len(empty_ids) == 0:
        return labels, 0
    if empty == "merge":
        return np.unique(labels, return_inverse=True)[1].astype(np.int64), len(empty_ids)
    from sklearn.cluster import KMeans

    for target in empty_ids:
        largest = int(np.argmax(counts))
        members = np.flatnonzero(labels == largest)  # >= 2 members: K <= n and one id is empty
        half = None
        sub = F[members]
        if len(np.unique(sub, axis=0)) >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                split = KMeans(2, n_init=1, random_state=seed).fit_predict(sub)
            if 0 < split.sum() < len(split):
                half = members[split == 1]
        if half is None:  # identical points: any split is as good as another
            half = members[len(members) // 2 :]
        labels[half] = target
        counts[largest] -= len(half)
        counts[target] = len(half)
    return labels, len(empty_ids)
