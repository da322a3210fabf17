"""Loaders for users' own files: CSV/TSV (plain or ``.gz``/``.bz2``/``.xz``/``.zip``), Parquet
and NumPy ``.npz``.

Tabular files name their label column; non-numeric columns (and any listed as categorical) are
one-hot encoded; an optional ``group_column`` is kept aside as user-given groups (one group per
data source or contributor; their original values kept as ``Dataset.group_names``) and an optional
``id_column`` gives the rows' data ids, instead of becoming features.

With ``kind="auto"`` the label decides the task (:func:`infer_label_kind`): a numeric label with
non-integer values, or with many distinct values, is a regression target (a float ``mpg`` column
is not 127 classes); strings, booleans and a few integers are classes.

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

import bz2
import gzip
import lzma
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ggda.data.dataset import Dataset, TaskKind
from ggda.errors import GGDAError

#: A non-numeric column at least this fraction of whose values parse as numbers is a numeric
#: column with stray strings, not a categorical one.
NUMERIC_FRACTION = 0.5

#: ``kind="auto"``: an integer-valued numeric label is class ids unless it has more than
#: ``AUTO_MAX_CLASSES`` distinct values *and* more than ``AUTO_CLASS_FRACTION`` of the rows
#: (then it is a quantity: a float column becomes a regression target, an integer one is refused
#: as ambiguous). A label with any non-integer value is always a regression target.
AUTO_MAX_CLASSES = 20
AUTO_CLASS_FRACTION = 0.05
#: A classification with more classes than this and fewer rows per class than
#: ``MIN_ROWS_PER_CLASS`` cannot be learnt (or tested); it is refused, naming --regression.
MAX_SPARSE_CLASSES = 100
MIN_ROWS_PER_CLASS = 5

LabelKind = Literal["classification", "regression", "auto"]

#: Plain-text table suffixes, the compressions pandas reads them through, and the other formats.
TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zip")
OTHER_SUFFIXES = (".parquet", ".pq", ".npz")
ACCEPTED = ".csv or .tsv (optionally .gz, .bz2, .xz or .zip compressed), .parquet/.pq or .npz"
_DECOMPRESS_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, zipfile.BadZipFile)


def file_format(path: str | Path) -> tuple[str, str | None] | None:
    """``(suffix, compression)`` of a data file ggda reads, e.g. ``(".csv", ".gz")`` for
    ``x.csv.gz`` or ``(".parquet", None)``; ``None`` for any other name."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if not suffixes:
        return None
    if suffixes[-1] in TEXT_SUFFIXES or suffixes[-1] in OTHER_SUFFIXES:
        return suffixes[-1], None
    if suffixes[-1] in COMPRESSIONS and len(suffixes) >= 2 and suffixes[-2] in TEXT_SUFFIXES:
        return suffixes[-2], suffixes[-1]
    return None


def data_stem(path: str | Path) -> str:
    """The file name without its format suffixes (``auto-mpg`` for ``auto-mpg.csv.gz``)."""
    path = Path(path)
    fmt = file_format(path)
    if fmt is None:
        return path.stem
    n = sum(len(s) for s in fmt if s)
    return path.name[:-n] or path.name


def load_file(
    path: str | Path,
    label: str | None = None,
    categorical: list[str] | None = None,
    group_column: str | None = None,
    id_column: str | None = None,
    kind: LabelKind = "classification",
) -> Dataset:
    """Load a CSV/TSV (plain or compressed), Parquet or ``.npz`` file as a :class:`Dataset`.

    Args:
        path: ``.csv``/``.tsv`` (optionally ``.gz``, ``.bz2``, ``.xz``, ``.zip``),
            ``.parquet``/``.pq`` or ``.npz`` (arrays ``X`` and ``y``, optional ``ids``, ``groups``
            and ``group_names``).
        label: label column name (required for CSV/Parquet).
        categorical: extra columns to one-hot encode (non-numeric columns always are).
        group_column: column holding a user-given group per row; kept out of the features, its
            values kept as ``Dataset.group_names``.
        id_column: column of unique integer ids (the rows' data ids); kept out of the features.
        kind: ``classification`` (labels are encoded to 0..C-1), ``regression``, or ``auto``
            (decided from the label by :func:`infer_label_kind`; the reason is in
            ``meta["kind_notice"]``).
    """
    path = Path(path)
    if not path.exists():
        raise GGDAError(f"File {path} does not exist; check the path.")
    if path.is_dir():
        raise GGDAError(f"{path} is a directory; pass a file: {ACCEPTED}.")
    fmt = file_format(path)
    if fmt is None:
        shown = "".join(path.suffixes[-2:]) or "(none)"
        raise GGDAError(f"Unsupported file type '{shown}' of {path}; use {ACCEPTED}.")
    suffix, compression = fmt
    if path.stat().st_size == 0:
        raise GGDAError(f"{path} is empty (0 bytes); pass a complete {suffix}{compression or ''} file.")
    if suffix == ".npz":
        return _load_npz(path, kind)
    if suffix in TEXT_SUFFIXES:
        frame = _read_csv(path, TEXT_SUFFIXES[suffix], compression)
    else:
        frame = _read_parquet(path)
    return frame_to_dataset(
        frame, label, categorical, group_column, id_column, kind, name=data_stem(path), source=str(path)
    )


