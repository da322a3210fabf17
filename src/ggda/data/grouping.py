"""The :class:`Grouping` object: which group each training point belongs to.

Every method is written for groups; per-point attribution uses :meth:`Grouping.singleton`.
Validation lives here so no method ever sees an empty group or an out-of-range id.

It sits in the data layer, not in :mod:`ggda.groups`, because it is a partition of a data set's
rows and nothing more: gradients (group sums), methods, evaluations and results consume it, while
:mod:`ggda.groups` *builds* it (random, K-means, representation and gradient clustering), which
needs gradients. Keeping the object below both is what lets gradients use it without importing
the clustering that uses gradients. ``ggda.groups.Grouping`` is the same class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ggda.errors import GGDAError
from ggda.io import atomic_write, save_csv, save_npy


@dataclass
class Grouping:
    """Group id per training point (positions in the training set), ids 0..K-1, none empty.

    Attributes:
        labels: (n,) int64 group id of each training point.
        method: how it was made (``singleton``, ``random``, ``kmeans``, ``given``, ...).
        seconds: time spent building it (GGDA's reviewers asked for it in the runtimes).
        meta: free-form record (e.g. re-seeded empty clusters).
        names: optional name of each group (index = group id), e.g. the values of a ``column``
            grouping (``model_year`` 70..82 rather than 0..12), so results can be read by name;
            ``None`` means the group ids themselves are the names (see :meth:`group_names`).
    """

    labels: np.ndarray
    method: str = "given"
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)
    names: list[str] | None = None

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.ndim != 1:
            raise GGDAError(f"A grouping is one id per training point (1-D); got shape {labels.shape}.")
        if labels.dtype.kind == "f":
            if not np.all(labels == np.round(labels)):
                raise GGDAError("Group ids must be integers 0..K-1; got non-integer values.")
        elif labels.dtype.kind not in "iu":
            raise GGDAError(f"Group ids must be integers 0..K-1; got dtype {labels.dtype}.")
        labels = labels.astype(np.int64)
        if len(labels) == 0:
            raise GGDAError("The grouping is empty; pass one group id per training point.")
        if labels.min() < 0:
            raise GGDAError("Group ids must be integers 0..K-1; found negative ids.")
        counts = np.bincount(labels)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            raise GGDAError(
                f"Group ids must be 0..K-1 with no empty group; ids {empty[:5].tolist()} have no members "
                "(relabel with np.unique(ids, return_inverse=True)[1])."
            )
        self.labels = labels
        if self.names is not None:
            self.names = [str(v) for v in self.names]
            if len(self.names) != len(counts):
                raise GGDAError(
                    f"The grouping has {len(counts)} groups but {len(self.names)} names; pass one name per group."
                )
            if len(set(self.names)) != len(self.names):
                raise GGDAError("Group names must be distinct; two groups share a name.")

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def singleton(cls, n: int) -> Grouping:
        """Each point its own group: per-point attribution."""
        return cls(np.arange(n, dtype=np.int64), method="singleton")

    @classmethod
    def from_ids(
        cls, ids: np.ndarray, method: str = "given", names: np.ndarray | list[str] | None = None
    ) -> Grouping:
        """Any hashable ids per point (strings, sparse ints) relabelled to 0..K-1 in sorted order.

        Each group is named after its value; when ``ids`` are integer codes into ``names`` (a data
        set's factorised group column and its ``group_names``), group ``g`` is named
        ``names[code]``, the column's original value, so a subset that misses some values (a
        train split) still names every group right.
        """
        uniq, labels = np.unique(np.asarray(ids), return_inverse=True)
        if names is not None:
            names = np.asarray(names)
            if uniq.dtype.kind not in "iu" or uniq.min() < 0 or uniq.max() >= len(names):
                raise GGDAError(
                    f"Group codes {uniq[:5].tolist()} do not index {len(names)} group names; pass integer "
                    "codes 0..len(names)-1."
                )
            named = [str(names[int(u)]) for u in uniq]
        else:
            named = [str(u) for u in uniq]
        g = cls(labels.astype(np.int64), method=method, names=named)
        g.meta["names"] = named  # kept for readers of the older record
        return g

    # -- views --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_groups(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.n_groups)

    @property
    def is_singleton(self) -> bool:
        return self.n_groups == len(self.labels)

    def group_names(self, ids: np.ndarray | None = None) -> list[str]:
        """A name per group: :attr:`names` when given; else, for singletons with the training
        set's data ``ids``, each point's id; else the group id (``"0"``, ``"1"``, ...)."""
        if self.names is not None:
            return list(self.names)
        if ids is not None and self.is_singleton and self.method == "singleton":
            return [str(v) for v in np.asarray(ids)]
        return [str(g) for g in range(self.n_groups)]

    def members(self, group: int) -> np.ndarray:
        return np.flatnonzero(self.labels == group)

    def member_lists(self) -> list[np.ndarray]:
        """Positions of every group's members, in one pass (sorted by group, then position)."""
        order = np.argsort(self.labels, kind="stable")
        return np.split(order, np.cumsum(self.sizes)[:-1])

    def check_matches(self, n: int, what: str = "the training set") -> None:
        if len(self.labels) != n:
            raise GGDAError(
                f"The grouping has {len(self.labels)} entries but {what} has {n} points; "
                "pass one group id per training point."
            )

    def expand(self, group_scores: np.ndarray, per_point: bool = True) -> np.ndarray:
        """Per-point scores from group scores: score / |group| (NOTES convention) or the raw score."""
        group_scores = np.asarray(group_scores)
        out = group_scores[..., self.labels]
        return out / self.sizes[self.labels] if per_point else out

    def purity(self, labels: np.ndarray) -> float:
        """Class purity: the fraction of points whose class is the majority class of their group.

        1.0 means every group is label-pure (what per-class groupings guarantee); noisy-label
        detection from group scores needs pure groups, so it is reported with every grouping.
        """
        labels = np.asarray(labels)
        self.check_matches(len(labels), "the label vector")
        _, classes = np.unique(labels, return_inverse=True)
        counts = np.zeros((self.n_groups, int(classes.max()) + 1), dtype=np.int64)
        np.add.at(counts, (self.labels, classes), 1)
        return float(counts.max(axis=1).sum() / len(labels))

    def pure_fraction(self, labels: np.ndarray) -> float:
        """Fraction of groups whose members all share one class."""
        labels = np.asarray(labels)
        self.check_matches(len(labels), "the label vector")
        order = np.lexsort((labels, self.labels))
        g, c = self.labels[order], labels[order]
        changes = np.flatnonzero((g[1:] == g[:-1]) & (c[1:] != c[:-1]))
        mixed = np.unique(g[1:][changes])
        return float(1.0 - len(mixed) / self.n_groups)

    def summary(self, labels: np.ndarray | None = None) -> dict:
        """K, size distribution and build time; class purity too when class ``labels`` are given."""
        s = self.sizes
        out = {
            "method": self.method,
            "K": self.n_groups,
            "n": len(self),
            "min_size": int(s.min()),
            "median_size": float(np.median(s)),
            "max_size": int(s.max()),
            "seconds": self.seconds,
        }
        if "per_class" in self.meta:
            out["per_class"] = bool(self.meta["per_class"])
        if labels is not None:
            out["purity"] = self.purity(labels)
            out["pure_groups"] = self.pure_fraction(labels)
        return out

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path, ids: np.ndarray | None = None) -> Path:
        """Write ``.npy`` (the id array) or ``.parquet``/``.csv`` (columns position, [id,] group).

        ``ids`` (the training set's stable ids) are written as an ``id`` column so a table still
        names the right points if the training set is later reordered.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".parquet", ".pq", ".csv"):
            import pandas as pd

            columns = {"position": np.arange(len(self))}
            if ids is not None:
                ids = np.asarray(ids)
                self.check_matches(len(ids), "the id vector")
                columns["id"] = ids
            columns["group"] = self.labels
            frame = pd.DataFrame(columns)
            if path.suffix == ".csv":
                save_csv(path, frame)
            else:
                atomic_write(path, lambda fh: frame.to_parquet(fh))
        else:
            if path.suffix != ".npy":  # np.save appends .npy; return the path actually written
                path = path.with_name(path.name + ".npy")
            save_npy(path, self.labels)
        return path

    @classmethod
    def load(cls, path: str | Path, column: str = "group") -> Grouping:
        path = Path(path)
        if not path.exists():
            raise GGDAError(f"Grouping file {path} does not exist; check the path.")
        if path.is_dir():
            raise GGDAError(f"Grouping file {path} is a directory; pass a .npy, .csv or .parquet file.")
        fix = "pass a complete .npy, .csv or .parquet file of group ids (one per training point)."
        if path.suffix == ".npy":
            try:
                labels = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                raise GGDAError(
                    f"Grouping file {path} cannot be read (empty, truncated or not .npy); {fix}"
                ) from exc
            return cls(labels, method="given")
        import pandas as pd

        try:
            frame = pd.read_parquet(path) if path.suffix in (".parquet", ".pq") else pd.read_csv(path)
        except Exception as exc:  # pandas/pyarrow parser errors of every kind
            raise GGDAError(
                f"Grouping file {path} cannot be read (empty, truncated or corrupt); {fix}"
            ) from exc
        if "position" in frame.columns:  # written by save(): restore training-set order
            frame = frame.sort_values("position", kind="stable")
        if column not in frame.columns:
            raise GGDAError(f"Column '{column}' is not in {path}; choose one of {list(frame.columns)}.")
        return cls.from_ids(frame[column].to_numpy(), method="given")
