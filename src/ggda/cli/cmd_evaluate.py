"""``ggda evaluate retraining|prune|lds|noisy`` and ``ggda experiment``.

The evaluate commands act on a run directory (``ggda train``) and attribution directories
(``ggda attribute``: scores.npy + groups.npy + meta.json), or compute the attribution themselves
with ``--method``/``--grouping``. All retrains go to one shared store, ``RUN/evaluations/retrains``,
so evaluations resume and share identical retrains.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import typer

from ggda.arrays import read_npy
from ggda.cli.main import _threads, app, check_backend, checked, parse_options, resolve_grouping
from ggda.errors import GGDAError
from ggda.io import save_csv, write_text
from ggda.options import COUNT, FRACTION, Spec, check_each, check_method
from ggda.outputs import check_output_dir

evaluate_app = typer.Typer(no_args_is_help=True, help="Evaluate attributions by acting on them (retraining).")
app.add_typer(evaluate_app, name="evaluate")


#: removal and pruning fractions: 0 (nothing removed) up to, not including, everything
REMOVAL_FRACTION = Spec(float, 0, 1, high_open=True)


def _floats(text: str, what: str, spec: Spec | None = None) -> list[float]:
    """``"0.1,0.2"`` -> [0.1, 0.2], each checked by ``spec`` (finite, in range)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GGDAError(
            f"{what} {text} is not valid: write comma-separated numbers, e.g. 0.01,0.05,0.1,0.2."
        ) from None
    if not values:
        raise GGDAError(f"{what}: give at least one value, e.g. 0.01,0.05,0.1,0.2.")
    return check_each(what, values, spec) if spec is not None else values


def _load_scores(path: Path, n_train: int) -> tuple[str, np.ndarray, object, dict]:
    """An attribution directory (``ggda attribute``): scores, grouping and meta, each file
    checked (readable, shapes that agree with the run, finite scores) and named when it is not."""
    from ggda.groups.grouping import Grouping

    fix = "rerun the `ggda attribute` command that wrote it."
    if not path.is_dir():
        raise GGDAError(f"--scores {path} is not a directory; pass an output directory of `ggda attribute`.")
    if not (path / "scores.npy").exists():
        raise GGDAError(f"{path} has no scores.npy; pass an output directory of `ggda attribute`.")
    scores = read_npy(path / "scores.npy", fix)
    try:
        if (path / "groups.npy").exists():
            grouping = Grouping(read_npy(path / "groups.npy", fix))
            grouping.check_matches(n_train, "the run's training set")
        else:
            grouping = Grouping.singleton(n_train)
    except GGDAError as exc:
        raise GGDAError(str(exc) if "groups.npy" in str(exc) else f"{path / 'groups.npy'}: {exc}") from exc
    if scores.ndim != 2 or scores.shape[1] != grouping.n_groups or not np.issubdtype(scores.dtype, np.number):
        raise GGDAError(
            f"{path / 'scores.npy'} has shape {scores.shape} ({scores.dtype}), not (targets, "
            f"{grouping.n_groups} groups); {fix}"
        )
    if not np.isfinite(scores).all():
        raise GGDAError(f"{path / 'scores.npy'} contains NaN or inf scores; {fix}")
    meta: dict = {}
    if (path / "meta.json").exists():
        try:
            meta = json.loads((path / "meta.json").read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise GGDAError(
                f"{path / 'meta.json'} is not valid JSON (truncated or overwritten); {fix}"
            ) from exc
        if not isinstance(meta, dict):
            raise GGDAError(f"{path / 'meta.json'} is not a JSON object; {fix}")
    return path.name, scores, grouping, meta


def _retrainer(
    r,
    run: Path,
    store: Path | None,
    backend: str,
    workers: int | None,
    mode: str,
    epochs: int | None,
    device: str,
):
    from ggda.evaluate import Retrainer, RetrainSpec

    cfg = r.train_config
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)  # checked again by TrainConfig
    spec = RetrainSpec(r.model_spec, cfg, r.data_spec, device, mode)
    executor = r.executor(backend, workers)
    return Retrainer(
        spec, store or run / "evaluations" / "retrains", executor, r.train, r.test, progress=True
    )


