"""A user CSV through pandas, with a data-source column as the grouping: which source hurts the model?

The setting: a tabular training set pooled from several data sources (vendors, surveys, sites),
one of which has unreliable labels. Here the CSV is written from the Adult census data (income
>50K; read with pandas from the file ggda bundles, see the README) with a ``source`` column of
``--sources`` values assigned at random, and one source that under-reports: ``--noise`` of its
``>50K`` rows are recorded as ``<=50K``. The user then

1. reads the CSV with pandas, standardises the numeric columns, and turns it into a ggda data set
   with ``from_frame(df, label=..., categorical=[...], group_column="source")``;
2. trains a small MLP (``mlp-s`` from ggda's zoo) with a seeded recipe;
3. attributes the mean test loss to each *source* (``make_grouping("given", train)``) with
   TracIn, an influence function (CG) and Grad-Dot: the noisy source should rank last (harmful);
4. checks it by retraining (same recipe, three seeds) without the worst source and without each
   of the others: test accuracy goes up (and the loss down) without the noisy one; without a
   clean one they stay within the seeds' spread.

Run (times: the shared 2-core CPU machine, 1 thread)::

    .venv/bin/python examples/csv_data_sources.py --quick            # 4,000 / 2,000 rows: 5 s, 0.55 GB
    .venv/bin/python examples/csv_data_sources.py --out runs/csv     # 36,000 / 12,000 rows: 17 s, 0.6 GB
    .venv/bin/python examples/csv_data_sources.py --csv my.csv --test-csv my_test.csv \\
        --label income --source-column source                         # your own files

The ggda-facing code is :func:`load_csv`, :func:`attribute_sources` and :func:`retrain_without`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ggda.data.sources import from_frame
from ggda.evaluate import Retrainer, RetrainSpec
from ggda.execution import SerialExecutor
from ggda.groups.make import make_grouping
from ggda.methods import make_method
from ggda.models import ModelSpec, TrainConfig, build_model, train_model
from ggda.models.recipe import ZooRecipe
from ggda.properties import MeanLoss
from ggda.task import AttributionTask

METHODS = ("tracin", "if-cg", "grad-dot")
CATEGORICAL = [
    "workclass", "education", "marital-status", "occupation", "relationship", "race", "gender", "native-country",
]  # fmt: skip


# -- making the demo CSV (a stand-in for the user's own file) ----------------------------------------
def write_demo_csv(
    train_path: Path, test_path: Path, n_train: int, n_test: int, sources: int, noise: float, seed: int = 0
) -> str:
    """Adult rows as two CSVs; ``source`` in {source_a, ...}; ``noise`` of one source's labels
    flipped in the training CSV. Returns the noisy source's name."""
    from ggda.data.bundled import widedeep_file

    frame = pd.read_parquet(widedeep_file("adult.parquet.brotli"))
    frame["income"] = frame["income"].astype(str).str.strip().str.rstrip(".")
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(frame))[: n_train + n_test]
    train, test = frame.iloc[rows[:n_train]].copy(), frame.iloc[rows[n_train:]].copy()
    names = [f"source_{chr(ord('a') + k)}" for k in range(sources)]
    train["source"] = rng.choice(names, size=len(train))
    test["source"] = rng.choice(names, size=len(test))
    noisy = names[sources // 2]
    high = np.flatnonzero((train["source"].to_numpy() == noisy) & (train["income"].to_numpy() == ">50K"))
    flip = rng.choice(high, size=int(round(noise * len(high))), replace=False)
    train.iloc[flip, train.columns.get_loc("income")] = "<=50K"  # systematic under-reporting
    train.to_csv(train_path, index=False)
    test.to_csv(test_path, index=False)
    return noisy


# -- the user's code ----------------------------------------------------------------------------------
def load_csv(train_path, test_path, label: str, source: str, categorical):
    """(train, test) ggda data sets from two CSVs; the ``source`` column is kept as the grouping.

    Train and test are encoded together (the same one-hot columns) and numeric columns are
    standardised with the training rows' statistics.
    """
    train_df, test_df = pd.read_csv(train_path), pd.read_csv(test_path)
    numeric = [c for c in train_df.columns if c not in {label, source, *categorical}]
    mean, std = train_df[numeric].mean(), train_df[numeric].std().replace(0, 1)
    both = pd.concat([train_df, test_df], ignore_index=True)
    both[numeric] = (both[numeric] - mean) / std
    data = from_frame(both, label=label, categorical=categorical, group_column=source)  # kind inferred
    n = len(train_df)
    sources = sorted(train_df[source].astype(str).unique())  # group id k = sources[k] (sorted)
    return data.subset(np.arange(n), "train"), data.subset(np.arange(n, len(both)), "test"), sources


def recipe(n_features: int, n_classes: int, hidden: int, epochs: int) -> ZooRecipe:
    """How the model is built and trained: for the first model and every retrain."""
    return ZooRecipe(
        ModelSpec("mlp-s", n_features, n_classes, hidden=hidden),
        TrainConfig(epochs=epochs, batch_size=128, lr=0.05, optimizer="sgd", momentum=0.9),
    )


def attribute_sources(model, checkpoints, train, test, methods):
    """Each source's contribution to the mean test loss (positive = helpful): {method: (K,)}."""
    task = AttributionTask(model)
    grouping = make_grouping("given", train)  # one group per value of the source column
    prop = MeanLoss(test.X, test.y)
    opts = {"tracin": {"checkpoints": checkpoints}, "if-cg": {"damping": 1e-3}}
    scores = {
        m: make_method(m, task, **opts.get(m, {})).cache(train, grouping).attribute(prop)[0] for m in methods
    }
    return scores, grouping


def retrain_without(rec, train, test, grouping, store, seeds=(0, 1, 2)):
    """Test accuracy / loss (mean over seeds) of retrains without each source, and with all."""
    retrainer = Retrainer(RetrainSpec(recipe=rec), store, SerialExecutor(), train, test)
    removals = [np.array([], dtype=np.int64)] + [grouping.members(k) for k in range(grouping.n_groups)]
    out = retrainer.run(removals, seeds)
    return out.accuracy.mean(1), out.mean_loss.mean(1), out.accuracy.std(1)


# -- the whole run ----------------------------------------------------------------------------------
@dataclass
class Options:
    n_train: int = 36_000
    n_test: int = 12_000
    sources: int = 4
    noise: float = 0.8
    epochs: int = 10
    hidden: int = 64
    seeds: int = 3
    methods: tuple = METHODS
    out: Path | None = None


def run(
    opts: Options, csv: tuple[Path, Path] | None = None, label="income", source="source", categorical=None
):
    """Write the demo CSVs (unless ``csv`` is given), train, attribute per source, retrain."""
    t_start = time.perf_counter()
    work = opts.out or Path(tempfile.mkdtemp(prefix="ggda-csv-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"seconds": {}}
    if csv is None:
        csv = (work / "train.csv", work / "test.csv")
        report["noisy_source"] = write_demo_csv(*csv, opts.n_train, opts.n_test, opts.sources, opts.noise)
        categorical = CATEGORICAL
    train, test, names = load_csv(*csv, label=label, source=source, categorical=categorical or [])
    report.update(n_train=len(train), n_test=len(test), n_features=train.n_features, sources=names)

    t0 = time.perf_counter()
    rec = recipe(train.n_features, train.n_classes, opts.hidden, opts.epochs)
    model = build_model(rec.model, seed=0)
    result = train_model(
        model, train, TrainConfig(**{**rec.config.to_dict(), "seed": 0}), checkpoint_dir=work / "ckpt"
    )
    report["seconds"]["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores, grouping = attribute_sources(result.model, result.checkpoints, train, test, opts.methods)
    report["seconds"]["attribute"] = time.perf_counter() - t0
    sizes = np.bincount(grouping.labels, minlength=grouping.n_groups)
    report["source_sizes"] = dict(zip(names, sizes.tolist(), strict=True))
    report["scores"] = {m: dict(zip(names, s.tolist(), strict=True)) for m, s in scores.items()}
    report["least_helpful"] = {m: names[int(np.argmin(s))] for m, s in scores.items()}

    if opts.seeds > 0:
        t0 = time.perf_counter()
        acc, loss, acc_sd = retrain_without(
            rec, train, test, grouping, work / "retrains", tuple(range(opts.seeds))
        )
        report["seconds"]["retrain"] = time.perf_counter() - t0
        report["retrain"] = {
            "all sources": {"accuracy": acc[0], "loss": loss[0], "accuracy_sd": acc_sd[0]},
            **{
                f"without {n}": {"accuracy": acc[k + 1], "loss": loss[k + 1], "accuracy_sd": acc_sd[k + 1]}
                for k, n in enumerate(names)
            },
        }
        worst = report["least_helpful"][opts.methods[0]]
        report["accuracy_change_without_least_helpful"] = acc[names.index(worst) + 1] - acc[0]
    report["seconds"]["total"] = time.perf_counter() - t_start
    return report


def table(report: dict) -> str:
    """One line per source: size, each method's score, and the retrained model without it."""
    methods = list(report["scores"])
    head = f"{'source':12s} {'rows':>6s} " + " ".join(f"{m:>10s}" for m in methods)
    retrain = report.get("retrain")
    if retrain:
        all_ = retrain["all sources"]
        head += f"   retrained without it: accuracy, loss (all sources: {all_['accuracy']:.4f}, {all_['loss']:.4f})"
    lines = [head]
    for name in report["sources"]:
        row = f"{name:12s} {report['source_sizes'][name]:6d} "
        row += " ".join(f"{report['scores'][m][name]:10.4g}" for m in methods)
        if retrain:
            r = retrain[f"without {name}"]
            row += f"   {r['accuracy']:.4f} ({r['accuracy'] - all_['accuracy']:+.4f}), {r['loss']:.4f}"
        lines.append(row + ("   <- noisy" if name == report.get("noisy_source") else ""))
    return "\n".join(lines)


def peak_mb() -> float:
    """Peak resident memory of this process (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def parse_args(argv=None) -> argparse.Namespace:
    d = Options()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4,000 train / 2,000 test rows, 5 epochs, 2 seeds")
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--n-test", type=int, default=d.n_test)
    p.add_argument("--sources", type=int, default=d.sources, help="data sources in the demo CSV")
    p.add_argument(
        "--noise",
        type=float,
        default=d.noise,
        help="fraction of the noisy source's >50K rows recorded as <=50K",
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument(
        "--seeds", type=int, default=d.seeds, help="retraining seeds (0: skip the retraining check)"
    )
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--csv", type=Path, default=None, help="your training CSV (default: write the demo one)")
    p.add_argument("--test-csv", type=Path, default=None)
    p.add_argument("--label", default="income")
    p.add_argument("--source-column", default="source")
    p.add_argument("--categorical", default=None, help="comma-separated categorical columns of your CSV")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 was fastest on this shared 2-core machine)"
    )
    p.add_argument("--out", type=Path, default=None, help="CSVs, checkpoints, retrains and summary.json")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.epochs, args.seeds = 4000, 2000, 5, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    opts = Options(
        n_train=args.n_train, n_test=args.n_test, sources=args.sources, noise=args.noise, epochs=args.epochs,
        hidden=args.hidden, seeds=args.seeds, methods=tuple(m for m in args.methods.split(",") if m), out=args.out,
    )  # fmt: skip
    csv = None
    if args.csv is not None:
        if args.test_csv is None:
            raise SystemExit("error: --csv needs --test-csv (a held-out file with the same columns)")
        csv = (args.csv, args.test_csv)
    cats = args.categorical.split(",") if args.categorical else None
    report = run(opts, csv, label=args.label, source=args.source_column, categorical=cats)
    report["seconds"]["wall"] = time.perf_counter() - t0
    report["peak_rss_mb"] = peak_mb()
    report["threads"] = args.threads
    print(table(report))
    print(json.dumps(report, indent=2, default=float))
    if args.out is not None:
        (args.out / "summary.json").write_text(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
