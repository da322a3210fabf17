"""``ggda gold`` (further-training gold standard) and ``ggda compare`` (methods vs the gold)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import typer

from ggda.arrays import read_npy
from ggda.cli.main import _threads, app, check_backend, checked, is_file, parse_options, resolve_grouping
from ggda.errors import GGDAError
from ggda.io import save_npy, write_text
from ggda.options import COUNT, NONNEG_INT, check_each, check_method
from ggda.outputs import check_output_dir
from ggda.paths import confined_path


def _int_list(text: str, what: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise GGDAError(f"{what} must be comma-separated integers, e.g. 3,17,42; got '{text}'.") from exc


@app.command("gold")
def gold_cmd(
    run: Path = typer.Option(..., help="Run directory from `ggda train` (θ^f = its final model)."),
    units: str = typer.Option(
        "points", help="points, or a grouping (column, random:K, or a .npy/.csv/.parquet file of group ids)."
    ),
    n_units: int = typer.Option(
        50, help="Size of the left-out set I (seeded random choice).", callback=checked(COUNT)
    ),
    unit_ids: str = typer.Option("", help="Explicit left-out ids (positions or group ids), comma-separated."),
    unit_seed: int = typer.Option(0, help="Seed of the random left-out set.", callback=checked(NONNEG_INT)),
    targets: int = typer.Option(20, help="Test points used as targets (first N).", callback=checked(COUNT)),
    prop: str = typer.Option("test-loss", "--property", help="test-loss, mean-test-loss or margin."),
    checkpoint: Path = typer.Option(None, help="Use this checkpoint as θ^f instead of RUN/model.pt."),
    epochs: int = typer.Option(1, help="Further-training epochs E (f recorded after each)."),
    seeds: int = typer.Option(1, help="Paired seeds S averaged in eq. 17."),
    seed_offset: int = typer.Option(0, help="First seed value."),
    optimizer: str = typer.Option("sgd", help="sgd or adam (fresh state)."),
    lr: float = typer.Option(1e-3, help="Further-training learning rate."),
    momentum: float = typer.Option(0.0, help="SGD momentum."),
    weight_decay: float = typer.Option(0.0),
    batch_size: int = typer.Option(128),
    removal: str = typer.Option(
        "mask", help="mask (same batches, weight 0), sampler (delete from the permutation) or weight."
    ),
    epsilon: float = typer.Option(
        None, help="mask: member weight 1-ε (default 1); weight: -ε ℓ per step (default 1/n)."
    ),
    record_every: int = typer.Option(0, help="Also record f every k steps (0: epoch ends only)."),
    center: bool = typer.Option(True, "--center/--no-center", help="Report eq. 13 (centred) or eq. 17."),
    path: str = typer.Option("auto", help="auto, vectorised (stacked models + vmap) or sequential."),
    chunk: int = typer.Option(0, help="Units per stored job (0: automatic)."),
    dtype: str = typer.Option("float64", help="float64 (default) or float32 further training."),
    backend: str = typer.Option("local", help="serial, local (process pool) or ray."),
    workers: int = typer.Option(
        None, help="Worker processes (local/ray; default: cores).", callback=checked(COUNT)
    ),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    threads: int = typer.Option(None, help="torch threads in this process (serial backend)."),
    out: Path = typer.Option(
        None, help="Output directory (default RUN/gold/REMOVAL-UNITS). Rerun to resume."
    ),
) -> None:
    """Further-training gold standard (FiMODA eq. 17/13) for left-out points or groups; resumable."""
    _threads(threads)
    from ggda.data.grouping import Grouping
    from ggda.gold import GoldConfig, compute_gold, select_units
    from ggda.gold.prefix import frozen_prefix_view
    from ggda.properties import make_property
    from ggda.runs import Run

    config = GoldConfig(
        epochs=epochs,
        seeds=seeds,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        removal=removal,
        epsilon=epsilon,
        record_every=record_every,
        center=center,
        seed_offset=seed_offset,
        path=path,
        chunk=chunk,
        dtype=dtype,
    )
    r = Run.load(run)
    grouping = (
        Grouping.singleton(len(r.train)) if units in ("points", "singleton") else resolve_grouping(units, r)
    )
    chosen = select_units(grouping, n_units=n_units, ids=_int_list(unit_ids, "--unit-ids"), seed=unit_seed)
    n_targets = min(targets, len(r.test))
    # a text run further-trains its tail on cached prefix states (exact; ggda.gold.prefix)
    task, (train_view, test_view) = frozen_prefix_view(
        r.task(device, checkpoint=checkpoint), r.train, r.test.subset(np.arange(n_targets))
    )
    property_fn = make_property(prop, test_view.X, test_view.y)
    label = (
        "points"
        if chosen.kind == "points"
        else (Path(units).stem if is_file(units) else units.replace(":", "-"))
    )
    out = out or confined_path(run / "gold", f"{removal}-{label}")
    check_output_dir(out)
    check_backend(backend)
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / "grouping.npy", grouping.labels)
    executor = r.executor(backend, workers)
    meta = {
        "run": str(run),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "units_spec": units,
        "property_name": prop,
        "targets": n_targets,
        "target_ids": r.test.ids[:n_targets].tolist(),
        "unit_train_ids": [r.train.ids[m].tolist() for m in chosen.members]
        if chosen.kind == "points"
        else None,
    }
    typer.echo(
        f"gold: {len(chosen)} {chosen.kind} x {config.seeds} seeds x {config.epochs} epochs "
        f"({len(chosen) + 1} runs per seed), {optimizer} lr={lr}, removal={removal}, {n_targets} targets"
    )
    t0 = time.perf_counter()
    result = compute_gold(
        task,
        train_view.X,
        train_view.y,
        property_fn,
        chosen,
        config,
        out=out,
        executor=executor,
        progress=True,
        meta=meta,
    )
    wall = time.perf_counter() - t0
    m = result.meta
    typer.echo(
        f"path={m['path']} chunk={m['chunk']} jobs={m['jobs']} (ran now {m['jobs_run_now']}), "
        f"{m['seconds_per_run']:.3f}s per run, wall {wall:.1f}s"
    )
    if m["stale_results_in_store"]:
        typer.echo(
            f"note: {m['stale_results_in_store']} results in {out}/store come from other settings (unused)."
        )
    scale = np.abs(result.gold).mean(axis=(1, 2))
    typer.echo(
        "mean |gold| per further-training epoch: the average size of the gold-standard effects (the "
        "change of each target's property when a unit is left out, averaged over seeds"
        f"{', centred over units' if center else ''}), over all targets and units; how strongly "
        "removals move the property as training continues:"
    )
    for e in _pick(len(result.epochs)):
        typer.echo(f"  epoch {result.epochs[e]:6.2f}: mean |gold| = {scale[e]:.3e}")
    typer.echo(
        f"wrote {out}/gold.npz ({'eq. 13 centred' if center else 'eq. 17'}; shape {result.gold.shape})"
    )


def _pick(n: int, k: int = 6) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, k)})


def _method_options(pairs: list[str], methods: list[str]) -> dict[str, dict]:
    """``--opt KEY=VALUE`` (every method) or ``--opt METHOD:KEY=VALUE`` (one method)."""
    scoped: dict[str, list[str]] = {m: [] for m in methods}
    for pair in pairs:
        head, sep, rest = pair.partition(":")
        if sep and "=" not in head:
            if head not in scoped:
                raise GGDAError(f"--opt {pair}: method '{head}' is not among --methods {','.join(methods)}.")
            scoped[head].append(rest)
        else:
            for m in methods:
                scoped[m].append(pair)
    return {m: parse_options(v) for m, v in scoped.items()}


@app.command("compare")
def compare_cmd(
    run: Path = typer.Option(..., help="The run directory the gold standard was computed on."),
    gold: Path = typer.Option(..., help="Output directory of `ggda gold`."),
    methods: str = typer.Option("all", help="Comma-separated methods, or 'all' (every registered one)."),
    opt: list[str] = typer.Option(
        [], "--opt", help="Method option KEY=VALUE or METHOD:KEY=VALUE (repeatable)."
    ),
    variant: str = typer.Option(
        "config", help="Gold variant: config (as computed), centred (eq. 13) or raw (eq. 17)."
    ),
    center_scores: bool = typer.Option(False, help="Centre method scores over I too."),
    seed_windows: str = typer.Option(
        "", help="Seed-window sizes for the seed study (default 1,2,5,10,20,50,100)."
    ),
    tracin_checkpoints: bool = typer.Option(
        True,
        "--tracin-checkpoints/--tracin-final",
        help="TracIn over the run's checkpoints, or the final model only.",
    ),
    out: Path = typer.Option(None, help="Output directory (default GOLD/compare)."),
    device: str = typer.Option("cpu"),
    threads: int = typer.Option(None),
) -> None:
    """Cosine/Spearman of each method to the gold standard per further-training epoch; table + plot."""
    _threads(threads)
    from ggda.data.grouping import Grouping
    from ggda.gold import GoldResult
    from ggda.gold.compare import compare_methods, mean_sem
    from ggda.gold.prefix import frozen_prefix_view
    from ggda.methods import METHODS
    from ggda.properties import make_property
    from ggda.runs import Run

    result = GoldResult.load(gold)
    meta = result.meta
    r = Run.load(run)
    if meta.get("run") and Path(meta["run"]).resolve() != run.resolve():
        typer.echo(f"note: the gold standard was computed on {meta['run']}, comparing on {run}.")
    if meta.get("n_train") not in (None, len(r.train)):
        raise GGDAError(
            f"The gold standard was computed on {meta['n_train']} training points, this run has {len(r.train)}."
        )
    gfile = gold / "grouping.npy"
    if gfile.exists():
        fix = "rerun the same `ggda gold` command to rewrite it."
        try:
            grouping = Grouping(read_npy(gfile, fix))
            grouping.check_matches(len(r.train), "the run's training set")
        except GGDAError as exc:
            raise GGDAError(f"{gfile}: {exc}" if str(gfile) not in str(exc) else str(exc)) from exc
    else:
        grouping = Grouping.singleton(len(r.train))
    names = sorted(METHODS) if methods == "all" else [m for m in methods.split(",") if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise GGDAError(
            f"--methods {methods}: unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(sorted(METHODS))} or all."
        )
    windows = _int_list(seed_windows, "--seed-windows")
    if windows is not None:
        windows = check_each("--seed-windows", windows, COUNT)
    ckpt = Path(meta["checkpoint"]) if meta.get("checkpoint") else None
    n_targets = int(meta.get("targets", result.gold.shape[1]))
    # the methods see a text run through its tail too (the same gradients; ggda.gold.prefix)
    task, (train_view, test_view) = frozen_prefix_view(
        r.task(device, checkpoint=ckpt), r.train, r.test.subset(np.arange(n_targets))
    )
    property_fn = make_property(meta.get("property_name", "test-loss"), test_view.X, test_view.y)
    options = _method_options(opt, names)
    for name in names:  # every method's options, by type and range, before any work
        check_method(name, r.method_options(name, **options[name]))
    if not tracin_checkpoints and "tracin" in options:
        options["tracin"].setdefault("checkpoints", None)  # the final model only
    out = out or gold / "compare"
    check_output_dir(out)
    comp = compare_methods(
        result,
        task,
        train_view,
        grouping,
        property_fn,
        names,
        options,
        run=r,
        center_scores=center_scores,
        seed_windows=windows,
        variant=variant,
    )
    cfg = meta.get("config", {})
    comp.meta.update(
        {
            "gold": str(gold),
            "title": f"{Path(str(meta.get('run', run))).name}: {len(result.unit_ids)} {meta.get('units', {}).get('kind', 'units')}, "
            f"{cfg.get('seeds')} seeds, {cfg.get('optimizer')} lr={cfg.get('lr')}, {cfg.get('removal')}",
            # the data behind each column and row of similarity.npz / compare.csv, by data id
            "target_ids": r.test.ids[:n_targets].tolist(),
            "unit_train_ids": {
                str(int(u)): r.train.ids[grouping.members(int(u))].tolist() for u in result.unit_ids
            },
        }
    )
    comp.save(out)
    picks = _pick(len(comp.epochs))
    width = max([len(n) for n in list(comp.cos) + list(comp.failed)] + [12]) + 2
    header = (
        f"{'method':{width}s}"
        + "".join(f"  e={comp.epochs[e]:<12.4g}" for e in picks)
        + "  spearman@first  seconds"
    )
    typer.echo(
        f"cosine to gold (mean ± SEM over {result.gold.shape[1]} targets, {len(result.unit_ids)} units). "
        "Columns: e=E is the cosine similarity between a method's scores and the gold standard after E "
        "further-training epochs (1 = identical direction, 0 = unrelated); spearman@first is the Spearman "
        "rank correlation of scores and gold at the first recorded epoch; seconds is the attribution time:"
    )
    typer.echo(header)
    for name in comp.cos:
        mean, sem = mean_sem(comp.cos[name])
        smean, ssem = mean_sem(comp.spearman[name])
        cells = "".join(f"  {mean[e]:6.3f}±{sem[e]:.3f}  " for e in picks)
        typer.echo(f"{name:{width}s}{cells}  {smean[0]:6.3f}±{ssem[0]:.3f}  {comp.seconds[name]:7.2f}")
    for name, why in comp.failed.items():
        typer.echo(f"{name:{width}s}skipped: {why}")
    if comp.seed_study:
        typer.echo("seed study (max over epochs of mean cosine):")
        for name, study in comp.seed_study.items():
            typer.echo(f"{name:{width}s}" + "  ".join(f"S={k}: {v['max']:.3f}" for k, v in study.items()))
    typer.echo(f"wrote {out}/compare.csv, compare.json, compare.png")
    write_text(
        out / "command.json",
        json.dumps(
            {
                "methods": names,
                "options": {k: str(r.method_options(k, **v)) for k, v in options.items() if k in METHODS},
            }
        ),
    )
