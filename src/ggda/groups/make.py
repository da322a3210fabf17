"""Build a grouping of a training set by name: ``make_grouping(method, train, ...)``.

Methods (GGDA §A4): ``random`` (seeded, equal sizes), ``kmeans`` (standardised inputs),
``repr-kmeans`` (a hidden representation of the trained model), ``grad-kmeans`` (per-example
loss gradients; default the output layer's weight+bias gradient in closed form), ``given``
(user ids: the data's group column, an array or a file) and ``singleton`` (per-point).

``per_class=True`` clusters inside each class, so every group is label-pure; K is split across
classes in proportion to their sizes (largest remainder, at least one group per class), or, when
a target ``group_size`` is given, each class gets round(n_c / group_size) groups.

The returned :class:`Grouping` carries ``seconds`` (features + clustering: GGDA's reviewers asked
that grouping time be counted in runtimes) and ``meta`` (feature dimension, algorithm, empty
clusters re-seeded/merged, class purity, ...).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ggda.data.grouping import Grouping
from ggda.errors import GGDAError

GROUPING_METHODS = ("random", "kmeans", "repr-kmeans", "grad-kmeans", "given", "singleton")
CLUSTER_OPTIONS = ("algorithm", "n_init", "max_iter", "batch_size", "empty", "balance", "size_ratio")
CLUSTERED_METHODS = ("kmeans", "repr-kmeans", "grad-kmeans")
NORMALIZE = ("unit", "none")
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "random": (),
    "singleton": (),
    "given": ("values", "column"),
    "kmeans": ("standardize", *CLUSTER_OPTIONS),
    "repr-kmeans": ("layer", "standardize", "normalize", "chunk_size", *CLUSTER_OPTIONS),
    "grad-kmeans": (
        "features",
        "layer",
        "projection_dim",
        "normalize",
        "chunk_size",
        "memory_mb",
        *CLUSTER_OPTIONS,
    ),
}


# -- K -----------------------------------------------------------------------------------------
def resolve_n_groups(n: int, n_groups: int | None = None, group_size: int | float | None = None) -> int:
    """K from exactly one of ``n_groups`` or a target ``group_size`` (K = round(n / size), ≥ 1)."""
    if (n_groups is None) == (group_size is None):
        raise GGDAError("Give exactly one of n_groups (--groups K) or group_size (--group-size S).")
    if n_groups is not None:
        if int(n_groups) != n_groups or not 1 <= n_groups <= n:
            raise GGDAError(f"Number of groups {n_groups} must be an integer between 1 and n={n}.")
        return int(n_groups)
    if not 1 <= group_size <= n:  # type: ignore[operator]
        raise GGDAError(f"Group size {group_size} must be between 1 and n={n}.")
    return int(min(n, max(1, round(n / group_size))))  # type: ignore[operator]


def allocate_groups(class_sizes: np.ndarray, n_groups: int) -> np.ndarray:
    """Split K over classes in proportion to their sizes: largest remainder, 1 ≤ K_c ≤ n_c, ΣK_c = K."""
    sizes = np.asarray(class_sizes, dtype=np.int64)
    n, C = int(sizes.sum()), len(sizes)
    if n_groups < C:
        raise GGDAError(
            f"per-class grouping needs at least one group per class: K={n_groups} < {C} classes; "
            "raise --groups or drop --per-class."
        )
    quota = n_groups * sizes / n
    k = np.clip(np.floor(quota).astype(np.int64), 1, sizes)
    while k.sum() < n_groups:  # give to the class furthest below its quota that still has room
        gap = np.where(k < sizes, quota - k, -np.inf)
        k[int(np.argmax(gap))] += 1
    while k.sum() > n_groups:  # take from the class furthest above its quota that has > 1 group
        gap = np.where(k > 1, k - quota, -np.inf)
        k[int(np.argmax(gap))] -= 1
    return k


# -- simple groupings ---------------------------------------------------------------------------
def random_grouping(n: int, n_groups: int, seed: int = 0) -> Grouping:
    """Seeded random partition into ``n_groups`` groups of (almost) equal size."""
    if not 1 <= n_groups <= n:
        raise GGDAError(f"Number of groups {n_groups} must be between 1 and n={n}.")
    t0 = time.perf_counter()
    labels = np.empty(n, dtype=np.int64)
    labels[np.random.default_rng(seed).permutation(n)] = np.arange(n) % n_groups
    return Grouping(labels, method="random", seconds=time.perf_counter() - t0)


def given_grouping(train, values=None, column: str = "group") -> Grouping:
    """User-given groups, validated against the training set.

    ``values``: ``None`` (the data's group column, e.g. ``--group-column source`` at training
    time), an array (integer ids must already be 0..K-1 with no empty group; strings or other
    labels are numbered in sorted order), or a ``.npy`` / ``.csv`` / ``.parquet`` file (``column``
    names the table column).
    """
    n = len(train)
    if values is None:
        if getattr(train, "group_column", None) is None:
            raise GGDAError(
                "The training data has no group column; train with --group-column NAME or pass "
                "values= (CLI: --values FILE), an array or a .npy/.csv/.parquet file of group ids."
            )
        g = Grouping.from_ids(train.group_column, method="given", names=getattr(train, "group_names", None))
    elif isinstance(values, (str, Path)):
        g = Grouping.load(values, column=column)
    else:
        arr = np.asarray(values)
        if arr.dtype.kind in "OUS":
            g = Grouping.from_ids(arr, method="given")
        elif arr.dtype.kind == "b":
            raise GGDAError("Given group ids are booleans; pass integer ids 0..K-1 (e.g. mask.astype(int)).")
        else:
            g = Grouping(arr, method="given")
    g.check_matches(n, "the training set")
    return g


# -- features -----------------------------------------------------------------------------------
def _task_for(method: str, task, train):
    """The task whose forward the features go through: a bare model becomes a task, and on packed
    token rows (``ggda.data.text.token_dataset``) a plain task becomes the token-reading task, so
    the model sees ``input_ids``/``attention_mask`` and never the packed floats."""
    if task is None:
        raise GGDAError(
            f"{method} needs the trained model: pass task=AttributionTask(model) (CLI: --run RUN of a "
            "trained run), or use method='kmeans'/'random'."
        )
    from torch import nn

    from ggda.task import AttributionTask

    if not isinstance(task, (nn.Module, AttributionTask)):
        raise GGDAError(f"task must be an AttributionTask or an nn.Module; got {type(task).__name__}.")
    if is_token_data(train):
        from ggda.task import task_for_tokens

        return task_for_tokens(task, train.meta.get("fields") or ("input_ids", "attention_mask"), train.kind)
    if isinstance(task, nn.Module):
        task = AttributionTask(task, loss=train.kind)
    return task


def is_token_data(train) -> bool:
    """Rows of packed token ids (``ggda.data.text.token_dataset``), not features."""
    return (getattr(train, "meta", None) or {}).get("format") == "tokens"


def _features(method: str, train, task, seed: int, options: dict) -> tuple[np.ndarray, dict]:
    from ggda.groups import features as feat

    if method == "kmeans":
        if is_token_data(train):
            raise GGDAError(feat.KMEANS_ON_IDS)
        return feat.input_features(train.X, options.get("standardize", True)), {"features": "inputs"}
    if method == "repr-kmeans":
        task = _task_for(method, task, train)
        F = feat.representation_features(task, train.X, options.get("layer"), options.get("chunk_size", 4096))
        if options.get("standardize", False):
            F = feat.input_features(F)
        info = {"features": "representation", "layer": options.get("layer") or "input of output layer"}
        return _normalized(F, options.get("normalize", "none"), info)
    task = _task_for(method, task, train)
    kind = options.get("features", "last-layer")
    F = feat.gradient_features(
        task,
        train.X,
        train.y,
        features=kind,
        layer=options.get("layer"),
        projection_dim=options.get("projection_dim"),
        seed=seed,
        chunk_size=options.get("chunk_size", 2048),
        memory_mb=options.get("memory_mb", 256.0),
    )
    info = {"features": f"gradient/{kind}"}
    if options.get("projection_dim") or kind == "projected":
        info["projection_dim"] = int(F.shape[1])
    if options.get("layer"):
        info["layer"] = options["layer"]
    return _normalized(F, options.get("normalize", "unit"), info)


def _normalized(F: np.ndarray, normalize: str, info: dict) -> tuple[np.ndarray, dict]:
    """Rows scaled to unit length (``unit``; zero rows stay zero) or left as they are (``none``).

    Unit rows make K-Means cluster gradient *directions*: on a model that fits its training set
    most gradients are near zero, and raw Euclidean K-Means spends its clusters on the few
    high-loss points while every well-fit point falls into one cluster."""
    if normalize not in NORMALIZE:
        raise GGDAError(f"Unknown normalize '{normalize}'; choose one of {', '.join(NORMALIZE)}.")
    info["normalize"] = normalize
    if normalize == "unit":
        norms = np.linalg.norm(F, axis=1, keepdims=True)
        F = np.ascontiguousarray(F / np.where(norms > 0, norms, 1.0), dtype=np.float32)
    return F, info


# -- the entry point ----------------------------------------------------------------------------
def make_grouping(
    method: str,
    train,
    n_groups: int | None = None,
    group_size: int | float | None = None,
    task=None,
    per_class: bool | None = None,
    seed: int = 0,
    **options,
) -> Grouping:
    """Group the training set ``train`` (a :class:`~ggda.data.Dataset` or any data source that
    :func:`~ggda.data.sources.as_dataset` reads) with ``method``.

    Args:
        method: ``random``, ``kmeans``, ``repr-kmeans``, ``grad-kmeans``, ``given`` or ``singleton``.
        n_groups / group_size: exactly one (not needed for ``given``/``singleton``).
        task: :class:`~ggda.task.AttributionTask` (or the ``nn.Module``) of the trained model;
            needed by ``repr-kmeans`` and ``grad-kmeans``.
        per_class: cluster within each class (label-pure groups; classification only).
            ``None`` (default): on for the K-Means methods on classification data when K is at
            least the number of classes, off otherwise (``random`` stays a plain random split).
        seed: seeds the random partition, k-means++ and any random projection.
        options: ``layer``, ``features`` (``last-layer``/``logits``/``projected``),
            ``projection_dim``, ``normalize`` (``unit``, the default for grad-kmeans, or
            ``none``), ``standardize``, ``chunk_size``, ``memory_mb``, ``balance``
            (``bounded``, default: every group between m/r and m·r points, m = n/K,
            r = ``size_ratio`` = 2; ``none``: plain variance-minimising K-Means), ``algorithm``
            (``auto``/``kmeans``/``minibatch``), ``n_init``, ``max_iter``, ``batch_size``,
            ``empty`` (``reseed``/``merge``); ``values``, ``column`` for ``given``.
    """
    from ggda.data.sources import as_dataset

    train = as_dataset(train)
    if method not in GROUPING_METHODS:
        raise GGDAError(f"Unknown grouping method '{method}'; choose one of {', '.join(GROUPING_METHODS)}.")
    unknown = sorted(set(options) - set(METHOD_OPTIONS[method]))
    if unknown:
        allowed = ", ".join(METHOD_OPTIONS[method]) or "none"
        raise GGDAError(f"Unknown option(s) {unknown} for grouping '{method}'; allowed: {allowed}.")
    n = len(train)
    classification = getattr(train, "kind", "classification") == "classification"
    t0 = time.perf_counter()
    if method in ("given", "singleton"):
        if method == "given" and per_class:
            raise GGDAError(
                "per_class does not apply to given groups; split them yourself or drop --per-class."
            )
        if n_groups is not None or group_size is not None:
            raise GGDAError(
                f"'{method}' groups fix K themselves; drop n_groups/group_size (--groups/--group-size)."
            )
        g = (
            Grouping.singleton(n)
            if method == "singleton"
            else given_grouping(train, options.get("values"), options.get("column", "group"))
        )
        g.seconds = time.perf_counter() - t0
        return _finish(g, train, per_class and method == "singleton", classification)
    if per_class and not classification:
        raise GGDAError("per_class needs class labels; drop --per-class for regression data.")
    K = resolve_n_groups(n, n_groups, group_size)
    per_class = _default_per_class(method, per_class, classification, train, K, group_size)

    meta: dict = {}
    F = None
    if method != "random":
        tf = time.perf_counter()
        F, info = _features(method, train, task, seed, options)
        meta.update(info, feature_dim=int(F.shape[1]), feature_seconds=time.perf_counter() - tf)
    tc = time.perf_counter()
    cluster_opts = {k: options[k] for k in CLUSTER_OPTIONS if k in options}
    if per_class:
        labels, cmeta = _per_class(method, train.y, K, group_size, F, seed, cluster_opts)
    else:
        labels, cmeta = _partition(method, n, K, F, seed, cluster_opts)
    meta.update(cmeta, cluster_seconds=time.perf_counter() - tc, requested_K=K)
    g = Grouping(labels, method=method, seconds=time.perf_counter() - t0, meta=meta)
    return _finish(g, train, per_class, classification)


def _default_per_class(method, per_class, classification, train, K, group_size) -> bool:
    """``per_class=None``: per-class for the K-Means methods on classification data when every
    class can have a group (K ≥ C, or any target group size)."""
    if per_class is not None:
        return bool(per_class)
    if method not in CLUSTERED_METHODS or not classification or getattr(train, "y", None) is None:
        return False
    return group_size is not None or K >= len(np.unique(train.y))


def _partition(method: str, n: int, K: int, F, seed: int, cluster_opts: dict) -> tuple[np.ndarray, dict]:
    if method == "random":
        return random_grouping(n, K, seed).labels, {}
    from ggda.groups.clustering import BALANCE_POLICIES, SIZE_RATIO, bounded_kmeans_labels, kmeans_labels

    opts = dict(cluster_opts)
    balance = opts.pop("balance", "bounded")
    ratio = opts.pop("size_ratio", SIZE_RATIO)
    if balance not in BALANCE_POLICIES:
        raise GGDAError(f"Unknown balance '{balance}'; choose one of {', '.join(BALANCE_POLICIES)}.")
    if balance == "none":
        labels, meta = kmeans_labels(F, K, seed=seed, **opts)
        return labels, meta | {"balance": "none"}
    return bounded_kmeans_labels(F, K, seed=seed, size_ratio=ratio, **opts)


def _per_class(method, y, K, group_size, F, seed, cluster_opts) -> tuple[np.ndarray, dict]:
    classes, inverse, class_sizes = np.unique(y, return_inverse=True, return_counts=True)
    if group_size is not None:
        k = np.clip(np.round(class_sizes / group_size).astype(np.int64), 1, class_sizes)
    else:
        k = allocate_groups(class_sizes, K)
    labels = np.empty(len(y), dtype=np.int64)
    offset, empty, algorithms, warns, rounds = 0, 0, set(), set(), 0
    unbalanced: list[np.ndarray] = []
    balance: dict = {}
    for c, kc in enumerate(k):
        rows = np.flatnonzero(inverse == c)
        sub, sub_meta = _partition(
            method, len(rows), int(kc), None if F is None else F[rows], seed, cluster_opts
        )
        labels[rows] = sub + offset
        offset += int(sub.max()) + 1
        empty += int(sub_meta.get("empty_clusters", 0))
        if "algorithm" in sub_meta:
            algorithms.add(sub_meta["algorithm"])
        warns.update(sub_meta.get("warnings", []))
        balance.update(
            {key: sub_meta[key] for key in ("balance", "size_ratio", "balance_note") if key in sub_meta}
        )
        rounds = max(rounds, int(sub_meta.get("balance_rounds", 0)))
        if "unbalanced_counts" in sub_meta:
            unbalanced.append(sub_meta["unbalanced_counts"])
    meta: dict = {"groups_per_class": {str(cls): int(kc) for cls, kc in zip(classes, k, strict=True)}}
    if method != "random":
        meta.update(algorithm="+".join(sorted(algorithms)), empty_clusters=empty, **balance)
        if balance.get("balance") == "bounded":
            meta["balance_rounds"] = rounds
        if unbalanced:
            meta["unbalanced_sizes"] = _size_stats(np.concatenate(unbalanced))
        if empty:
            meta["empty_policy"] = cluster_opts.get("empty", "reseed")
        if warns:
            meta["warnings"] = sorted(warns)
    return labels, meta


def _size_stats(sizes: np.ndarray) -> dict:
    sizes = np.asarray(sizes)
    return {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())}


def _finish(g: Grouping, train, per_class: bool, classification: bool) -> Grouping:
    g.meta["per_class"] = bool(per_class)
    g.meta["sizes"] = _size_stats(g.sizes)
    if "unbalanced_counts" in g.meta:  # what plain K-Means gave before the size bounds
        g.meta["unbalanced_sizes"] = _size_stats(g.meta.pop("unbalanced_counts"))
    if classification and getattr(train, "y", None) is not None:
        g.meta["purity"] = g.purity(train.y)
    return g