def _text_head(path: Path, compression: str | None, size: int = 8192) -> bytes:
    """The first ``size`` bytes of the (decompressed) text, to refuse binary data early."""
    what = f"a readable {compression} archive" if compression else "readable"
    try:
        if compression == ".zip":
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.namelist() if not m.endswith("/")]
                if len(members) != 1:
                    raise GGDAError(
                        f"{path} holds {len(members)} files; a .zip data file must hold exactly one CSV/TSV."
                    )
                with zf.open(members[0]) as fh:
                    return fh.read(size)
        opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(compression or "", open)
        with opener(path, "rb") as fh:
            return fh.read(size)
    except _DECOMPRESS_ERRORS as exc:
        raise GGDAError(
            f"{path} is not {what} (truncated or another format: {' '.join(str(exc).split())[:100]}); "
            "pass a complete file."
        ) from exc


def _read_csv(path: Path, sep: str = ",", compression: str | None = None) -> pd.DataFrame:
    head = _text_head(path, compression)
    kind = "TSV" if sep == "\t" else "CSV"
    if b"\x00" in head:
        raise GGDAError(f"{path} is not a text {kind} file (it holds binary data); pass a {kind} file.")
    try:
        header = pd.read_csv(path, nrows=1, header=None, dtype=str, encoding="utf-8", sep=sep)
        frame = pd.read_csv(path, encoding="utf-8", sep=sep)
    except pd.errors.EmptyDataError as exc:
        raise GGDAError(f"{path} has no header row or no data; pass a {kind} file with both.") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, *_DECOMPRESS_ERRORS) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise GGDAError(
            f"{path} cannot be read as {kind} ({reason}); check that it is complete, UTF-8 and has the same "
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
    kind: LabelKind | None = "classification",
    name: str = "data",
    source: str | None = None,
) -> Dataset:
    """Turn a data frame into a :class:`Dataset` (label encoding + one-hot features).

    ``source`` (the file the frame came from) names it in error messages; default ``name``.
    ``kind="auto"`` decides classification or regression from the label
    (:func:`infer_label_kind`) and records why in ``meta["kind_notice"]``.
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
            if _header_looks_like_data(frame.columns):
                raise GGDAError(
                    f"{what.capitalize()} column '{col}' is not in '{name}', whose first row looks like "
                    f"data, not column names ({list(frame.columns)[:4]}...); add a header row naming "
                    "the columns (e.g. pandas: read_csv(path, header=None, names=[...]).to_csv(new, index=False))."
                )
            raise GGDAError(
                f"{what.capitalize()} column '{col}' is not in '{name}'; choose one of {list(frame.columns)}."
            )
    if id_column is not None and id_column in (label, group_column):
        raise GGDAError(
            f"Id column '{id_column}' is also the label or group column; pick another --id-column."
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
    meta: dict = {}
    if kind == "auto":
        kind, notice = infer_label_kind(y_raw, label, name)
        if notice:
            meta["kind_notice"] = notice
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
    groups, group_names = None, None
    if group_column is not None:
        codes, uniques = pd.factorize(frame[group_column], sort=True)
        if (codes < 0).any():
            raise GGDAError(f"Group column '{group_column}' of '{name}' has missing values; fill them first.")
        groups, group_names = codes, group_value_names(uniques)
    ids = None if id_column is None else _read_ids(frame[id_column], id_column, name)
    if classes is not None:
        meta["classes"] = classes
    return Dataset(
        X=features.to_numpy(np.float32),
        y=y,
        ids=ids,
        name=dataset_name,
        kind=kind,
        feature_names=[str(c) for c in features.columns],
        group_column=groups,
        meta=meta,
        group_names=group_names,
    )


def group_value_names(values) -> np.ndarray:
    """The original values of a group column as strings (index = factorised group id): a float
    column of whole numbers (``70.0``) reads as ``70``, as it was written."""
    values = pd.Index(values)
    if (
        pd.api.types.is_float_dtype(values)
        and np.all(np.isfinite(values))
        and np.all(values == np.round(values))
    ):
        values = values.astype(np.int64)
    return np.asarray([str(_plain(v)) for v in values], dtype=str)


def _read_ids(col: pd.Series, id_column: str, name: str) -> np.ndarray:
    """The rows' data ids from ``id_column``: integers, present and unique on every row."""
    fix = f"give every row a distinct integer in '{id_column}', or drop --id-column to number rows 0..n-1"
    if col.isna().any():
        row = int(np.flatnonzero(col.isna().to_numpy())[0])
        raise GGDAError(
            f"Id column '{id_column}' of '{name}' has missing ids (first in data row {row}); {fix}."
        )
    raw = pd.to_numeric(col, errors="coerce")
    if raw.isna().any() or not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
        bad = col[raw.isna() | (raw != np.round(raw))].iloc[0]
        raise GGDAError(f"Id column '{id_column}' of '{name}' holds a non-integer id ({bad!r}); {fix}.")
    if (raw.abs() >= 2**63).any():
        raise GGDAError(f"Id column '{id_column}' of '{name}' holds ids beyond 64-bit integers; {fix}.")
    ids = raw.to_numpy(np.int64)
    dup = pd.Series(ids).duplicated()
    if dup.any():
        raise GGDAError(
            f"Id column '{id_column}' of '{name}' repeats id {int(ids[dup.to_numpy()][0])} "
            f"({int(dup.sum())} duplicate(s)); {fix}."
        )
    return ids


