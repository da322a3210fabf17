"""Grouping speed: K-Means grouping of n = 100,000 points with 64 features into K = 1,000 groups.

Issue #3's bar: under a minute on 2 cores. Features are a seeded Gaussian mixture (1,000 centres,
spread 3, unit noise) so the clustering has real structure; each row also reports the
within-group variance relative to the total (W/T, lower = tighter groups; ≈ 0.1 is the mixture's
own noise level) and the group-size spread. Wall seconds depend on the machine's load; CPU
seconds (process time) do much less.

    .venv/bin/python benchmarks/bench_grouping.py [--n 100000 --d 64 --k 1000]
    .venv/bin/python benchmarks/run_all.py --only grouping     # once run_all lists it
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (one thread per process, before numpy/torch load)
import numpy as np  # noqa: E402


def mixture(n: int, d: int, k: int, seed: int = 0):
    from ggda.data.dataset import Dataset

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)).astype(np.float32) * 3
    X = centres[rng.integers(0, k, n)] + rng.normal(size=(n, d)).astype(np.float32)
    return Dataset(X=X, y=rng.integers(0, 10, n), name=f"mixture-{k}")


def bench(n: int, d: int, k: int, seed: int = 0, algorithms=("auto",)) -> common.Table:
    from ggda.groups import make_grouping, within_group_variance
    from ggda.groups.features import input_features

    data = mixture(n, d, k, seed)
    F = input_features(data.X)
    total = float(F.var(0, dtype=np.float64).sum())
    table = common.Table(
        "grouping time",
        f"n={n:,} points x d={d} features (seeded {k}-centre Gaussian mixture) into K={k:,} groups, 1 thread",
        ["method", "algorithm", "K", "seconds", "cpu seconds", "min/median/max size", "W/T", "empty fixed"],
    )
    runs = [("random", {})] + [("kmeans", {"algorithm": a}) for a in algorithms]
    for method, opts in runs:
        c0 = time.process_time()
        seconds, _, g = common.timed(lambda: make_grouping(method, data, n_groups=k, seed=seed, **opts))  # noqa: B023
        cpu = time.process_time() - c0
        s = g.summary()
        table.add(
            method,
            g.meta.get("algorithm", "-"),
            s["K"],
            seconds,
            cpu,
            f"{s['min_size']}/{s['median_size']:g}/{s['max_size']}",
            within_group_variance(F, g) / total,
            g.meta.get("empty_clusters", 0),
        )
    table.notes.append("bar (issue #3): n=100,000 x 64 into K=1,000 in under a minute on 2 cores")
    return table


def run(quick: bool = True) -> list[common.Table]:
    """Entry point for ``benchmarks/run_all.py``."""
    tables = [bench(100_000, 64, 1_000)]
    if not quick:
        tables.append(bench(20_000, 64, 1_000, algorithms=("kmeans", "minibatch")))
    for t in tables:
        print(t.render(), flush=True)
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--k", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithm", default="auto", help="auto, kmeans, minibatch (comma-separated)")
    args = parser.parse_args()
    print(bench(args.n, args.d, args.k, args.seed, tuple(args.algorithm.split(","))).render())


if __name__ == "__main__":
    main()
