"""Grouping specs for the CLI (``ggda attribute --grouping SPEC``, evaluation configs).

Grammar: ``METHOD[:TOKEN]...`` where TOKEN is

* ``K`` (an integer) — the number of groups, or ``size=S`` — a target group size;
* ``per-class`` / ``no-per-class`` — cluster within each class, or over all points (the K-Means
  methods are per-class by default on classification data);
* ``KEY=VALUE`` — any :func:`~ggda.groups.make_grouping` option (``seed``, ``layer``,
  ``features``, ``projection_dim``, ``algorithm``, ``empty``, ...); values are typed
  (int, float, true/false, none, else string).

Examples: ``random:50``, ``kmeans:100``, ``repr-kmeans:100:layer=1``, ``grad-kmeans:72``,
``grad-kmeans:72:per-class``, ``grad-kmeans:size=20:per-class:seed=3``,
``grad-kmeans:100:features=projected:projection_dim=256``, ``given`` (the data's group column),
``singleton``.
"""

from __future__ import annotations

from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.groups.make import GROUPING_METHODS, make_grouping
from ggda.options import parse_scalar

GROUPING_SPECS = (
    "singleton",
    "column",
    "given",
    "random:K",
    "kmeans:K",
    "repr-kmeans:K",
    "grad-kmeans:K",
    "METHOD:size=S",
    "METHOD:K:per-class",
)


#: Worked examples of the grammar, shown by ``ggda attribute --help`` and ``ggda group --help``
#: (a test parses every one with :func:`parse_grouping_spec`).
GROUPING_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("singleton", "one group per training point (per-point attribution)"),
    ("random:50", "50 random groups of equal size"),
    ("kmeans:64", "K-Means on the inputs (per class on classification data)"),
    ("repr-kmeans:64:layer=1", "K-Means on the output of module '1'"),
    ("grad-kmeans:72:per-class", "K-Means on per-example gradients, within each class"),
    ("grad-kmeans:72:no-per-class", "the same over all points at once"),
    ("grad-kmeans:size=20:seed=3", "groups of about 20 points (K = n/20), seed 3"),
    ("grad-kmeans:64:features=projected:projection_dim=256", "all-parameter gradients, projected"),
    ("given:values=groups.csv", "group ids from a file ('group' column; :column=NAME)"),
    ("column", "the data's group column (train --group-column NAME)"),
)


def parse_grouping_spec(spec: str) -> tuple[str, dict]:
    """``"grad-kmeans:size=20:per-class:seed=1"`` -> ``("grad-kmeans", {group_size: 20, per_class: True, seed: 1})``."""
    method, *tokens = spec.strip().split(":")
    if method == "column":
        method = "given"
    if method not in GROUPING_METHODS:
        raise GGDAError(
            f"Unknown grouping '{spec}'; use one of {', '.join(GROUPING_SPECS)} or a .npy/.csv/.parquet "
            "file of group ids."
        )
    kwargs: dict = {}
    for token in tokens:
        key, sep, raw = token.partition("=")
        if not sep:
            if token.isdigit():
                kwargs["n_groups"] = int(token)
            elif token in ("per-class", "per_class"):
                kwargs["per_class"] = True
            elif token in ("no-per-class", "no_per_class"):
                kwargs["per_class"] = False
            else:
                raise GGDAError(
                    f"Cannot read '{token}' in grouping '{spec}'; write K, size=S, per-class, no-per-class or KEY=VALUE "
                    "(e.g. grad-kmeans:100:per-class)."
                )
            continue
        key = key.replace("-", "_")
        if key in ("size", "group_size"):
            key = "group_size"
        elif key in ("k", "groups"):
            key = "n_groups"
        kwargs[key] = parse_scalar(raw)
    for key in ("n_groups", "group_size"):
        value = kwargs.get(key)
        if value is not None and not isinstance(value, (int, float)):
            raise GGDAError(f"'{value}' is not a number in grouping '{spec}'; write e.g. {method}:100.")
    if method not in ("given", "singleton") and "n_groups" not in kwargs and "group_size" not in kwargs:
        raise GGDAError(
            f"Grouping '{spec}' needs a number of groups or a size; write e.g. {method}:100 or {method}:size=20."
        )
    return method, kwargs


def build_grouping_from_spec(spec: str, run, device: str = "cpu") -> Grouping:
    """Grouping of a run's training set from a spec (see the module docstring).

    ``run`` is a :class:`ggda.runs.Run` (``.train``, ``.model``, ``.kind``); the model is only
    used by ``repr-kmeans`` and ``grad-kmeans``.
    """
    method, kwargs = parse_grouping_spec(spec)
    task = None
    if method in ("repr-kmeans", "grad-kmeans"):
        model = getattr(run, "model", None)
        if model is None:
            raise GGDAError(f"{method} needs a trained model; pass a run directory from `ggda train`.")
        from ggda.task import AttributionTask

        task = AttributionTask(model, loss=run.kind, device=device)
    return make_grouping(method, run.train, task=task, **kwargs)
