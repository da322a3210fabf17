"""Within-group gradient variance of each grouping method (issue #3's quality table).

For each data set: train ``mlp-s``, group the training set into K = n / size groups with Random,
K-Means, Repr-K-Means and Grad-K-Means (plain and per-class), and report W/T — the mean squared
distance of a point's full per-example loss gradient to its group's mean gradient, relative to
the total variance (0 = groups keep per-point gradients, 1 = no better than one group) — as
mean ± std over seeds, with class purity and grouping time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grouping_variance.py --data digits --size 20 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

METHODS = ("random", "kmeans", "repr-kmeans", "grad-kmeans")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", help="comma-separated bundled data sets")
    parser.add_argument("--size", type=int, default=20, help="target group size: K = n // size")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ggda.data.spec import DataSpec, prepare_data
    from ggda.groups import gradient_variance, make_grouping
    from ggda.models import TrainConfig, build_model, train_model
    from ggda.models.training import accuracy
    from ggda.task import AttributionTask

    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for name in args.data.split(","):
        train, test, _ = prepare_data(DataSpec(name, max_train=args.max_train))
        model = build_model("mlp-s", train.n_features, train.n_outputs, train.input_shape, seed=0)
        train_model(model, train, TrainConfig(epochs=args.epochs, lr=0.05, batch_size=32, seed=0))
        task = AttributionTask(model)
        K = len(train) // args.size
        print(f"# {train.describe()}; mlp-s test acc {accuracy(model, test):.3f}; K = {K}")
        for per_class in (False, True):
            for method in METHODS:
                ratios, purities, secs = [], [], []
                for seed in seeds:
                    g = make_grouping(method, train, n_groups=K, task=task, per_class=per_class, seed=seed)
                    ratios.append(gradient_variance(task, train.X, train.y, g)["ratio"])
                    purities.append(g.meta["purity"])
                    secs.append(g.seconds)
                row = {
                    "data": name,
                    "n": len(train),
                    "K": K,
                    "method": method + (" per-class" if per_class else ""),
                    "W/T": float(np.mean(ratios)),
                    "W/T std": float(np.std(ratios)),
                    "purity": float(np.mean(purities)),
                    "seconds": float(np.mean(secs)),
                    "max_size": int(g.sizes.max()),
                }
                rows.append(row)
                print(
                    f"| {name} | {row['method']:24s} | {row['W/T']:.4f} ± {row['W/T std']:.4f} | "
                    f"{row['purity']:.3f} | {row['max_size']} | {row['seconds']:.2f} s |",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
