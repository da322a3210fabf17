"""``ggda features build|score|info`` (the on-disk feature store) and ``ggda cluster`` (Ray).

For training sets whose gradients do not fit in memory: ``build`` streams group gradients (or
their random projections) of a run into a chunked store, resumably (re-run the same command after
a crash), optionally as jobs on the local process pool or a Ray cluster; ``score`` scores test
targets against it block-wise and writes the top-k table without holding the score matrix.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from ggda.cli.main import _threads, app, check_backend, checked, command_line, resolve_grouping
from ggda.errors import GGDAError
from ggda.options import COUNT, NONNEG_INT, POSITIVE
from ggda.outputs import check_output_dir, new_output_dir
from ggda.paths import confined_path

features_app = typer.Typer(
    no_args_is_help=True, help="On-disk gradient/feature store: build it chunk by chunk, score block-wise."
)
app.add_typer(features_app, name="features")

BACKEND_HELP = "Where chunks are computed: inline (this process), local (process pool) or ray."


def make_backend(backend: str, workers: int | None, address: str | None, threads: int | None):
    """An executor for ``--backend`` (``None`` for inline); ``--address`` implies ``ray``."""
    from ggda.execution import make_executor

    if address and backend != "ray":
        raise GGDAError("--address points at a Ray cluster; use it with --backend ray.")
    if backend == "inline":
        return None
    if backend == "local":
        return make_executor("local", workers=workers, threads_per_worker=threads)
    if backend == "ray":
        return make_executor(
            "ray", address=address, num_cpus=None if address else workers, threads_per_worker=threads or 1
        )
    raise GGDAError(f"Unknown backend '{backend}'; choose inline, local or ray.")


@features_app.command("build")
def build_cmd(
    run: Path = typer.Option(..., help="Run directory from `ggda train`."),
    out: Path = typer.Option(..., help="Store directory (re-run the same command to resume a build)."),
    grouping: str = typer.Option(
        "singleton", help="singleton, column, a grouping spec or a file of group ids."
    ),
    projection: str = typer.Option("identity", help="identity (raw gradients), gaussian or rademacher."),
    proj_dim: int = typer.Option(
        None, help="Projected dimension d (gaussian/rademacher).", callback=checked(COUNT)
    ),
    seed: int = typer.Option(0, help="Projection seed.", callback=checked(NONNEG_INT)),
    layerwise: bool = typer.Option(False, help="Block-diagonal projection, one block per layer."),
    chunk_rows: int = typer.Option(
        None, help="Rows per chunk (default: ~64 MB chunks).", callback=checked(COUNT)
    ),
    dtype: str = typer.Option("float32", help="float32, float16 or float64 on disk."),
    memory_mb: float = typer.Option(
        256.0, help="Budget for raw gradient blocks in memory.", callback=checked(POSITIVE)
    ),
    backend: str = typer.Option("inline", help=BACKEND_HELP),
    workers: int = typer.Option(
        None,
        help="local: processes; ray without --address: CPUs of the cluster started.",
        callback=checked(COUNT),
    ),
    address: str = typer.Option(
        None, help="Existing Ray cluster: auto or HOST:PORT (needs a shared store path)."
    ),
    overwrite: bool = typer.Option(False, help="Replace a store built with another configuration."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto (gradients and projection run there)."),
    threads: int = typer.Option(None, help="torch threads (per worker with a backend)."),
) -> None:
    """Stream a run's group gradients (optionally projected) into a chunked on-disk store."""
    _threads(threads)
    from ggda.runs import Run
    from ggda.store import build_gradient_store

    check_backend(backend, ("inline", "local", "ray"))
    if projection != "identity" and proj_dim is None:
        raise GGDAError(f"--projection {projection} needs --proj-dim D (the projected dimension), e.g. 1024.")
    r = Run.load(run)
    check_output_dir(out)
    grp = resolve_grouping(grouping, r)
    task = r.task(device)
    executor = make_backend(backend, workers, address, threads)
    t0 = time.perf_counter()
    try:
        store = build_gradient_store(
            out, task, r.train.X, r.train.y, grp, projection=projection, proj_dim=proj_dim, proj_seed=seed,
            layerwise=layerwise, chunk_rows=chunk_rows, dtype=dtype, memory_mb=memory_mb, executor=executor,
            config={"run": str(Path(run).resolve()), "grouping_spec": grouping}, overwrite=overwrite, progress=True,
        )  # fmt: skip
    finally:
        if executor is not None and hasattr(executor, "close"):
            executor.close()
    typer.echo(
        f"store {store.n_rows} groups x {store.dim} dims ({store.nbytes / 2**20:.1f} MB, {store.n_chunks} chunks) "
        f"in {time.perf_counter() - t0:.2f}s -> {out}/"
    )


