"""The data set abstraction every other module consumes.

A :class:`Dataset` is inputs ``X``, targets ``y`` and *stable integer ids*. ``X`` is either an
in-memory (n × d, float32, flattened) matrix — the array adapter — or lazily fetched
:class:`~ggda.data.batches.ExampleInputs` (a torch ``Dataset``, a ``DataLoader``'s data set, a
Hugging Face ``datasets.Dataset``; see :mod:`ggda.data.sources`), read a batch at a time. Labels,
ids and group ids are always held (O(n)). Ids survive subsetting, splitting and shuffling, so an attribution score, a grouping or a
left-out set always refers to the same training point, whatever order the arrays are in.
Validation happens once, here, so downstream code can trust the arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from ggda.data.batches import ExampleInputs, HFInputs, TorchInputs
from ggda.errors import GGDAError

TaskKind = Literal["classification", "regression"]


@dataclass
class Dataset:
    """Features, targets and stable ids of a set of examples.

    Attributes:
        X: (n, d) float32 features (images stored flattened; ``input_shape`` restores them), or
            lazily fetched :class:`~ggda.data.batches.ExampleInputs` of any batch structure.
        y: (n,) int64 class labels 0..C-1 (classification) or float32 targets (regression).
        ids: (n,) int64 stable ids, unique within the data set.
        name: a short name used in reports and file names.
        kind: ``"classification"`` or ``"regression"``.
        n_classes: number of classes C (classification) or ``None``.
        input_shape: per-example shape before flattening, e.g. (1, 8, 8), for CNNs.
        feature_names: optional column names of ``X``.
        noisy: optional (n,) bool mask of labels flipped by :func:`ggda.data.flip_labels`.
        group_column: optional (n,) user-given group ids (e.g. the data source of each row).
        group_names: optional original values of the group column as strings, indexed by group
            id (``group_names[group_column[i]]`` is row i's value, e.g. ``"70"`` for model year
            70), so outputs can name groups as the user wrote them. Kept by subsets and splits.
    """

    X: np.ndarray
    y: np.ndarray
    ids: np.ndarray | None = None
    name: str = "data"
    kind: TaskKind = "classification"
    n_classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    feature_names: list[str] | None = None
    noisy: np.ndarray | None = None
    group_column: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    group_names: np.ndarray | None = None

    def __post_init__(self) -> None:
        if isinstance(self.X, ExampleInputs):
            self._check_targets(len(self.X))
            return
        X = np.asarray(self.X)
        if X.ndim == 1:
            X = X[:, None]
        if X.ndim > 2:
            if self.input_shape is None:
                self.input_shape = tuple(X.shape[1:])
            X = X.reshape(len(X), -1)
        if not np.issubdtype(X.dtype, np.number):
            raise GGDAError(
                f"Features of '{self.name}' are not numeric (dtype {X.dtype}); one-hot encode "
                "categorical columns (load_file(..., categorical=[...]) does it) before building a Dataset."
            )
        self.X = np.ascontiguousarray(X, dtype=np.float32)
        if not np.isfinite(self.X).all():
            bad = int((~np.isfinite(self.X)).any(axis=1).sum())
            raise GGDAError(
                f"{bad} rows of '{self.name}' contain NaN or inf features; drop or impute them "
                "(e.g. pandas .dropna() or .fillna()) before loading."
            )
        self._check_targets(len(self.X))

    @property
    def lazy(self) -> bool:
        """Whether the inputs are fetched in batches (not one in-memory matrix)."""
        return isinstance(self.X, ExampleInputs)

    def _check_targets(self, n_rows: int) -> None:
        y = self.y.cpu().numpy() if hasattr(self.y, "cpu") else np.asarray(self.y)
        if y.ndim != 1:
            y = y.reshape(len(y), -1)
            if y.shape[1] != 1:
                raise GGDAError(f"Targets of '{self.name}' have shape {y.shape}; pass a 1-D label vector.")
            y = y[:, 0]
        if len(y) != n_rows:
            raise GGDAError(f"X has {n_rows} rows but y has {len(y)}; pass one label per row of X.")
        if self.kind == "classification":
            if y.dtype.kind == "f":
                if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
                    raise GGDAError(
                        f"Labels of '{self.name}' are not integers; classification needs labels 0..C-1 "
                        "(map them with np.unique(y, return_inverse=True)) or use kind='regression'."
                    )
            elif y.dtype.kind not in "iub":
                raise GGDAError(
                    f"Labels of '{self.name}' have dtype {y.dtype}; encode them as integers 0..C-1 "
                    "(np.unique(y, return_inverse=True)[1])."
                )
            y = y.astype(np.int64)
            if len(y) and y.min() < 0:
                raise GGDAError(
                    f"Labels of '{self.name}' contain negative values; use labels 0..C-1 "
                    "(np.unique(y, return_inverse=True)[1])."
                )
            if self.n_classes is None:
                self.n_classes = int(y.max()) + 1 if len(y) else 0
            elif len(y) and y.max() >= self.n_classes:
                raise GGDAError(
                    f"Label {int(y.max())} of '{self.name}' is out of range for n_classes={self.n_classes}; "
                    "use labels 0..C-1."
                )
        else:
            y = y.astype(np.float32)
            if not np.isfinite(y).all():
                raise GGDAError(f"Targets of '{self.name}' contain NaN or inf; drop those rows first.")
            self.n_classes = None
        self.y = y
        if self.ids is None:
            self.ids = np.arange(len(y), dtype=np.int64)
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if len(self.ids) != len(y):
            raise GGDAError(f"ids has {len(self.ids)} entries for {len(y)} rows; pass one id per row.")
        if len(np.unique(self.ids)) != len(self.ids):
            raise GGDAError(f"ids of '{self.name}' are not unique; pass one distinct integer id per row.")
        if self.noisy is not None:
            self.noisy = np.asarray(self.noisy, dtype=bool)
        if self.group_column is not None:
            self.group_column = np.asarray(self.group_column)
        if self.group_names is not None:
            self.group_names = np.asarray(self.group_names).astype(str)
            if self.group_column is None or self.group_names.ndim != 1:
                raise GGDAError(
                    f"group_names of '{self.name}' need a group_column and one name per group id; "
                    "pass both or neither."
                )
            ids = self.group_column
            if len(ids) and (
                ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= len(self.group_names)
            ):
                raise GGDAError(
                    f"group_column of '{self.name}' holds ids outside 0..{len(self.group_names) - 1} of its "
                    f"{len(self.group_names)} group_names; factorise the column (pd.factorize) first."
                )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_features(self) -> int:
        """Input width of a flat feature matrix (lazy single-tensor inputs: elements per example)."""
        if self.lazy:
            shape = self.X.shape
            if len(shape) < 2:
                raise GGDAError(
                    f"'{self.name}' has structured inputs (tuples/dicts); it has no single feature width — "
                    "build your own model instead of a zoo model."
                )
            return int(np.prod(shape[1:]))
        return int(self.X.shape[1])

    def as_torch(self):
        """The examples as a map-style torch ``Dataset`` in the user's own item format.

        What a user training function receives: for a torch source, a ``Subset`` of the user's
        dataset at these positions; for a Hugging Face source, ``dataset.select(positions)``; for
        arrays, a ``TensorDataset`` of (x, y) rows (x reshaped to ``input_shape`` when known).
        """
        import torch
        from torch.utils.data import Subset, TensorDataset

        X = self.X
        if isinstance(X, TorchInputs):
            idx = np.arange(X.n_source) if X.index is None else X.index
            return X.dataset if X.index is None else Subset(X.dataset, idx.tolist())
        if isinstance(X, HFInputs):
            return X.dataset if X.index is None else X.dataset.select(X.index.tolist())
        if isinstance(X, ExampleInputs):
            raise GGDAError(
                f"{type(X).__name__} has no torch Dataset form; pass the data as a torch Dataset."
            )
        return TensorDataset(torch.as_tensor(X), torch.as_tensor(self.y))

    @property
    def n_outputs(self) -> int:
        """Width of the model's output layer: C logits, or 1 for regression."""
        return int(self.n_classes) if self.kind == "classification" else 1

    def subset(self, index: np.ndarray | list[int], name: str | None = None) -> Dataset:
        """Rows ``index`` (positions, not ids) as a new data set that keeps their ids."""
        index = np.asarray(index)
        return replace(
            self,
            X=self.X[index],
            y=self.y[index],
            ids=self.ids[index],
            name=name or self.name,
            noisy=None if self.noisy is None else self.noisy[index],
            group_column=None if self.group_column is None else self.group_column[index],
            meta=dict(self.meta),
        )

    def positions_of(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Positions of the given ids in this data set; a clear error for ids it does not hold."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(self.ids)
        found = np.searchsorted(self.ids, ids, sorter=order)
        found = np.clip(found, 0, len(order) - 1)
        pos = order[found]
        missing = self.ids[pos] != ids
        if missing.any():
            raise GGDAError(
                f"{int(missing.sum())} ids (e.g. {int(ids[missing][0])}) are not in '{self.name}'; "
                "pass ids of this data set's rows."
            )
        return pos

    def describe(self) -> str:
        width = f"inputs {self.X.describe()}" if self.lazy else f"d={self.n_features}"
        base = f"{self.name}: n={len(self)}, {width}, {self.kind}"
        if self.kind == "classification":
            counts = np.bincount(self.y, minlength=self.n_classes)
            base += f", C={self.n_classes}, class sizes {counts.min()}..{counts.max()}"
        elif "target_scale" in self.meta:  # see ggda.data.preprocess.TargetScaler
            base += (
                f", target standardised (train mean {self.meta['target_mean']:.4g}, "
                f"std {self.meta['target_scale']:.4g})"
            )
        return base
