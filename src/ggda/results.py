"""An attribution result on disk: what ``ggda attribute`` and ``ggda features score`` write, and
:func:`load_attribution`, which reads it back as a labelled table.

Layout of a result directory (format 2)::

    scores.npy    (T, K) float32 scores, row t = target t, column g = group g (positive = helpful)
    groups.npy    (n,) int64 group id of each training position (format 1, kept for old readers)
    members.csv   position, train_id, group, group_name: one row per training point, so every
                  member of every group is named by its data id
    targets.csv   target, target_id: the test data id behind each row of scores.npy (for a pooled
                  property such as mean-test-loss: every test id the one row averages over)
    top_k.csv     target, target_id, rank, group, group_name, score, size, train_ids: the most
                  helpful groups per target; ``train_ids`` lists *every* member's data id
                  (space-separated), whatever the group's size (members.csv has the same ids)
    bottom_k.csv  the same for the most harmful groups (``features score --bottom-k``)
    meta.json     method, property, options, grouping summary, shape, dtype, seconds, provenance
                  (ggda/torch/numpy/python versions, run path, command, UTC time)

``ggda features score`` without ``--full`` writes no ``scores.npy`` (it never holds the matrix);
everything else is the same. Directories written before format 2 (``scores.npy``, ``groups.npy``
and ``meta.json`` only) still load: their ids are training / test *positions*
(``AttributionResult.ids_recorded`` is ``False``).

Scores are saved as **float32** whatever the method computed in: every method starts from float32
model gradients, so digits beyond float32's ~7 significant ones are rounding noise of the
solver, not information; one dtype makes results of different methods comparable byte for byte
and halves the size of a (targets × groups) matrix. A score beyond float32's range is refused.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ggda.arrays import read_npy
from ggda.errors import GGDAError
from ggda.io import save_csv, save_npy, write_text

if TYPE_CHECKING:
    import pandas as pd

    from ggda.data.grouping import Grouping

__all__ = [
    "FORMAT",
    "SCORE_DTYPE",
    "AttributionResult",
    "load_attribution",
    "provenance",
    "save_attribution",
    "select_targets",
    "top_table",
]

#: the one dtype of every saved score matrix (see the module docstring for why)
SCORE_DTYPE = np.float32
#: version of the directory layout written by :func:`save_attribution`
FORMAT = 2
#: properties whose single score row pools every target (no per-target rows)
POOLED_PROPERTIES = ("mean-test-loss",)

_FIX = "rerun the `ggda attribute` command that wrote it."


def provenance(run: str | Path | None = None, command: str | None = None) -> dict:
    """What produced a result: package versions, the run directory, the command and the time (UTC)."""
    import torch

    import ggda

    return {
        "ggda": ggda.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "run": None if run is None else str(Path(run).resolve()),
        "command": command,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def select_targets(
    test_ids: np.ndarray, n: int | None = None, ids: str | list[int] | np.ndarray | None = None
) -> np.ndarray:
    """Test-set positions of the targets: those with data ``ids`` (``"3,17,42"`` or a list), in
    the order given, or else the first ``n`` test points (all when ``n`` is ``None``).

    An id that is not in the test set is refused by name: attributing a training point or a
    mistyped id would silently answer another question.
    """
    test_ids = np.asarray(test_ids)
    if ids is None:
        return np.arange(len(test_ids) if n is None else min(n, len(test_ids)))
    if isinstance(ids, str):
        try:
            wanted = [int(v) for v in ids.split(",") if v.strip()]
        except ValueError:
            raise GGDAError(
                f"--target-ids {ids} is not valid: write comma-separated integer data ids, e.g. 3,17,42."
            ) from None
    else:
        wanted = [int(v) for v in np.asarray(ids).ravel()]
    if not wanted:
        raise GGDAError("--target-ids: give at least one test data id, e.g. 3,17,42.")
    if len(set(wanted)) != len(wanted):
        raise GGDAError("--target-ids lists an id twice; give each test data id once.")
    where = {int(v): i for i, v in enumerate(test_ids)}
    unknown = [v for v in wanted if v not in where]
    if unknown:
        preview = ", ".join(map(str, sorted(where)[:5]))
        raise GGDAError(
            f"--target-ids: {', '.join(map(str, unknown[:5]))} {'is' if len(unknown) == 1 else 'are'} not "
            f"the data id of a test point of this run; choose among the {len(where)} test ids "
            f"(e.g. {preview}; see targets.csv of an earlier result)."
        )
    return np.array([where[v] for v in wanted], dtype=np.int64)


def as_score_dtype(scores: np.ndarray) -> np.ndarray:
    """``scores`` as :data:`SCORE_DTYPE`; a finite score that float32 cannot hold is refused."""
    arr = np.asarray(scores)
    out = arr.astype(SCORE_DTYPE)
    if np.isfinite(arr).all() and not np.isfinite(out).all():
        raise GGDAError(
            "Some scores exceed float32's range (~3.4e38); check the method's damping/options, the "
            "scores are not meaningful at that size."
        )
    return out


def _member_ids(grouping: Grouping, train_ids: np.ndarray) -> list[str]:
    """Every group's member data ids as one space-separated string per group."""
    return [" ".join(map(str, train_ids[m].tolist())) for m in grouping.member_lists()]