@features_app.command("score")
def score_cmd(
    ctx: typer.Context,
    run: Path = typer.Option(..., help="The run the store was built from."),
    store: Path = typer.Option(..., help="Store directory from `ggda features build`."),
    prop: str = typer.Option("test-loss", "--property", help="test-loss, mean-test-loss or margin."),
    targets: int = typer.Option(
        50, help="Number of test points used as targets (first N; 0 = all).", callback=checked(NONNEG_INT)
    ),
    target_ids: str = typer.Option(
        None,
        help="Comma-separated data ids of the test points to score, e.g. 3,17,42 (instead of --targets).",
    ),
    kernel: str = typer.Option("none", help="none (Grad-Dot in the store's space) or fisher (projected IF)."),
    damping: float = typer.Option(
        None, help="fisher: absolute damping λ (default 0.1 × mean feature²).", callback=checked(POSITIVE)
    ),
    normalize: bool = typer.Option(False, help="Cosine instead of inner product (kernel none)."),
    aggregate: str = typer.Option("sum", help="Group score: sum or mean over members."),
    top_k: int = typer.Option(10, help="Most helpful groups kept per target.", callback=checked(NONNEG_INT)),
    bottom_k: int = typer.Option(
        0, help="Most harmful groups kept per target.", callback=checked(NONNEG_INT)
    ),
    full: bool = typer.Option(
        False, help="Also write the full (targets x groups) scores.npy (memory-mapped)."
    ),
    target_block: int = typer.Option(1024, help="Targets scored at once.", callback=checked(COUNT)),
    out: Path = typer.Option(None, help="Output directory (default STORE/scores-PROPERTY-KERNEL)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    threads: int = typer.Option(None),
) -> None:
    """Score test targets against a feature store, chunk by chunk; write top-k tables with data ids
    (the `ggda attribute` result format; with --full, `ggda.load_attribution(OUT)` reads it)."""
    _threads(threads)
    from ggda.properties import make_property
    from ggda.results import provenance, save_attribution, select_targets
    from ggda.runs import Run
    from ggda.store import KERNELS, FeatureStore, score_store, target_features
    from ggda.store.scoring import check_store_grouping

    if kernel not in KERNELS:
        raise GGDAError(f"--kernel {kernel}: unknown kernel; choose one of {', '.join(KERNELS)}.")
    if aggregate not in ("sum", "mean"):
        raise GGDAError(f"--aggregate {aggregate}: unknown aggregate; choose sum or mean.")
    r = Run.load(run)
    fs = FeatureStore.open(store)
    task = r.task(device)
    rows = select_targets(r.test.ids, None if targets <= 0 else targets, target_ids)
    property_fn = make_property(prop, r.test.X[rows], r.test.y[rows])
    out = out or confined_path(store, f"scores-{prop}-{kernel}")
    check_output_dir(out)
    spec = str(fs.config.get("grouping_spec", "singleton"))
    grp = resolve_grouping(spec, r, device)  # the store's rows, to name their members by data id
    check_store_grouping(fs, grp, r.train.ids)
    with new_output_dir(out):  # a failure while scoring leaves no directory behind
        t0 = time.perf_counter()
        Q = target_features(fs, task, property_fn)
        res = score_store(
            fs, Q, top_k=top_k, bottom_k=bottom_k, kernel=kernel, damping=damping, normalize=normalize,
            aggregate=aggregate, full=out / "scores.npy" if full else None, target_block=target_block,
            device=task.device, progress=True,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        save_attribution(
            out, None, grp, r.train.ids, r.test.ids[rows], f"features-{kernel}",
            options={"kernel": kernel, "damping": damping, "normalize": normalize, "aggregate": aggregate,
                     "store": str(store), "grouping": spec},
            provenance=provenance(run, command_line(ctx)), prop=prop, seconds=seconds,
            top=(res.top_indices, res.top_scores), bottom=(res.bottom_indices, res.bottom_scores),
            extra={"store": str(store), "targets": int(Q.shape[0]), "full": full, **res.info},
        )  # fmt: skip
    typer.echo(f"scored {Q.shape[0]} targets x {fs.n_rows} groups ({kernel}) in {seconds:.2f}s -> {out}/")


@features_app.command("info")
def info_cmd(store: Path = typer.Option(..., help="Store directory.")) -> None:
    """Show a store's shape, state and the configuration that defines its rows."""
    from ggda.store import FeatureStore

    fs = FeatureStore.open(store)
    missing = fs.missing_chunks()
    typer.echo(repr(fs))
    typer.echo(
        f"chunks {fs.n_chunks - len(missing)}/{fs.n_chunks} written; {fs.nbytes / 2**20:.1f} MB; n_points {fs.n_points}"
    )
    typer.echo(json.dumps(fs.config, indent=2, default=str))


@app.command("cluster")
def cluster_cmd(
    address: str = typer.Option("auto", help="Ray cluster to inspect: auto or HOST:PORT."),
    threads: int = typer.Option(1, help="CPUs per task, as `--backend ray` would request."),
) -> None:
    """Check that ggda can reach a Ray cluster and show how many tasks it would run at once."""
    from ggda.execution import make_executor

    executor = make_executor("ray", address=address, threads_per_worker=threads)
    try:
        typer.echo(executor.describe())
    finally:
        executor.close()
