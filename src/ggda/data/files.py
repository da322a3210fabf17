"""Loaders for users' own files: CSV, Parquet and NumPy ``.npz``.

Tabular files name their label column; non-numeric columns (and any listed as categorical) are
one-hot encoded; an optional ``group_column`` is kept aside as user-given groups (one group per
data source or contributor) instead of becoming a feature.

Ingestion refuses, with one :class:`GGDAError` line naming the file and the column, what would
otherwise train silently on something else than the user meant:

* an empty, binary, truncated or unreadable file;
* duplicate column names (a second copy of the label would leak it into the features), and a
  feature column equal to the label on every row;
* a mostly numeric column with a few stray strings ("abc" in a numeric column would otherwise
  one-hot encode every distinct number into its own feature); list the column as categorical to
  encode it on purpose;
* a classification label with fewer than two classes, or with non-integer numbers; a regression
  label that is not numeric.
"""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from ggda.data.dataset import Dataset, TaskKind
from ggda.errors import GGDAError

#: A non-numeric column at least this fraction of whose values parse as numbers is a numeric
#: column with stray strings, not a categorical one.
NUMERIC_FRACTION = 0.5


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
    if path.is_dir():
        raise GGDAError(f"{path} is a directory; pass a .csv, .parquet or .npz file.")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq", ".npz"):
        raise GGDAError(f"Unsupported file type '{suffix}'; use .csv, .parquet or .npz.")
    if path.stat().st_size == 0:
        raise GGDAError(f"{path} is empty (0 bytes); pass a complete {suffix} file.")
    if suffix == ".npz":
        return _load_npz(path, kind)
    frame = _read_csv(path) if suffix == ".csv" else _read_parquet(path)
    return frame_to_dataset(
        frame, label, categorical, group_column, id_column, kind, name=path.stem, source=str(path)
    )


def _read_csv(path: Path) -> pd.DataFrame:
    with path.open("rb") as fh:
        head = fh.read(8192)
    if b"\x00" in head:
        raise GGDAError(f"{path} is not a text CSV file (it holds binary data); pass a CSV file.")
    try:
        header = pd.read_csv(path, nrows=1, header=None, dtype=str, encoding="utf-8")
        frame = pd.read_csv(path, encoding="utf-8")
    except pd.errors.EmptyDataError as exc:
        raise GGDAError(f"{path} has no header row or no data; pass a CSV file with both.") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise GGDAError(
            f"{path} cannot be read as CSV ({reason}); check that it is complete, UTF-8 and has the same "
            "number of fields on every row."
        ) from exc
    _check_names(path, [str(c) for c in header.iloc[0].tolist()] if len(header) else list(frame.columns))
    return frame


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        import pyarrow.parquet as pq

        schema_names = list(pq.read_schema(path).names)
    except ImportError:
        schema_names = None
    except Exception as exc:  # pyarrow's ArrowInvalid/OSError for truncated or foreign files
        raise GGDAError(
            f"{path} is not a readable Parquet file (truncated or not Parquet: {' '.join(str(exc).split())[:120]}); "
            "pass a complete .parquet file."
        ) from exc
    if schema_names is not None:
        _check_names(path, [n for n in schema_names if not n.startswith("__index_level_")])
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:
        raise GGDAError(
            f"{path} is not a readable Parquet file ({' '.join(str(exc).split())[:160]}); pass a complete "
            ".parquet file."
        ) from exc
    _check_names(path, [str(c) for c in frame.columns])
    return frame


def _check_names(path: Path | str, names: list[str]) -> None:
    dup = [n for n, k in Counter(names).items() if k > 1]
    if dup:
        raise GGDAError(
            f"{path} has duplicate column names {dup[:3]}; rename or drop the copies (a second label column "
            "would leak the label into the features)."
        )


