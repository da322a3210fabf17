"""``ggda evaluate retraining|prune|lds|noisy``: rankings from result directories or methods
computed here, the retrainer, the evaluation, and its output files with the data ids it concerns.

The metrics themselves live in :mod:`ggda.evaluate`; this module wires a run, attribution results
(:func:`ggda.results.load_attribution`) and methods to them, so the command line only parses,
calls one function and prints. All retrains go to one shared store, ``RUN/evaluations/retrains``
by default, so evaluations resume and share identical retrains.

Besides the metric table (``NAME.csv`` / ``NAME.json``) every evaluation writes the ids it
concerns, so a number can be traced back to data:

* retraining / prune: ``removed.csv`` — label, fraction, seed, n_removed, train_ids (the data
  ids removed for each ranking and fraction; the random baseline per seed);
* lds: ``lds_targets.csv`` — label, target_id, lds (the per-target rank correlation);
* noisy: ``flagged.csv`` — label, rank, train_id, flipped (the most suspicious 20 % per ranking).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.evaluate.noisy_labels import FOUND_AT
from ggda.io import save_csv, write_text
from ggda.options import check_method
from ggda.results import load_attribution

if TYPE_CHECKING:
    from ggda.evaluate import Retrainer
    from ggda.runs import Run

Log = Callable[[str], None]
#: a grouping, or a function that builds it (called only when a method needs it)
GroupingSource = Grouping | Callable[[], Grouping] | None
KINDS = ("retraining", "prune")


@dataclass
class Ranking:
    """Scores over a grouping of the run's training set, and the test positions of their rows."""

    scores: np.ndarray  # (T, K), or (1, K) for a pooled property
    grouping: Grouping
    targets: np.ndarray  # test positions of the rows (every pooled position for a pooled property)
    pooled: bool = False