def top_table(
    indices: np.ndarray,
    values: np.ndarray,
    grouping: Grouping,
    train_ids: np.ndarray,
    target_ids: np.ndarray,
    names: list[str] | None = None,
) -> pd.DataFrame:
    """Rows (target, target_id, rank, group, group_name, score, size, train_ids) from per-target
    group indices (T, k) and their scores, best first; ``train_ids`` names every member."""
    import pandas as pd

    names = names if names is not None else grouping.group_names(train_ids)
    sizes = grouping.sizes
    members = _member_ids(grouping, np.asarray(train_ids))
    rows = [
        {
            "target": t,
            "target_id": int(target_ids[t]),
            "rank": rank,
            "group": int(g),
            "group_name": names[g],
            "score": float(values[t, rank - 1]),
            "size": int(sizes[g]),
            "train_ids": members[g],
        }
        for t in range(indices.shape[0])
        for rank, g in enumerate(indices[t], 1)
        if g >= 0
    ]
    columns = ["target", "target_id", "rank", "group", "group_name", "score", "size", "train_ids"]
    return pd.DataFrame(rows, columns=columns)


def _top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def save_attribution(
    out: str | Path,
    scores: np.ndarray | None,
    grouping: Grouping,
    train_ids: np.ndarray,
    target_ids: np.ndarray,
    method: str,
    options: dict | None = None,
    provenance: dict | None = None,
    *,
    prop: str = "test-loss",
    seconds: float | None = None,
    top_k: int = 10,
    top: tuple[np.ndarray, np.ndarray] | None = None,
    bottom: tuple[np.ndarray, np.ndarray] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write an attribution result directory (layout in the module docstring) and return it.

    Args:
        scores: (T, K) scores, saved as float32; ``None`` when the matrix was never held (then
            pass ``top``, as ``features score`` does).
        grouping: the K groups the columns are over (its ``names`` name the columns).
        train_ids: (n,) data ids of the training positions the grouping labels.
        target_ids: data ids of the test points behind the rows (for a pooled property,
            ``prop="mean-test-loss"``, every test id the single row averages over).
        method, options, provenance: recorded in ``meta.json`` (see :func:`provenance`).
        top_k: rows per target in ``top_k.csv`` (from ``scores``; 0 writes none).
        top / bottom: precomputed (indices, scores) of the most helpful / harmful groups.
        extra: further ``meta.json`` entries (e.g. the feature store's kernel).
    """
    out = Path(out)
    train_ids = np.asarray(train_ids).astype(np.int64)
    target_ids = np.asarray(target_ids).astype(np.int64)
    grouping.check_matches(len(train_ids), "the training id vector")
    pooled = prop in POOLED_PROPERTIES
    n_rows = 1 if pooled else len(target_ids)
    if scores is not None:
        scores = as_score_dtype(scores)
        if scores.shape != (n_rows, grouping.n_groups):
            raise GGDAError(
                f"Scores of shape {scores.shape} do not match {n_rows} targets x {grouping.n_groups} groups."
            )
    row_ids = np.full(1, -1, dtype=np.int64) if pooled else target_ids
    names = grouping.group_names(train_ids)
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    if scores is not None:
        save_npy(out / "scores.npy", scores)
    save_npy(out / "groups.npy", grouping.labels)
    save_csv(
        out / "members.csv",
        pd.DataFrame(
            {
                "position": np.arange(len(train_ids)),
                "train_id": train_ids,
                "group": grouping.labels,
                "group_name": np.asarray(names, dtype=object)[grouping.labels],
            }
        ),
    )
    save_csv(
        out / "targets.csv",
        pd.DataFrame({"target": np.zeros(len(target_ids), np.int64) if pooled else np.arange(len(target_ids)),
                      "target_id": target_ids}),
    )  # fmt: skip
    if top is None and scores is not None and top_k > 0:
        top = _top(scores, min(top_k, grouping.n_groups))
    for name, table in (("top_k", top), ("bottom_k", bottom)):
        if table is not None and table[0].shape[1] > 0:
            save_csv(out / f"{name}.csv", top_table(table[0], table[1], grouping, train_ids, row_ids, names))
        else:  # a table of an earlier result in this directory would describe other scores
            (out / f"{name}.csv").unlink(missing_ok=True)
    meta = {
        "format": FORMAT,
        "method": method,
        "property": prop,
        "seconds": seconds,
        "grouping": grouping.summary(),
        "shape": [n_rows, grouping.n_groups],
        "dtype": np.dtype(SCORE_DTYPE).name,
        "pooled": pooled,
        "options": options or {},
        "provenance": provenance or {},
        **(extra or {}),
    }
    write_text(out / "meta.json", json.dumps(meta, indent=2, default=_json_value))
    return out


def _json_value(obj: Any) -> Any:
    """JSON for what options hold besides plain values: paths, NumPy scalars/arrays, records such
    as checkpoints (their fields), anything else as its text."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return str(obj)


@dataclass
class AttributionResult:
    """A result directory read back by :func:`load_attribution`.

    Attributes:
        scores: (T, K) float32 scores as a DataFrame: index = target data id (``target_id``; a
            pooled property has the one row ``"mean"``, index name ``target``), one column per
            group, named by the group's name (column value, data id for singletons, else group id).
        groups: group name -> data ids of its members (every member).
        method, property, options, provenance: as recorded in ``meta.json``.
        grouping: the grouping summary (method, K, sizes, build time).
        labels: (n,) group id per training position; ``train_ids`` (n,) their data ids.
        target_ids: data ids of the targets (every pooled id for a pooled property).
        ids_recorded: ``False`` for a directory written before format 2 (ids are positions).
    """

    path: Path
    scores: pd.DataFrame
    groups: dict[str, np.ndarray]
    method: str
    property: str
    grouping: dict
    options: dict
    provenance: dict
    labels: np.ndarray
    train_ids: np.ndarray
    target_ids: np.ndarray
    group_names: list[str]
    ids_recorded: bool = True
    meta: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The directory's name (how evaluations label this ranking)."""
        return self.path.name

    @property
    def values(self) -> np.ndarray:
        """The (T, K) score matrix (float32)."""
        return self.scores.to_numpy()

    @property
    def pooled(self) -> bool:
        return self.property in POOLED_PROPERTIES

    def as_grouping(self) -> Grouping:
        """The grouping the columns are over (names kept)."""
        from ggda.data.grouping import Grouping

        return Grouping(self.labels, method=str(self.grouping.get("method", "given")), names=self.group_names)


def _read_meta(path: Path) -> dict:
    file = path / "meta.json"
    if not file.exists():
        return {}
    try:
        meta = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GGDAError(f"{file} is not valid JSON (truncated or overwritten); {_FIX}") from exc
    if not isinstance(meta, dict):
        raise GGDAError(f"{file} is not a JSON object; {_FIX}")
    return meta


def _read_csv(file: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    import pandas as pd

    try:
        frame = pd.read_csv(file, keep_default_na=False, dtype={"group_name": str})
    except Exception as exc:  # pandas parser errors of every kind
        raise GGDAError(f"{file} cannot be read (empty, truncated or corrupt); {_FIX}") from exc
    if not set(columns) <= set(frame.columns):
        raise GGDAError(f"{file} lacks columns {sorted(set(columns) - set(frame.columns))}; {_FIX}")
    return frame


def load_attribution(path: str | Path, n_train: int | None = None) -> AttributionResult:
    """Read a result directory of ``ggda attribute`` or ``ggda features score --full``.

    Every file is checked (readable, shapes that agree, finite scores) and named when it is not;
    ``n_train`` (the run's training-set size) is checked too when given.
    """
    import pandas as pd

    from ggda.data.grouping import Grouping

    path = Path(path)
    if not path.is_dir():
        raise GGDAError(f"{path} is not a directory; pass an output directory of `ggda attribute`.")
    if not (path / "scores.npy").exists():
        hint = " (`ggda features score` writes it with --full)" if (path / "members.csv").exists() else ""
        raise GGDAError(f"{path} has no scores.npy{hint}; pass an output directory of `ggda attribute`.")
    scores = read_npy(path / "scores.npy", _FIX)
    meta = _read_meta(path)
    members = None
    where = path / "groups.npy"
    try:
        labels = read_npy(where, _FIX) if where.exists() else None  # every file present is checked
        if (path / "members.csv").exists():
            where = path / "members.csv"
            members = _read_csv(where, ("train_id", "group", "group_name"))
            if "position" in members.columns:
                members = members.sort_values("position", kind="stable")
            grouping = Grouping(members["group"].to_numpy())
            if labels is not None and not np.array_equal(np.asarray(labels), grouping.labels):
                raise GGDAError(f"{path / 'groups.npy'} and {where} disagree on the groups; {_FIX}")
        elif labels is not None:
            grouping = Grouping(labels)
        elif n_train is not None:
            grouping = Grouping.singleton(n_train)
        elif scores.ndim == 2:
            grouping = Grouping.singleton(scores.shape[1])
        else:
            raise GGDAError(f"{path / 'scores.npy'} is not a (targets, groups) matrix; {_FIX}")
        if n_train is not None:
            grouping.check_matches(n_train, "the run's training set")
    except GGDAError as exc:
        raise GGDAError(str(exc) if where.name in str(exc) else f"{where}: {exc}") from exc
    if scores.ndim != 2 or scores.shape[1] != grouping.n_groups or not np.issubdtype(scores.dtype, np.number):
        raise GGDAError(
            f"{path / 'scores.npy'} has shape {scores.shape} ({scores.dtype}), not (targets, "
            f"{grouping.n_groups} groups); {_FIX}"
        )
    if not np.isfinite(scores).all():
        raise GGDAError(f"{path / 'scores.npy'} contains NaN or inf scores; {_FIX}")
    scores = scores.astype(SCORE_DTYPE, copy=False)
    recorded = members is not None
    if recorded:
        train_ids = members["train_id"].to_numpy(np.int64)
        names_by_group = members.drop_duplicates("group").set_index("group")["group_name"]
        names = [str(names_by_group[g]) for g in range(grouping.n_groups)]
    else:
        train_ids = np.arange(len(grouping), dtype=np.int64)
        names = grouping.group_names(train_ids)
    prop = str(meta.get("property", "test-loss"))
    pooled = prop in POOLED_PROPERTIES
    if (path / "targets.csv").exists():
        target_ids = _read_csv(path / "targets.csv", ("target_id",))["target_id"].to_numpy(np.int64)
    else:
        target_ids = np.arange(scores.shape[0], dtype=np.int64)
    if pooled:
        index = pd.Index(["mean"] * scores.shape[0], name="target")
    else:
        if len(target_ids) != scores.shape[0]:
            raise GGDAError(
                f"{path / 'targets.csv'} names {len(target_ids)} targets, scores.npy has {scores.shape[0]}; {_FIX}"
            )
        index = pd.Index(target_ids, name="target_id")
    frame = pd.DataFrame(scores, index=index, columns=pd.Index(names, name="group"), copy=False)
    groups = {names[g]: train_ids[m] for g, m in enumerate(grouping.member_lists())}
    return AttributionResult(
        path=path,
        scores=frame,
        groups=groups,
        method=str(meta.get("method", path.name)),
        property=prop,
        grouping=meta.get("grouping", grouping.summary()),
        options=meta.get("options", {}),
        provenance=meta.get("provenance", {}),
        labels=grouping.labels,
        train_ids=train_ids,
        target_ids=target_ids,
        group_names=names,
        ids_recorded=recorded,
        meta=meta,
    )