def _rankings(
    r,
    scores_dirs: list[Path],
    methods: list[str],
    grouping: str,
    opts: list[str],
    device: str,
    per_target: int = 0,
):
    """label -> (scores, grouping) from attribution directories and/or methods computed here."""
    from ggda.groups.grouping import Grouping

    out: dict[str, tuple[np.ndarray, Grouping]] = {}
    for d in scores_dirs:
        label, scores, g, meta = _load_scores(d, len(r.train))
        if per_target and meta.get("property") == "mean-test-loss":
            raise GGDAError(
                f"{d} attributes the mean test loss; LDS needs per-target scores (--property test-loss)."
            )
        if not per_target and scores.shape[0] > 1:
            typer.echo(
                f"note: {label} has {scores.shape[0]} targets; ranking by their mean (use --property mean-test-loss)."
            )
        out[label] = (scores, g)
    if methods:
        from ggda.properties import ExampleLoss, MeanLoss

        for m in methods:  # every method's name and options before any of them runs
            check_method(m, r.method_options(m, **parse_options(opts)))

        g = resolve_grouping(grouping, r)
        task = r.task(device)
        prop = (
            ExampleLoss(r.test.X[:per_target], r.test.y[:per_target])
            if per_target
            else MeanLoss(r.test.X, r.test.y)
        )
        for m in methods:
            t0 = time.perf_counter()
            scores = r.method(m, task, **parse_options(opts)).cache(r.train, g).attribute(prop)
            typer.echo(
                f"{m} on {g.n_groups} groups: {time.perf_counter() - t0 + g.seconds:.2f}s (grouping included)"
            )
            out[f"{m}-{grouping.replace(':', '-')}"] = (scores, g)
    if not out:
        raise GGDAError("Nothing to evaluate; pass --scores DIR (from `ggda attribute`) or --method NAME.")
    return out