def frame_to_dataset(
    frame: pd.DataFrame,
    label: str | None,
    categorical: list[str] | None = None,
    group_column: str | None = None,
    id_column: str | None = None,
    kind: TaskKind | None = "classification",
    name: str = "data",
    source: str | None = None,
) -> Dataset:
    """Turn a data frame into a :class:`Dataset` (label encoding + one-hot features).

    ``source`` (the file the frame came from) names it in error messages; default ``name``.
    """
    kind = kind or "classification"
    dataset_name = name
    name = source or name  # error messages name the file the frame came from
    if label is None:
        raise GGDAError(
            f"Name the label column of '{name}' (--label COLUMN); columns: {list(frame.columns)}."
        )
    _check_names(name, [str(c) for c in frame.columns])
    frame = frame.rename(columns=str)
    label = str(label)
    for col, what in ((label, "label"), (group_column, "group"), (id_column, "id")):
        if col is not None and col not in frame.columns:
            raise GGDAError(
                f"{what.capitalize()} column '{col}' is not in '{name}'; choose one of {list(frame.columns)}."
            )
    if len(frame) == 0:
        raise GGDAError(f"'{name}' has a header but no data rows; pass a file with data.")
    y_raw = frame[label]
    if y_raw.isna().any():
        row = int(np.flatnonzero(y_raw.isna().to_numpy())[0])
        raise GGDAError(
            f"Label column '{label}' of '{name}' has missing values (first in data row {row}); drop those rows "
            "first (or is the file truncated?)."
        )
    y, classes = _encode_label(y_raw, label, name, kind)
    drop = [c for c in (label, group_column, id_column) if c is not None]
    features = frame.drop(columns=drop)
    if features.shape[1] == 0:
        raise GGDAError(f"'{name}' has no feature columns besides '{label}'; add feature columns.")
    unknown = [c for c in (categorical or []) if c not in features.columns]
    if unknown:
        raise GGDAError(
            f"Categorical column(s) {unknown} are not feature columns of '{name}'; choose from "
            f"{list(features.columns)}."
        )
    cat = set(categorical or [])
    for col in features.columns:
        if col not in cat and not pd.api.types.is_numeric_dtype(features[col]):
            _check_not_stray(features[col], col, name)
            cat.add(col)
        elif pd.api.types.is_bool_dtype(features[col]):
            features[col] = features[col].astype(np.float32)
    _check_no_leak(features, cat, y_raw, label, name)
    if cat:
        features = pd.get_dummies(features, columns=sorted(cat), dtype=np.float32)
    groups = None
    if group_column is not None:
        groups = pd.factorize(frame[group_column], sort=True)[0]
        if (groups < 0).any():
            raise GGDAError(f"Group column '{group_column}' of '{name}' has missing values; fill them first.")
    ids = None
    if id_column is not None:
        raw = pd.to_numeric(frame[id_column], errors="coerce")
        if raw.isna().any() or not np.all(raw == np.round(raw)):
            raise GGDAError(f"Id column '{id_column}' of '{name}' must hold integers on every row.")
        ids = raw.to_numpy(np.int64)
    return Dataset(
        X=features.to_numpy(np.float32),
        y=y,
        ids=ids,
        name=dataset_name,
        kind=kind,
        feature_names=[str(c) for c in features.columns],
        group_column=groups,
        meta={"classes": classes} if classes is not None else {},
    )