@dataclass
class Evaluation:
    """What an evaluation command produced: its table, JSON payload and id tables."""

    name: str
    table: pd.DataFrame
    payload: dict
    ids: dict[str, pd.DataFrame] = field(default_factory=dict)  # file stem -> table
    notes: list[str] = field(default_factory=list)

    def write(self, out: str | Path) -> list[Path]:
        """``NAME.csv``, ``NAME.json`` and the id tables, atomically; returns the files written."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = [out / f"{self.name}.csv", out / f"{self.name}.json"]
        save_csv(files[0], self.table)
        write_text(files[1], json.dumps(self.payload, indent=2, default=float))
        for stem, frame in self.ids.items():
            files.append(save_csv(out / f"{stem}.csv", frame))
        return files


def retrainer_for(
    run: Run,
    store: str | Path | None = None,
    backend: str = "local",
    workers: int | None = None,
    mode: str = "subset",
    epochs: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Retrainer:
    """A retrainer of ``run``'s model and training recipe (``epochs`` overrides the run's) on the
    shared store ``store`` (default ``RUN/evaluations/retrains``)."""
    from ggda.evaluate import Retrainer, RetrainSpec

    cfg = run.train_config
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)  # checked again by TrainConfig
    spec = RetrainSpec(run.model_spec, cfg, run.data_spec, device, mode)
    root = Path(store) if store is not None else run.path / "evaluations" / "retrains"
    return Retrainer(spec, root, run.executor(backend, workers), run.train, run.test, progress=progress)


def ranking_from_result(run: Run, path: str | Path) -> tuple[str, Ranking]:
    """A result directory (``ggda attribute``) as a ranking over ``run``'s training set; a result
    of another run (other training or test ids) is refused by name."""
    res = load_attribution(path, n_train=len(run.train))
    if res.ids_recorded and not np.array_equal(res.train_ids, run.train.ids):
        raise GGDAError(
            f"{res.path} was computed on another training set than {run.path}'s; pass the run it came "
            "from, or rerun `ggda attribute` on this one."
        )
    position = {int(v): i for i, v in enumerate(run.test.ids)}
    if not res.ids_recorded:
        targets = np.arange(len(run.test) if res.pooled else res.values.shape[0])
    else:
        missing = [int(t) for t in res.target_ids if int(t) not in position]
        if missing:
            raise GGDAError(
                f"{res.path} attributes test ids {missing[:5]} that {run.path} does not have; pass the "
                "run it came from."
            )
        targets = np.array([position[int(t)] for t in res.target_ids], dtype=np.int64)
    return res.label, Ranking(res.values, res.as_grouping(), targets, res.pooled)


def _grouping(source: GroupingSource) -> Grouping:
    if source is None:
        raise GGDAError("--method needs a grouping; pass --grouping singleton, random:K, a file, ...")
    return source() if callable(source) else source


def rankings(
    run: Run,
    scores: Sequence[str | Path] = (),
    methods: Sequence[str] = (),
    grouping: GroupingSource = None,
    grouping_label: str = "singleton",
    options: dict | None = None,
    device: str = "cpu",
    per_target: int = 0,
    log: Log = print,
) -> dict[str, Ranking]:
    """label -> :class:`Ranking`, from result directories and/or methods computed here.

    ``per_target`` > 0: per-target scores of the first ``per_target`` test points (LDS);
    0: scores of the mean test loss (removal evaluations; a per-target result is ranked by its mean).
    """
    from ggda.properties import ExampleLoss, MeanLoss

    options = options or {}
    out: dict[str, Ranking] = {}
    for d in scores:
        label, ranking = ranking_from_result(run, d)
        if per_target and ranking.pooled:
            raise GGDAError(
                f"{d} attributes the mean test loss; LDS needs per-target scores (--property test-loss)."
            )
        if not per_target and ranking.scores.shape[0] > 1:
            log(
                f"note: {label} has {ranking.scores.shape[0]} targets; ranking by their mean (use --property mean-test-loss)."
            )
        out[label] = ranking
    if methods:
        for m in methods:  # every method's name and options before any of them runs
            check_method(m, run.method_options(m, **options))
        g = _grouping(grouping)
        task = run.task(device)
        if per_target:
            targets = np.arange(min(per_target, len(run.test)))
            prop = ExampleLoss(run.test.X[targets], run.test.y[targets])
        else:
            targets = np.arange(len(run.test))
            prop = MeanLoss(run.test.X, run.test.y)
        for m in methods:
            t0 = time.perf_counter()
            s = run.method(m, task, **options).cache(run.train, g).attribute(prop)
            log(
                f"{m} on {g.n_groups} groups: {time.perf_counter() - t0 + g.seconds:.2f}s (grouping included)"
            )
            out[f"{m}-{grouping_label.replace(':', '-')}"] = Ranking(s, g, targets, not per_target)
    if not out:
        raise GGDAError("Nothing to evaluate; pass --scores DIR (from `ggda attribute`) or --method NAME.")
    return out


def _ids(ids: np.ndarray, positions: np.ndarray) -> str:
    return " ".join(map(str, np.asarray(ids)[np.asarray(positions, dtype=np.int64)].tolist()))


def removal_evaluation(
    kind: str,
    run: Run,
    ranked: dict[str, Ranking],
    retrainer: Retrainer,
    fractions: Sequence[float],
    seeds: Sequence[int],
    fill: str = "exact",
) -> Evaluation:
    """Retraining score (``kind="retraining"``: most helpful removed first) or pruning
    (``"prune"``: most harmful first), with the data ids removed per ranking and fraction."""
    from ggda.evaluate import pruning_curves, random_removal, removal_set, retraining_score

    if kind not in KINDS:
        raise GGDAError(f"Unknown removal evaluation '{kind}'; choose one of {', '.join(KINDS)}.")
    pairs = {label: (r.scores, r.grouping) for label, r in ranked.items()}
    fn = retraining_score if kind == "retraining" else pruning_curves
    seeds = list(seeds)
    result = fn(retrainer, pairs, fractions, seeds, fill=fill)
    frame = result.table()
    order = "helpful" if kind == "retraining" else "harmful"
    ids = run.train.ids
    removed = [
        {
            "label": label,
            "fraction": float(f),
            "seed": "",
            **_removed(ids, removal_set(s, g, float(f), order, fill)),
        }
        for label, (s, g) in pairs.items()
        for f in fractions
    ]  # the same sets the evaluation removed (removal_set is deterministic)
    removed += [
        {"label": "random", "fraction": float(f), "seed": int(seed), **_removed(ids, random_removal(len(ids), float(f), seed))}
        for f in fractions
        for seed in seeds
    ]  # fmt: skip
    payload = {
        "rows": frame.to_dict(orient="records"),
        "no_removal": result.none_accuracy.tolist() if result.none_accuracy is not None else None,
    }
    return Evaluation(
        kind,
        frame,
        payload,
        {"removed": pd.DataFrame(removed)},
        [f"{retrainer.executed} retrainings run now, {retrainer.reused} reused from {retrainer.store.root}"],
    )


def _removed(ids: np.ndarray, positions: np.ndarray) -> dict:
    return {"n_removed": len(positions), "train_ids": _ids(ids, positions)}


def lds_evaluation(
    run: Run,
    ranked: dict[str, Ranking],
    retrainer: Retrainer,
    subsets: int,
    alpha: float,
    seeds: Sequence[int],
) -> Evaluation:
    """Linear datamodeling score of each ranking (subsets drawn over its groups; rankings over the
    same grouping and targets share retrains), with the per-target scores by test data id."""
    from ggda.evaluate import lds

    rows, per_target = [], []
    shared: dict[tuple[bytes, bytes], list[str]] = {}
    for label, r in ranked.items():
        shared.setdefault((r.grouping.labels.tobytes(), r.targets.tobytes()), []).append(label)
    for labels in shared.values():
        first = ranked[labels[0]]
        res = lds(
            retrainer,
            {lb: ranked[lb].scores for lb in labels},
            first.grouping,
            subsets,
            alpha,
            list(seeds),
            targets=first.targets,
        )
        for lb, v in res.items():
            rows.append(
                {
                    "label": lb,
                    "K": first.grouping.n_groups,
                    "lds": v.score,
                    "sem": v.sem,
                    "targets": len(v.per_target),
                }
            )
            per_target += [
                {"label": lb, "target_id": int(run.test.ids[t]), "lds": float(c)}
                for t, c in zip(first.targets, v.per_target, strict=True)
            ]
    frame = pd.DataFrame(rows)
    payload = {"rows": rows, "subsets": subsets, "alpha": alpha}
    return Evaluation(
        "lds",
        frame,
        payload,
        {"lds_targets": pd.DataFrame(per_target, columns=["label", "target_id", "lds"])},
        [f"{retrainer.executed} retrainings run now, {retrainer.reused} reused from {retrainer.store.root}"],
    )


def noisy_evaluation(
    run: Run,
    scores: Sequence[str | Path] = (),
    methods: Sequence[str] = (),
    grouping: GroupingSource = None,
    grouping_label: str = "singleton",
    options: dict | None = None,
    device: str = "cpu",
    flagged: float = max(FOUND_AT),
) -> Evaluation:
    """Noisy-label detection on a run trained with flipped labels: results ranked by test harm,
    methods by self-influence; ``flagged.csv`` lists the most suspicious ``flagged`` fraction of
    training data ids per ranking and whether each was flipped."""
    from ggda.evaluate import detect_noisy_labels, suspicion_from_test_scores
    from ggda.evaluate.noisy_labels import detect_by_self_influence

    train = run.train  # carries the mask of flipped labels
    if train.noisy is None or not train.noisy.any():
        raise GGDAError(f"{run.path} has no flipped labels; train it with `ggda train --noise 0.1`.")
    options = options or {}
    for m in methods:
        check_method(m, run.method_options(m, **options))
    rows, flags = [], []

    def record(label: str, det) -> None:
        top = det.order[: int(round(flagged * len(train)))]
        flags.extend(
            {"label": label, "rank": i + 1, "train_id": int(train.ids[p]), "flipped": bool(train.noisy[p])}
            for i, p in enumerate(top)
        )

    for d in scores:
        label, r = ranking_from_result(run, d)
        det = detect_noisy_labels(suspicion_from_test_scores(r.scores, r.grouping), train.noisy)
        rows.append({"label": label, "ranking": "test-harm", "K": r.grouping.n_groups, **det.row()})
        record(label, det)
    if methods:
        g = _grouping(grouping)
        task = run.task(device)
        for m in methods:
            t0 = time.perf_counter()
            att = run.method(m, task, **options).cache(train, g)
            det = detect_by_self_influence(att, train.noisy)  # NaN + note where it has none
            label = f"{m}-{grouping_label.replace(':', '-')}"
            rows.append(
                {
                    "label": label,
                    "ranking": "self-influence",
                    "K": g.n_groups,
                    "seconds": time.perf_counter() - t0 + g.seconds,
                    **det.row(),
                }
            )
            record(label, det)
    if not rows:
        raise GGDAError(
            "Nothing to evaluate; pass --method NAME (self-influence) or --scores DIR (test harm)."
        )
    frame = pd.DataFrame(rows)
    payload = {"rows": rows, "n_flipped": int(train.noisy.sum())}
    return Evaluation(
        "noisy",
        frame,
        payload,
        {"flagged": pd.DataFrame(flags, columns=["label", "rank", "train_id", "flipped"])},
    )


def evaluate_removal(
    kind: str,
    run: Run,
    out: str | Path,
    scores: Sequence[str | Path] = (),
    methods: Sequence[str] = (),
    grouping: GroupingSource = None,
    grouping_label: str = "singleton",
    options: dict | None = None,
    fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.2),
    seeds: int = 3,
    fill: str = "exact",
    backend: str = "local",
    workers: int | None = None,
    mode: str = "subset",
    epochs: int | None = None,
    store: str | Path | None = None,
    device: str = "cpu",
    log: Log = print,
) -> Evaluation:
    """``ggda evaluate retraining|prune`` end to end: rankings, retrains, table and id files in ``out``."""
    ranked = rankings(run, scores, methods, grouping, grouping_label, options, device, log=log)
    retrainer = retrainer_for(run, store, backend, workers, mode, epochs, device)
    result = removal_evaluation(kind, run, ranked, retrainer, fractions, range(seeds), fill)
    result.write(out)
    return result


def evaluate_lds(
    run: Run,
    out: str | Path,
    scores: Sequence[str | Path] = (),
    methods: Sequence[str] = (),
    grouping: GroupingSource = None,
    grouping_label: str = "singleton",
    options: dict | None = None,
    targets: int = 50,
    subsets: int = 50,
    alpha: float = 0.5,
    seeds: int = 1,
    backend: str = "local",
    workers: int | None = None,
    mode: str = "subset",
    epochs: int | None = None,
    store: str | Path | None = None,
    device: str = "cpu",
    log: Log = print,
) -> Evaluation:
    """``ggda evaluate lds`` end to end: per-target rankings, retrains, table and id files in ``out``."""
    per_target = min(targets, len(run.test))
    ranked = rankings(run, scores, methods, grouping, grouping_label, options, device, per_target, log)
    retrainer = retrainer_for(run, store, backend, workers, mode, epochs, device)
    result = lds_evaluation(run, ranked, retrainer, subsets, alpha, range(seeds))
    result.write(out)
    return result


def evaluate_noisy(
    run: Run,
    out: str | Path,
    scores: Sequence[str | Path] = (),
    methods: Sequence[str] = (),
    grouping: GroupingSource = None,
    grouping_label: str = "singleton",
    options: dict | None = None,
    device: str = "cpu",
) -> Evaluation:
    """``ggda evaluate noisy`` end to end: detection table and ``flagged.csv`` in ``out``."""
    result = noisy_evaluation(run, scores, methods, grouping, grouping_label, options, device)
    result.write(out)
    return result