def _write(out: Path, name: str, frame, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_csv(out / f"{name}.csv", frame)
    write_text(out / f"{name}.json", json.dumps(payload, indent=2, default=float))
    typer.echo(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    typer.echo(f"wrote {out}/{name}.csv")


_RUN = typer.Option(..., help="Run directory from `ggda train`.")
_SCORES = typer.Option([], "--scores", help="Attribution directory from `ggda attribute` (repeatable).")
_METHOD = typer.Option([], "--method", help="Compute this method's attribution here (repeatable).")
_GROUPING = typer.Option(
    "singleton", help="Grouping for --method: singleton, random:K, grad-kmeans:K, a file, ..."
)
_OPT = typer.Option([], "--opt", help="Method option KEY=VALUE for --method (repeatable).")
_SEEDS = typer.Option(3, help="Retraining seeds per removal set.", callback=checked(COUNT))
_BACKEND = typer.Option("local", help="Executor: serial, local (process pool) or ray.")
_WORKERS = typer.Option(None, help="Worker processes (default: one per core).", callback=checked(COUNT))
_MODE = typer.Option(
    "subset", help="subset (train on the kept points) or weight (weight 0 for removed points)."
)
_EPOCHS = typer.Option(None, help="Retrain epochs (default: the run's).", callback=checked(COUNT))
_STORE = typer.Option(None, help="Retrain store (default RUN/evaluations/retrains).")


def _check_common(scores, method, backend: str | None, what: str) -> None:
    """What can be refused before the run is even loaded."""
    if not scores and not method:
        raise GGDAError(f"Nothing to evaluate; pass --scores DIR (from `ggda attribute`) or {what}.")
    if backend is not None:
        check_backend(backend)


def _outputs(run: Path, kind: str, out: Path | None, store: Path | None = None) -> Path:
    """The output directory (and retrain store), checked before any work."""
    out = out or run / "evaluations" / kind
    check_output_dir(out)
    if store is not None:
        check_output_dir(store, "--store")
    return out


def _removal_command(
    kind: str,
    run,
    scores,
    method,
    grouping,
    opt,
    fractions,
    seeds,
    fill,
    backend,
    workers,
    mode,
    epochs,
    store,
    out,
    device,
    threads,
):
    _threads(threads)
    from ggda.evaluate import pruning_curves, retraining_score
    from ggda.evaluate.retraining_score import FILLS
    from ggda.runs import Run

    fracs = _floats(fractions, "--fractions", REMOVAL_FRACTION)
    if fill not in FILLS:
        raise GGDAError(f"--fill {fill}: unknown fill; choose one of {', '.join(FILLS)}.")
    _check_common(scores, method, backend, "--method NAME")
    r = Run.load(run)
    out = _outputs(run, kind, out, store)
    rankings = _rankings(r, scores, method, grouping, opt, device)
    retrainer = _retrainer(r, run, store, backend, workers, mode, epochs, device)
    fn = retraining_score if kind == "retraining" else pruning_curves
    result = fn(retrainer, rankings, fracs, list(range(seeds)), fill=fill)
    frame = result.table()
    typer.echo(
        f"{retrainer.executed} retrainings run now, {retrainer.reused} reused from {retrainer.store.root}"
    )
    _write(
        out,
        kind,
        frame,
        {
            "rows": frame.to_dict(orient="records"),
            "no_removal": result.none_accuracy.tolist() if result.none_accuracy is not None else None,
        },
    )


@evaluate_app.command("retraining")
def retraining_cmd(
    run: Path = _RUN,
    scores: list[Path] = _SCORES,
    method: list[str] = _METHOD,
    grouping: str = _GROUPING,
    opt: list[str] = _OPT,
    fractions: str = typer.Option("0.01,0.05,0.1,0.2", help="Fractions of training points to remove."),
    seeds: int = _SEEDS,
    fill: str = typer.Option(
        "exact", help="exact (split the boundary group) or cover (whole groups, overshoot)."
    ),
    backend: str = _BACKEND,
    workers: int = _WORKERS,
    mode: str = _MODE,
    epochs: int = _EPOCHS,
    store: Path = _STORE,
    out: Path = typer.Option(None, help="Output directory (default RUN/evaluations/retraining)."),
    device: str = typer.Option("cpu"),
    threads: int = typer.Option(None),
) -> None:
    """Retraining score: remove the most helpful top-k% points, retrain, test accuracy (+ baselines)."""
    _removal_command("retraining", **locals())  # every option, by name


@evaluate_app.command("prune")
def prune_cmd(
    run: Path = _RUN,
    scores: list[Path] = _SCORES,
    method: list[str] = _METHOD,
    grouping: str = _GROUPING,
    opt: list[str] = _OPT,
    fractions: str = typer.Option("0.1,0.2,0.3,0.5", help="Fractions of training points to prune."),
    seeds: int = _SEEDS,
    fill: str = typer.Option("exact"),
    backend: str = _BACKEND,
    workers: int = _WORKERS,
    mode: str = _MODE,
    epochs: int = _EPOCHS,
    store: Path = _STORE,
    out: Path = typer.Option(None, help="Output directory (default RUN/evaluations/prune)."),
    device: str = typer.Option("cpu"),
    threads: int = typer.Option(None),
) -> None:
    """Dataset pruning: remove the least valuable points first, retrain, accuracy vs fraction."""
    _removal_command("prune", **locals())  # every option, by name


@evaluate_app.command("lds")
def lds_cmd(
    run: Path = _RUN,
    scores: list[Path] = _SCORES,
    method: list[str] = _METHOD,
    grouping: str = _GROUPING,
    opt: list[str] = _OPT,
    targets: int = typer.Option(
        50, help="Test targets for --method (the first N test points).", callback=checked(COUNT)
    ),
    subsets: int = typer.Option(
        50, help="Random subsets M (one retrain each per seed; at least 3).", callback=checked(Spec(int, 3))
    ),
    alpha: float = typer.Option(
        0.5, help="Fraction of units kept in each subset.", callback=checked(FRACTION)
    ),
    seeds: int = typer.Option(
        1, help="Retraining seeds per subset (losses averaged).", callback=checked(COUNT)
    ),
    backend: str = _BACKEND,
    workers: int = _WORKERS,
    mode: str = _MODE,
    epochs: int = _EPOCHS,
    store: Path = _STORE,
    out: Path = typer.Option(None, help="Output directory (default RUN/evaluations/lds)."),
    device: str = typer.Option("cpu"),
    threads: int = typer.Option(None),
) -> None:
    """Linear datamodeling score over the scores' units (subsets drawn over groups)."""
    _threads(threads)
    import pandas as pd

    from ggda.evaluate import lds
    from ggda.runs import Run

    _check_common(scores, method, backend, "--method NAME")
    r = Run.load(run)
    out = _outputs(run, "lds", out, store)
    rankings = _rankings(r, scores, method, grouping, opt, device, per_target=min(targets, len(r.test)))
    retrainer = _retrainer(r, run, store, backend, workers, mode, epochs, device)
    rows = []
    by_grouping: dict[bytes, list[str]] = {}
    for label, (_, g) in rankings.items():
        by_grouping.setdefault(g.labels.tobytes(), []).append(label)
    for labels in by_grouping.values():
        g = rankings[labels[0]][1]
        res = lds(retrainer, {lb: rankings[lb][0] for lb in labels}, g, subsets, alpha, list(range(seeds)))
        rows += [
            {"label": lb, "K": g.n_groups, "lds": v.score, "sem": v.sem, "targets": len(v.per_target)}
            for lb, v in res.items()
        ]
    typer.echo(
        f"{retrainer.executed} retrainings run now, {retrainer.reused} reused from {retrainer.store.root}"
    )
    frame = pd.DataFrame(rows)
    _write(out, "lds", frame, {"rows": rows, "subsets": subsets, "alpha": alpha})


@evaluate_app.command("noisy")
def noisy_cmd(
    run: Path = typer.Option(
        ..., help="Run trained with `ggda train --noise F` (it records which labels flipped)."
    ),
    scores: list[Path] = typer.Option(
        [], "--scores", help="Attribution dirs to rank by test harm (repeatable)."
    ),
    method: list[str] = typer.Option(
        [], "--method", help="Rank by this method's self-influence (repeatable)."
    ),
    grouping: str = _GROUPING,
    opt: list[str] = _OPT,
    out: Path = typer.Option(None, help="Output directory (default RUN/evaluations/noisy)."),
    device: str = typer.Option("cpu"),
    threads: int = typer.Option(None),
) -> None:
    """Noisy-label detection: AUC and fraction of flipped labels found in the top 5/10/20%."""
    _threads(threads)
    import pandas as pd

    from ggda.evaluate import detect_noisy_labels, suspicion_from_test_scores
    from ggda.evaluate.noisy_labels import detect_by_self_influence
    from ggda.runs import Run

    _check_common(scores, method, None, "--method NAME (self-influence)")
    r = Run.load(run)
    train = r.train  # carries the mask of flipped labels
    if train.noisy is None or not train.noisy.any():
        raise GGDAError(f"{run} has no flipped labels; train it with `ggda train --noise 0.1`.")
    out = _outputs(run, "noisy", out)
    for m in method:
        check_method(m, r.method_options(m, **parse_options(opt)))
    rows = []
    for d in scores:
        label, s, g, _ = _load_scores(d, len(train))
        det = detect_noisy_labels(suspicion_from_test_scores(s, g), train.noisy)
        rows.append({"label": label, "ranking": "test-harm", "K": g.n_groups, **det.row()})
    if method:
        g = resolve_grouping(grouping, r)
        task = r.task(device)
        for m in method:
            t0 = time.perf_counter()
            att = r.method(m, task, **parse_options(opt)).cache(train, g)
            det = detect_by_self_influence(att, train.noisy)  # NaN + note where it has none
            rows.append(
                {
                    "label": f"{m}-{grouping.replace(':', '-')}",
                    "ranking": "self-influence",
                    "K": g.n_groups,
                    "seconds": time.perf_counter() - t0 + g.seconds,
                    **det.row(),
                }
            )
    if not rows:
        raise GGDAError(
            "Nothing to evaluate; pass --method NAME (self-influence) or --scores DIR (test harm)."
        )
    frame = pd.DataFrame(rows)
    _write(
        out,
        "noisy",
        frame,
        {"rows": rows, "n_flipped": int(train.noisy.sum())},
    )


def _scoped(pairs: list[str], flag: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for pair in pairs:
        scope, sep, rest = pair.partition(":")
        if not sep or "=" not in rest:
            raise GGDAError(f"{flag} '{pair}' must be NAME:KEY=VALUE, e.g. {flag} if-cg:damping=0.01.")
        out.setdefault(scope, {}).update(parse_options([rest]))
    return out


@app.command("experiment")
def experiment_cmd(
    data: str = typer.Option("digits", help="Bundled data set or file."),
    model: str = typer.Option("mlp-s", help="logreg, mlp-s, mlp-m or cnn."),
    methods: str = typer.Option("grad-dot,tracin", help="Comma-separated methods, or 'all'."),
    groupings: str = typer.Option(
        "random,kmeans,repr-kmeans,grad-kmeans", help="Grouping methods (per-point is always included)."
    ),
    ks: str = typer.Option("n/50,n/10", help="Group counts: integers or n/SIZE."),
    per_class: bool | None = typer.Option(
        None,
        "--per-class/--no-per-class",
        help="Cluster within each class (default: per class for K-Means methods on classification data).",
    ),
    fractions: str = typer.Option("0.01,0.05,0.1,0.2", help="Retraining-score removal fractions."),
    seeds: int = typer.Option(3, help="Retraining seeds."),
    prune_fractions: str = typer.Option("0.1,0.2,0.3,0.5", help="Pruning fractions ('' to skip)."),
    lds_subsets: int = typer.Option(20, help="LDS subsets per grouping (0 to skip)."),
    lds_alpha: float = typer.Option(0.5),
    lds_targets: int = typer.Option(50, help="Test points scored for LDS."),
    noise: float = typer.Option(0.1, help="Flipped-label fraction for noisy-label detection (0 to skip)."),
    noisy_model: str = typer.Option(None, help="Model for the noisy-label study (default: --model)."),
    epochs: int = typer.Option(15),
    lr: float = typer.Option(0.05),
    batch_size: int = typer.Option(64),
    optimizer: str = typer.Option("sgd"),
    weight_decay: float = typer.Option(0.0, help="L2 coefficient of training (and of every retrain)."),
    max_train: int = typer.Option(None, help="Subsample the training split."),
    opt: list[str] = typer.Option([], "--opt", help="METHOD:KEY=VALUE method option (repeatable)."),
    gopt: list[str] = typer.Option(
        [], "--gopt", help="GROUPING:KEY=VALUE grouping option, e.g. grad-kmeans:features=logits."
    ),
    backend: str = _BACKEND,
    workers: int = _WORKERS,
    gold_compare: Path = typer.Option(
        None, help="Output directory of `ggda compare` (similarity-to-gold plot)."
    ),
    out: Path = typer.Option(Path("report"), help="Report directory (index.html, PNGs, CSVs, stores)."),
    device: str = typer.Option("cpu"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(None),
) -> None:
    """Methods × groupings × K on one data set + model: time, retraining score, pruning, LDS, noisy labels, report."""
    _threads(threads)
    from ggda.applications.experiment import ExperimentConfig, run_experiment
    from ggda.methods import METHODS
    from ggda.report.html import write_report

    names = sorted(METHODS) if methods == "all" else [m for m in methods.split(",") if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise GGDAError(f"Unknown method(s) {unknown}; choose from {', '.join(sorted(METHODS))}.")
    method_opts, grouping_opts = _scoped(opt, "--opt"), _scoped(gopt, "--gopt")
    config = ExperimentConfig(
        data=data,
        model=model,
        methods=names,
        groupings=[g for g in groupings.split(",") if g],
        ks=[k for k in ks.split(",") if k],
        per_class=per_class,
        fractions=_floats(fractions, "--fractions"),
        seeds=seeds,
        prune_fractions=_floats(prune_fractions, "--prune-fractions") if prune_fractions.strip() else [],
        lds_subsets=lds_subsets,
        lds_alpha=lds_alpha,
        lds_targets=lds_targets,
        noise=noise,
        noisy_model=noisy_model,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        optimizer=optimizer,
        weight_decay=weight_decay,
        max_train=max_train,
        method_options=method_opts,
        grouping_options=grouping_opts,
        backend=backend,
        workers=workers,
        device=device,
        seed=seed,
        gold_compare=str(gold_compare) if gold_compare else None,
    )
    results = run_experiment(config, out, log=typer.echo)
    index = write_report(results, out)
    typer.echo(f"report: {index}")