def _encode_label(y_raw: pd.Series, label: str, name: str, kind: str) -> tuple[np.ndarray, list | None]:
    if kind != "classification":
        y = pd.to_numeric(y_raw, errors="coerce")
        if y.isna().any():
            bad = y_raw[y.isna()].iloc[0]
            raise GGDAError(
                f"Regression label '{label}' of '{name}' has a non-numeric value ({bad!r}); fix it, or "
                "train a classifier instead."
            )
        y = y.to_numpy(np.float32)
        if not np.isfinite(y).all():
            raise GGDAError(f"Regression label '{label}' of '{name}' has inf or out-of-range values.")
        return y, None
    if pd.api.types.is_float_dtype(y_raw) and not np.all(y_raw == np.round(y_raw)):
        raise GGDAError(
            f"Label column '{label}' of '{name}' holds non-integer numbers; classification needs class "
            "labels (use --regression for a numeric target)."
        )
    if pd.api.types.is_bool_dtype(y_raw):
        y_raw = y_raw.astype(np.int64)
    if pd.api.types.is_numeric_dtype(y_raw) and (y_raw >= 0).all() and np.all(y_raw == np.round(y_raw)):
        y = y_raw.to_numpy(np.int64)
        classes: list = sorted(set(y.tolist()))
        if classes != list(range(len(classes))):
            codes, uniq = pd.factorize(y_raw, sort=True)
            y, classes = codes.astype(np.int64), [_plain(u) for u in uniq]
    else:
        codes, uniq = pd.factorize(y_raw, sort=True)
        y, classes = codes.astype(np.int64), [str(u) for u in uniq]
    if len(classes) < 2:
        raise GGDAError(
            f"Label column '{label}' of '{name}' has a single class ({classes[0]!r}); classification needs "
            "at least two (use --regression for a numeric target)."
        )
    return y, classes


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _check_not_stray(col: pd.Series, column: str, name: str) -> None:
    """Refuse a column that is numeric but for a few stray strings."""
    present = col.dropna()
    if present.empty:
        return
    numeric = pd.to_numeric(present.astype(str).str.strip(), errors="coerce")
    ok = numeric.notna()
    if ok.all():  # e.g. numbers stored as text (a Parquet string column): numeric, not categorical
        raise GGDAError(
            f"Column '{column}' of '{name}' holds numbers stored as text; convert it to a numeric type, or "
            f"list it with --categorical {column} to encode it as categories."
        )
    if ok.mean() >= NUMERIC_FRACTION:
        bad = present[~ok]
        raise GGDAError(
            f"Column '{column}' of '{name}' is numeric except for {len(bad)} value(s) such as {str(bad.iloc[0])!r} "
            f"(row {bad.index[0]}); fix or drop them, or list it with --categorical {column} to encode it as "
            "categories."
        )


def _check_no_leak(features: pd.DataFrame, cat: set, y_raw: pd.Series, label: str, name: str) -> None:
    """Refuse a feature column that equals the label on every row (a copy of the label)."""
    for col in features.columns:
        f = features[col]
        same = False
        if col in cat or not pd.api.types.is_numeric_dtype(f):
            same = f.astype(str).reset_index(drop=True).equals(y_raw.astype(str).reset_index(drop=True))
        elif pd.api.types.is_numeric_dtype(y_raw):
            same = bool(np.array_equal(f.to_numpy(np.float64), y_raw.to_numpy(np.float64)))
        if same and y_raw.nunique() > 1:
            raise GGDAError(
                f"Feature column '{col}' of '{name}' equals the label column '{label}' on every row (it would "
                "leak the label); drop it."
            )


def _load_npz(path: Path, kind: TaskKind) -> Dataset:
    fix = "write it with np.savez(path, X=X, y=y)."
    if not zipfile.is_zipfile(path):
        raise GGDAError(f"{path} is not a .npz archive (truncated, corrupt or another format); {fix}")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "X" not in arrays or "y" not in arrays:
                raise GGDAError(
                    f"{path} must hold arrays named 'X' and 'y' (np.savez(path, X=X, y=y)); found {list(arrays)}."
                )
            X, y = arrays["X"], arrays["y"]
            ids = arrays["ids"] if "ids" in arrays else None
            groups = arrays["groups"] if "groups" in arrays else None
    except GGDAError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise GGDAError(
                f"{path} holds Python objects (object arrays), which ggda does not unpickle; save numeric "
                f"arrays only: {fix}"
            ) from exc
        raise GGDAError(f"{path} is not a readable .npz file (truncated or corrupt); {fix}") from exc
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise GGDAError(f"{path} is not a readable .npz file (truncated or corrupt); {fix}") from exc
    if X.size == 0 or len(X) == 0:
        raise GGDAError(f"{path} holds no examples (X has shape {X.shape}); {fix}")
    if ids is not None and (ids.shape != (len(X),) or ids.dtype.kind not in "iu"):
        raise GGDAError(f"{path}: 'ids' must be one integer per row of X; got {ids.shape} {ids.dtype}.")
    if groups is not None and groups.shape != (len(X),):
        raise GGDAError(f"{path}: 'groups' must be one group id per row of X; got shape {groups.shape}.")
    ds = Dataset(X=X, y=y, ids=ids, name=path.stem, kind=kind, group_column=groups)
    if kind == "classification" and (ds.n_classes or 0) < 2:
        raise GGDAError(
            f"{path} has a single class in y; classification needs at least two (use --regression for a "
            "numeric target)."
        )
    return ds
