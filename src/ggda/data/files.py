"""Loaders for users' own files: CSV, Parquet and NumPy ``.npz``.

Tabular files name their label column; non-numeric columns (and any listed as categorical) are
one-hot encoded; an optional ``group_column`` is kept aside as user-given groups (one group per
data source or contributor) instead of becoming a feature.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ggda.data.dataset import Dataset, TaskKind
from ggda.errors import GGDAError


def load_file(
    path: str | Path,
    label: str | None = None,
    categorical: list[str] | None = None,
    group_column: str | None = None,
    id_column: str | None = None,
    kind: TaskKind = "classification",
) -> Dataset:
    """Load a CSV, Parquet or ``.npz`` file as a :class:`Dataset`.

    Args:
        path: ``.csv``, ``.parquet``/``.pq`` or ``.npz`` (arrays ``X`` and ``y``, optional ``ids``).
        label: label column name (required for CSV/Parquet).
        categorical: extra columns to one-hot encode (non-numeric columns always are).
        group_column: column holding a user-given group per row; kept out of the features.
        id_column: column of stable integer ids; kept out of the features.
        kind: ``classification`` (labels are encoded to 0..C-1) or ``regression``.
    """
    path = Path(path)
    if not path.exists():
        raise GGDAError(f"File {path} does not exist; check the path.")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path, kind)
    if suffix == ".csv":
        frame = pd.read_csv(path)
    elif suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    else:
        raise GGDAError(f"Unsupported file type '{suffix}'; use .csv, .parquet or .npz.")
    return frame_to_dataset(frame, label, categorical, group_column, id_column, kind, name=path.stem)


def frame_to_dataset(
    frame: pd.DataFrame,
    label: str | None,
    categorical: list[str] | None = None,
    group_column: str | None = None,
    id_column: str | None = None,
    kind: TaskKind = "classification",
    name: str = "data",
) -> Dataset:
    """Turn a data frame into a :class:`Dataset` (label encoding + one-hot features)."""
    if label is None:
        raise GGDAError(
            f"Name the label column of '{name}' (--label COLUMN); columns: {list(frame.columns)}."
        )
    for col, what in ((label, "label"), (group_column, "group"), (id_column, "id")):
        if col is not None and col not in frame.columns:
            raise GGDAError(
                f"{what.capitalize()} column '{col}' is not in '{name}'; choose one of {list(frame.columns)}."
            )
    if frame[label].isna().any():
        raise GGDAError(f"Label column '{label}' has missing values; drop those rows first.")
    y_raw = frame[label]
    classes: list | None = None
    if kind == "classification":
        if pd.api.types.is_integer_dtype(y_raw) and y_raw.min() >= 0:
            y = y_raw.to_numpy(np.int64)
            classes = sorted(set(y.tolist()))
            if classes != list(range(len(classes))):
                codes, uniq = pd.factorize(y_raw, sort=True)
                y, classes = codes.astype(np.int64), list(uniq)
        else:
            codes, uniq = pd.factorize(y_raw, sort=True)
            y, classes = codes.astype(np.int64), [str(u) for u in uniq]
    else:
        y = pd.to_numeric(y_raw, errors="coerce").to_numpy(np.float32)
    drop = [c for c in (label, group_column, id_column) if c is not None]
    features = frame.drop(columns=drop)
    cat = set(categorical or [])
    cat |= {c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])}
    if cat:
        features = pd.get_dummies(features, columns=sorted(cat), dtype=np.float32)
    groups = None
    if group_column is not None:
        groups = pd.factorize(frame[group_column], sort=True)[0]
    ids = frame[id_column].to_numpy(np.int64) if id_column is not None else None
    return Dataset(
        X=features.to_numpy(np.float32),
        y=y,
        ids=ids,
        name=name,
        kind=kind,
        feature_names=[str(c) for c in features.columns],
        group_column=groups,
        meta={"classes": classes} if classes is not None else {},
    )


def _load_npz(path: Path, kind: TaskKind) -> Dataset:
    with np.load(path, allow_pickle=False) as arrays:
        if "X" not in arrays or "y" not in arrays:
            raise GGDAError(
                f"{path} must hold arrays named 'X' and 'y' (np.savez(path, X=X, y=y)); found {list(arrays)}."
            )
        X, y = arrays["X"], arrays["y"]
        ids = arrays["ids"] if "ids" in arrays else None
        groups = arrays["groups"] if "groups" in arrays else None
    return Dataset(X=X, y=y, ids=ids, name=path.stem, kind=kind, group_column=groups)