def infer_label_kind(
    y_raw: pd.Series | np.ndarray, label: str = "y", name: str = "data"
) -> tuple[TaskKind, str | None]:
    """Classification or regression, decided from the label values, and a one-line notice
    (``None`` when the label is plainly class labels).

    Rule: strings, categories and booleans are classes. A numeric label with any non-integer
    value is a regression target. An integer-valued label is classes unless it has more than
    :data:`AUTO_MAX_CLASSES` distinct values and more than :data:`AUTO_CLASS_FRACTION` of the
    rows; then a float column (``18.0, 15.0, ...``) is a regression target and an integer column
    is ambiguous (class ids or counts?) and refused, asking for ``--classification`` or
    ``--regression``. An explicit flag always decides instead.
    """
    y = pd.Series(y_raw)
    if pd.api.types.is_bool_dtype(y) or not pd.api.types.is_numeric_dtype(y):
        return "classification", None
    values = y.to_numpy(np.float64)
    distinct = int(pd.Series(values).nunique())
    finite = np.isfinite(values)
    whole = bool(finite.all() and np.all(values == np.round(values)))
    override = "pass --classification to train a classifier instead"
    if not whole:
        return "regression", (
            f"label '{label}' holds {distinct} distinct numbers, not all whole: training a regression "
            f"(squared error, standardised target); {override}."
        )
    many = distinct > AUTO_MAX_CLASSES and distinct > AUTO_CLASS_FRACTION * len(values)
    if not many:
        return "classification", None
    if pd.api.types.is_float_dtype(y):
        return "regression", (
            f"label '{label}' holds {distinct} distinct numbers in {len(values)} rows: training a "
            f"regression (squared error, standardised target); {override}."
        )
    raise GGDAError(
        f"Label column '{label}' of '{name}' holds {distinct} distinct integers in {len(values)} rows: "
        "class ids or a numeric target? Pass --classification or --regression."
    )


def _encode_label(y_raw: pd.Series, label: str, name: str, kind: str) -> tuple[np.ndarray, list | None]:
    if kind not in ("classification", "regression"):
        raise GGDAError(f"Unknown task kind '{kind}'; use classification, regression or auto.")
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
    per_class = len(y) / len(classes)
    if len(classes) > MAX_SPARSE_CLASSES and per_class < MIN_ROWS_PER_CLASS:
        raise GGDAError(
            f"Label column '{label}' of '{name}' has {len(classes)} classes in {len(y)} rows "
            f"({per_class:.1f} rows per class): too few to learn or test a classifier; train with "
            "--regression for a numeric target, or merge rare classes."
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


def _load_npz(path: Path, kind: LabelKind) -> Dataset:
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
            group_names = arrays["group_names"] if "group_names" in arrays else None
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
    meta: dict = {}
    if kind == "auto":
        if y.ndim != 1:
            raise GGDAError(f"{path}: 'y' must be one label per row of X; got shape {y.shape}.")
        kind, notice = infer_label_kind(y, "y", str(path))
        if notice:
            meta["kind_notice"] = notice
    if group_names is not None:
        if groups is None or group_names.dtype.kind not in "UiuO" or group_names.ndim != 1:
            raise GGDAError(
                f"{path}: 'group_names' needs 'groups' and must be one string per group id; got "
                f"{group_names.shape} {group_names.dtype}."
            )
        group_names = group_names.astype(str)
    ds = Dataset(
        X=X, y=y, ids=ids, name=path.stem, kind=kind, group_column=groups, meta=meta, group_names=group_names
    )
    if kind == "classification" and (ds.n_classes or 0) < 2:
        raise GGDAError(
            f"{path} has a single class in y; classification needs at least two (use --regression for a "
            "numeric target)."
        )
    return ds


def _header_looks_like_data(columns) -> bool:
    """Whether most column names are numbers: a file without a header row, whose first data row
    pandas took for names (the Auto-MPG file shipped in mlxtend is one)."""
    names = [str(c) for c in columns]

    def number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    return len(names) > 1 and sum(number(c) for c in names) >= max(2, len(names) // 2 + 1)
