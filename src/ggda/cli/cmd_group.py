"""``ggda group``: build a grouping of a run's training set and save it for ``ggda attribute``.

Prints K, min/median/max group size, class purity and the time taken (grouping time belongs in
GGDA runtimes); writes the group ids (``.npy``, or ``.parquet``/``.csv`` with position, id and
group columns) plus ``FILE.json`` with the summary and the build record (meta).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ggda.cli.main import _threads, app, checked, grouping_help, parse_options
from ggda.errors import GGDAError
from ggda.io import write_text
from ggda.options import COUNT, NONNEG_INT, POSITIVE
from ggda.outputs import check_output_file

OUT_SUFFIXES = (".npy", ".parquet", ".pq", ".csv")


GROUP_EPILOG = (
    "`ggda group --method M --groups K [--per-class] --out FILE` builds the grouping that "
    "`ggda attribute --grouping M:K[:per-class]` builds on the fly, and saves it: pass FILE to "
    "`--grouping` to reuse it. Methods: random (seeded random partition), kmeans (inputs), "
    "repr-kmeans (a hidden layer's output, --layer), grad-kmeans (per-example gradients: "
    "--features last-layer, logits or projected), given (--values FILE or the data's group column), "
    "singleton.\n\n" + grouping_help()
)


@app.command("group", epilog=GROUP_EPILOG)
def group_cmd(
    run: Path = typer.Option(..., help="Run directory from `ggda train`."),
    method: str = typer.Option(
        "grad-kmeans", help="random, kmeans, repr-kmeans, grad-kmeans, given or singleton."
    ),
    groups: int = typer.Option(None, "--groups", "-k", help="Number of groups K.", callback=checked(COUNT)),
    group_size: float = typer.Option(
        None, help="Target group size S instead of K (K = round(n / S)).", callback=checked(POSITIVE)
    ),
    per_class: bool | None = typer.Option(
        None,
        "--per-class/--no-per-class",
        help="Cluster within each class (label-pure groups); default: per class for K-Means methods on classification data.",
    ),
    seed: int = typer.Option(
        0, help="Seed of k-means++, the random partition and projections.", callback=checked(NONNEG_INT)
    ),
    out: Path = typer.Option(..., help="Output file: .npy, .parquet or .csv."),
    features: str = typer.Option(None, help="grad-kmeans features: last-layer (default), logits, projected."),
    layer: str = typer.Option(
        None, help="repr-kmeans: module whose output to use; grad-kmeans: Linear layer."
    ),
    projection_dim: int = typer.Option(
        None, help="Random-projection dimension of gradient features.", callback=checked(COUNT)
    ),
    values: Path = typer.Option(
        None, help="given: .npy/.csv/.parquet file of group ids (default: the data's group column)."
    ),
    column: str = typer.Option("group", help="given: column of the --values table."),
    opt: list[str] = typer.Option(
        [], "--opt", help="More make_grouping options KEY=VALUE, e.g. --opt empty=merge."
    ),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto (feature extraction)."),
    threads: int = typer.Option(None, help="torch threads (default: torch's)."),
) -> None:
    """Group a run's training points (Random / K-Means / Repr-K-Means / Grad-K-Means / given)."""
    _threads(threads)
    if out.suffix not in OUT_SUFFIXES:
        raise GGDAError(f"--out must end in {', '.join(OUT_SUFFIXES)}; got '{out.name}'.")
    from ggda.groups import make_grouping
    from ggda.runs import Run

    check_output_file(out)
    check_output_file(out.with_suffix(".json"))
    r = Run.load(run)
    options = parse_options(opt)
    for key, value in (("features", features), ("layer", layer), ("projection_dim", projection_dim)):
        if value is not None:
            options[key] = value
    if method == "given" and values is not None:
        options.update(values=str(values), column=column)
    task = r.task(device) if method in ("repr-kmeans", "grad-kmeans") else None
    if group_size is not None and group_size == int(group_size):
        group_size = int(group_size)
    g = make_grouping(
        method,
        r.train,
        n_groups=groups,
        group_size=group_size,
        task=task,
        per_class=per_class,
        seed=seed,
        **options,
    )
    labels = r.train.y if r.kind == "classification" else None
    summary = g.summary(labels)
    path = g.save(out, ids=r.train.ids)
    record = out.with_suffix(".json")
    write_text(
        record, json.dumps({"summary": summary, "meta": g.meta, "run": str(run)}, indent=2, default=str)
    )
    pc = " per-class" if per_class else ""
    purity = f", purity {summary['purity']:.3f}" if "purity" in summary else ""
    extra = ""
    if g.meta.get("empty_clusters"):
        done = {"reseed": "re-seeded", "merge": "merged"}[g.meta.get("empty_policy", "reseed")]
        extra = f", {g.meta['empty_clusters']} empty clusters {done}"
    typer.echo(
        f"{method}{pc}: K={summary['K']} (n={summary['n']}), size min/median/max "
        f"{summary['min_size']}/{summary['median_size']:g}/{summary['max_size']}{purity}, "
        f"{g.seconds:.2f}s{extra}"
    )
    typer.echo(f"wrote {path} and {record}")
