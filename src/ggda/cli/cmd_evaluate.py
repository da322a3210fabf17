"""``ggda evaluate retraining|prune|lds|noisy`` and ``ggda experiment``.

The evaluate commands act on a run directory (``ggda train``) and attribution directories
(``ggda attribute``, read by :func:`ggda.load_attribution`), or compute the attribution themselves
with ``--method``/``--grouping``; the work is :mod:`ggda.applications.evaluation`, this module
parses, calls it and prints. All retrains go to one shared store, ``RUN/evaluations/retrains``,
so evaluations resume and share identical retrains.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ggda.cli.main import _threads, app, check_backend, checked, parse_options, resolve_grouping
from ggda.errors import GGDAError
from ggda.options import COUNT, FRACTION, Spec, check_each
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


def _print(result, out: Path) -> None:
    """The evaluation's table, its notes and the files written."""
    for note in result.notes:
        typer.echo(note)
    typer.echo(result.table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    ids = ", ".join(f"{stem}.csv" for stem in result.ids)
    typer.echo(f"wrote {out}/{result.name}.csv" + (f" (data ids: {ids})" if ids else ""))


def _grouping_source(grouping: str, r):
    """The --grouping spec, resolved only when a --method needs it (after its options are checked)."""
    return lambda: resolve_grouping(grouping, r)


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
    from ggda.applications.evaluation import evaluate_removal
    from ggda.evaluate.retraining_score import FILLS
    from ggda.runs import Run

    fracs = _floats(fractions, "--fractions", REMOVAL_FRACTION)
    if fill not in FILLS:
        raise GGDAError(f"--fill {fill}: unknown fill; choose one of {', '.join(FILLS)}.")
    _check_common(scores, method, backend, "--method NAME")
    r = Run.load(run)
    out = _outputs(run, kind, out, store)
    result = evaluate_removal(
        kind, r, out, scores, method, _grouping_source(grouping, r), grouping, parse_options(opt),
        fracs, seeds, fill, backend, workers, mode, epochs, store, device, log=typer.echo,
    )  # fmt: skip
    _print(result, out)


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
    from ggda.applications.evaluation import evaluate_lds
    from ggda.runs import Run

    _check_common(scores, method, backend, "--method NAME")
    r = Run.load(run)
    out = _outputs(run, "lds", out, store)
    result = evaluate_lds(
        r, out, scores, method, _grouping_source(grouping, r), grouping, parse_options(opt), targets,
        subsets, alpha, seeds, backend, workers, mode, epochs, store, device, log=typer.echo,
    )  # fmt: skip
    _print(result, out)


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
    from ggda.applications.evaluation import evaluate_noisy
    from ggda.runs import Run

    _check_common(scores, method, None, "--method NAME (self-influence)")
    r = Run.load(run)
    out = _outputs(run, "noisy", out)
    result = evaluate_noisy(
        r, out, scores, method, _grouping_source(grouping, r), grouping, parse_options(opt), device
    )
    _print(result, out)


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
    model: str = typer.Option("mlp-s", help="logreg, mlp-s, mlp-m, cnn or resnet."),
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
    inspect_targets: int = typer.Option(
        6, help="Test points the report shows next to their most helpful/harmful training examples (0: none)."
    ),
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
        inspect_targets=inspect_targets,
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
