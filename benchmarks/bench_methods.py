"""Benchmark 1: group vs per-point attribution time for every registered gradient method.

Same trained MLP, same data, same targets and the same options (damping, projection size,
solver settings) for the per-point (singleton groups) and the group runs; a run's time is
grouping + ``cache`` + ``attribute``. Speedup = per-point seconds / group seconds.
"""

from __future__ import annotations

import tempfile

import numpy as np
from common import Table, image_data, save, timed

from ggda.groups import Grouping, random_grouping
from ggda.methods import METHODS, make_method
from ggda.models import TrainConfig, build_model, train_model
from ggda.properties import MeanLoss
from ggda.task import AttributionTask


def method_options(quick: bool, checkpoints) -> dict[str, dict]:
    """Options per method (identical for group and per-point runs)."""
    cg_iter = 20 if quick else 100
    opts = {
        "grad-dot": {},
        "tracin": {"checkpoints": checkpoints},
        "if-cg": {"damping_scale": 0.1, "max_iter": cg_iter, "tol": 1e-4},
        "if-lissa": {"damping_scale": 0.1, "depth": 200 if quick else 1000},
        "if-arnoldi": {"damping_scale": 0.1, "rank": 20 if quick else 50, "iterations": 40 if quick else 200},
        "datainf": {"damping_scale": 0.1},
        "ekfac": {},
        "if-group-fisher": {"damping_scale": 0.1},
        "trak": {"proj_dim": 512},
    }
    return {k: v for k, v in opts.items() if k in METHODS}


def run(quick: bool = True, only: list[str] | None = None) -> list[Table]:
    n, T = 20_000, 500
    train, test = image_data(n, T)
    model = build_model("mlp-s", 784, 10, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        result = train_model(
            model,
            train,
            TrainConfig(epochs=3, batch_size=128, lr=0.05, checkpoint_every=1),
            checkpoint_dir=tmp,
        )
        checkpoints = [(c.path, c.lr) for c in result.checkpoints][-3:]
        checkpoints = [
            (__import__("torch").load(p, weights_only=False)["state_dict"], lr) for p, lr in checkpoints
        ]
    task = AttributionTask(model.eval())
    prop = MeanLoss(test.X, test.y)  # GGDA's model-level property: one target
    Ks = [n // 10, n // 100, n // 1000]
    table = Table(
        "group vs per-point attribution time per method",
        f"model=mlp-s 784-128-10 (p={task.n_params:,}), data={train.name}, n={n:,}, d=784, "
        f"property = mean test loss over {T} test points (1 target), K in {Ks} random groups, device={task.device}",
        ["method", "per-point s", "peak MB"] + [f"K={k} s" for k in Ks] + [f"speedup K={k}" for k in Ks],
    )
    runs = [(name, opts, True) for name, opts in method_options(quick, checkpoints).items()]
    runs.insert(1, ("grad-dot", {}, False))  # the generic torch.func path, for reference
    if only:
        runs = [r for r in runs if r[0] in only]
    for name, opts, fast in runs:
        row: list = [name if fast else f"{name} (gradients=generic)"]
        try:

            def once(grouping_fn, name=name, opts=opts, fast=fast):
                g = grouping_fn()
                on = task if fast else AttributionTask(model.eval(), gradients="generic")
                return make_method(name, on, **opts).cache(train, g).attribute(prop)

            t_pp, m_pp, s_pp = timed(lambda once=once: once(lambda: Grouping.singleton(n)))
            row += [t_pp, m_pp]
            times = []
            for K in Ks:
                t, _, s_g = timed(lambda K=K, once=once: once(lambda: random_grouping(n, K, seed=0)))
                times.append(t)
                if fast and name in ("grad-dot", "tracin") and K == Ks[-1]:  # linear: group = Σ members
                    g = random_grouping(n, K, seed=0)
                    summed = np.zeros_like(s_g)
                    np.add.at(summed.T, g.labels, s_pp.T)
                    err = np.abs(summed - s_g).max() / np.abs(summed).max()
                    table.notes.append(
                        f"{name}: group score = sum of per-point scores, max rel. error {err:.1e}"
                    )
            row += times + [t_pp / t for t in times]
        except Exception as e:  # report, don't hide: a failing method is listed with its error
            row += [f"error: {type(e).__name__}: {str(e)[:80]}"]
            row += [""] * (len(table.columns) - len(row))
        table.add(*row)
        print(" ", row, flush=True)
        save("methods" if not only else "methods_" + "_".join(only), [table])  # partial results survive
    table.notes.append("time = grouping + cache + attribute; random grouping (its time is included).")
    p = task.n_params
    table.notes.append(
        f"if-explicit not run: this MLP's dense Hessian is p x p = {p:,}^2 floats ({p * p * 4 / 2**30:.0f} GB); "
        "it is timed on logistic regression in the dattri table. if-group-fisher per point solves an "
        "n x n system (its peak memory)."
    )
    print(table.render(), flush=True)
    return [table]


if __name__ == "__main__":
    import sys

    only = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")]
    tables = run(quick="--full" not in sys.argv, only=only[0].split(",") if only else None)
    print(save("methods" if not only else "methods_" + only[0].replace(",", "_"), tables))
