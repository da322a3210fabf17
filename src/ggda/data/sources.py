"""Adapters from what users hold to a :class:`~ggda.data.Dataset`: the one entry to the data boundary.

:func:`as_dataset` accepts NumPy arrays, a pandas ``DataFrame``, a map-style torch ``Dataset``, an
unshuffled ``DataLoader`` or a Hugging Face ``datasets.Dataset`` and returns a ggda ``Dataset``
whose positions are the source's positions (so scores, groupings and top-k files index into
the user's own data). Inputs of torch and Hugging Face sources stay lazy (read a batch at a
time); only the labels are read up front (O(n)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ggda.data.batches import HFInputs, TorchInputs
from ggda.data.dataset import Dataset, TaskKind
from ggda.errors import GGDAError


def _finish(inputs, labels, kind: TaskKind, n_classes, name, ids, group_column, input_shape=None) -> Dataset:
    labels = np.asarray(labels)
    if len(labels) != len(inputs):
        raise GGDAError(
            f"The data have {len(inputs)} examples but {len(labels)} labels; pass one label per example."
        )
    return Dataset(
        X=inputs,
        y=labels,
        ids=ids,
        name=name,
        kind=kind,
        n_classes=n_classes,
        input_shape=input_shape,
        group_column=group_column,
    )


def from_torch(
    dataset,
    labels: Sequence | np.ndarray | None = None,
    *,
    split: Callable[[Any], tuple[Any, Any]] | None = None,
    label_key: str | None = None,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    kind: TaskKind = "classification",
    n_classes: int | None = None,
    name: str = "data",
    ids: np.ndarray | None = None,
    group_column: np.ndarray | None = None,
) -> Dataset:
    """A map-style torch ``Dataset`` whose items are ``(inputs, label)`` or dicts with a label.

    ``labels`` (n,): give them when reading every item once to collect them would be slow (a
    ``targets`` attribute of the right length is used automatically). ``split(batch) ->
    (inputs, labels)`` handles other item layouts.
    """
    from torch.utils.data import IterableDataset

    if isinstance(dataset, IterableDataset):
        raise GGDAError(
            "An IterableDataset has no stable positions; use a map-style Dataset (indexable, with len)."
        )
    inputs = TorchInputs(dataset, split, collate_fn, num_workers, pin_memory, label_key)
    y = inputs.labels() if labels is None else labels
    return _finish(inputs, y, kind, n_classes, name, ids, group_column)


def from_loader(loader, labels: Sequence | np.ndarray | None = None, **kwargs) -> Dataset:
    """An unshuffled ``DataLoader``: its dataset, collate function, workers and pinning.

    A shuffling loader (or any sampler other than the sequential one) is refused: positions would
    change between passes, and every score must refer to one example.
    """
    from torch.utils.data import SequentialSampler

    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, SequentialSampler) or (
        batch_sampler is not None and getattr(batch_sampler, "sampler", sampler) is not sampler
    ):
        raise GGDAError(
            "The DataLoader shuffles or samples (positions would not be stable); build it with "
            "shuffle=False and no sampler, or pass its dataset."
        )
    if getattr(loader, "drop_last", False) and len(loader.dataset) % (loader.batch_size or 1):
        raise GGDAError("The DataLoader drops its last batch; build it with drop_last=False.")
    from torch.utils.data import default_collate

    collate = loader.collate_fn if loader.collate_fn is not default_collate else None
    return from_torch(
        loader.dataset,
        labels,
        collate_fn=collate,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        **kwargs,
    )


def from_huggingface(
    dataset,
    label: str = "label",
    inputs: Sequence[str] | None = None,
    *,
    collate_fn: Callable | None = None,
    kind: TaskKind = "classification",
    n_classes: int | None = None,
    name: str = "data",
    ids: np.ndarray | None = None,
    group_column: str | np.ndarray | None = None,
) -> Dataset:
    """A Hugging Face ``datasets.Dataset``: ``label`` column as labels, ``inputs`` columns as a dict
    batch (default: every other column that holds numbers)."""
    if label not in dataset.column_names:
        raise GGDAError(
            f"The Hugging Face dataset has no column '{label}' (it has {dataset.column_names}); pass label=..."
        )
    groups = dataset[group_column] if isinstance(group_column, str) else group_column
    if inputs is None:
        skip = {label, group_column} if isinstance(group_column, str) else {label}
        inputs = [
            c
            for c, f in dataset.features.items()
            if c not in skip and "string" not in repr(f) and "ClassLabel" not in type(f).__name__
        ]
        if not inputs:
            raise GGDAError("The Hugging Face dataset has no numeric input columns; tokenize it first.")
    y = np.asarray(dataset.with_format("numpy")[label])
    return _finish(HFInputs(dataset, inputs, collate_fn), y, kind, n_classes, name, ids, groups)


#: A float label with more distinct values than this (or any non-integer value) is a regression target.
MAX_FLOAT_CLASSES = 20


def infer_kind(labels) -> TaskKind:
    """``classification`` or ``regression`` from a label column's values.

    Booleans, strings/categories and integers are class labels; floats are a regression target
    when any value has a fractional part or they take more than ``MAX_FLOAT_CLASSES`` distinct
    values (a float-typed column of a few whole numbers, e.g. 0.0/1.0 read from a CSV with
    missing-value handling, stays classification). Why: a numeric target such as miles per gallon
    must not silently become a 127-class classification.
    """
    import pandas as pd

    series = labels if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels))
    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        return "classification"
    if pd.api.types.is_integer_dtype(series):
        return "classification"
    values = series.dropna().to_numpy(dtype=np.float64)
    if not np.all(values == np.round(values)) or len(np.unique(values)) > MAX_FLOAT_CLASSES:
        return "regression"
    return "classification"


def from_frame(
    frame,
    label: str,
    *,
    kind: TaskKind | None = None,
    categorical: Sequence[str] | None = None,
    group_column: str | None = None,
    name: str = "data",
) -> Dataset:
    """A pandas ``DataFrame`` (the CSV/Parquet loader's path): one-hot categoricals, numeric X.

    ``kind=None`` infers it from the label column (:func:`infer_kind`): integer, boolean and
    categorical/string labels are classes; float labels with fractional values or more than
    ``MAX_FLOAT_CLASSES`` distinct values are a regression target. The choice is recorded in
    ``dataset.meta["kind_inferred"]``; pass ``kind=`` to override it.
    """
    from ggda.data.files import frame_to_dataset

    inferred = kind is None and label in getattr(frame, "columns", ())
    if inferred:
        kind = infer_kind(frame[label])
    data = frame_to_dataset(
        frame, label=label, kind=kind, categorical=categorical, group_column=group_column, name=name
    )
    if inferred:
        data.meta["kind_inferred"] = data.kind
    return data


def as_dataset(data: Any, labels: Sequence | np.ndarray | None = None, **kwargs) -> Dataset:
    """Any supported data source as a ggda :class:`Dataset` (a ``Dataset`` is returned as is).

    ``(X, y)`` arrays, a ``DataLoader``, a map-style torch ``Dataset`` or a Hugging Face
    ``datasets.Dataset``; keyword options go to the matching adapter.
    """
    if isinstance(data, Dataset):
        return data
    if isinstance(data, tuple) and len(data) == 2 and labels is None:
        X, y = data
        return Dataset(np.asarray(X), np.asarray(y), **kwargs)
    if isinstance(data, np.ndarray):
        if labels is None:
            raise GGDAError("Arrays need labels: pass as_dataset(X, y) or (X, y).")
        return Dataset(data, np.asarray(labels), **kwargs)
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset

    if isinstance(data, DataLoader):
        return from_loader(data, labels, **kwargs)
    if type(data).__module__.startswith("datasets") and hasattr(data, "column_names"):
        return from_huggingface(data, **kwargs)
    if isinstance(data, TorchDataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return from_torch(data, labels, **kwargs)
    raise GGDAError(
        f"Cannot read training data of type {type(data).__name__}; pass (X, y) arrays, a torch Dataset, "
        "an unshuffled DataLoader or a Hugging Face datasets.Dataset."
    )
