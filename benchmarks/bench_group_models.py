"""Group vs per point where per-example work dominates: a ResNet CNN and the packaged MiniLM.

Issue #20, item 3. For each model, in one process and one run:

1. **floor**: one forward + backward of the summed training loss over all n points (in chunks of
   ``--max-batch`` rows, gradients only for the attributed parameters) — the least any exact
   group gradient can cost;
2. **group gradients**: all K group gradients (``ggda.gradients.iter_group_gradients``, every
   block touched) for K = n/10, n/100, n/1000 random groups and per point (K = n), as a ratio to
   the floor from back-to-back (floor, run) pairs, so both see the same machine load;
3. **methods**: Grad-Dot, TracIn (3 checkpoints), EK-FAC, IF-CG and TRAK, per point (singleton
   groups) and for K = n/10, n/100, n/1000 groups made by ggda's default Grad-K-Means and by
   random, time = grouping + ``cache`` + ``attribute`` (grouping time counted), same options in
   every run; speedup = per-point seconds / group seconds.

Models (both through the bring-your-own path, attributed through their Linear/Conv2d layers):

* ``cnn``: the user ResNet of ``examples/fashion_mnist_cnn.py`` (stem + three residual blocks with
  BatchNorm, 77,754 parameters, 28 × 28 Fashion-MNIST), trained one epoch with Adam on the n
  points; BatchNorm scales/shifts held fixed (eval mode), conv + linear weights attributed;
* ``minilm``: the packaged all-MiniLM-L6-v2 with its last encoder layer + a linear head
  fine-tuned on clothing reviews (``--max-len`` tokens), attributed through the last layer's six
  Linear maps and the head on cached prefix states (``TextClassifier.tail``, exact).

The property is the loss of ``--targets`` test examples (one score row each). ``--help`` runs
nothing; results go to ``benchmarks/results/<--out>.{txt,json}``.

    python benchmarks/bench_group_models.py --model cnn --n-cnn 2000
    python benchmarks/bench_group_models.py --model all
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import Table, save, timed  # noqa: E402  (sets one thread before torch work)

METHODS = ("grad-dot", "tracin", "ekfac", "if-cg", "trak", "trak-kronecker")
GROUPINGS = ("grad-kmeans", "random")


# -- workloads ---------------------------------------------------------------------------------------
def cnn_workload(n: int, n_targets: int, seed: int = 0) -> dict:
    """The example's ResNet on n Fashion-MNIST images, one epoch of Adam, 3 checkpoints."""
    from fashion_mnist_cnn import FashionImages, load_split, make_model, normalize, train
    from torch import nn

    from ggda.data.dataset import Dataset
    from ggda.task import AttributionTask

    imgs, labels = load_split("train", n)
    t_imgs, t_labels = load_split("test", n_targets)
    net = make_model(seed)
    checkpoints = train(net, FashionImages(imgs, labels), seed, epochs=1, n_checkpoints=3)
    net.eval()

    def as_data(images, y, name):
        X = torch.stack([normalize(torch.from_numpy(im.copy())) for im in images]).reshape(len(y), -1)
        return Dataset(X.numpy(), np.asarray(y, np.int64), name=name, n_classes=10, input_shape=(1, 28, 28))

    # the ResNet takes (B, 1, 28, 28) images; ggda's array data are flattened rows
    model = nn.Sequential(nn.Unflatten(1, (1, 28, 28)), net).eval()
    states = [({f"1.{k}": v for k, v in sd.items()}, lr) for sd, lr in checkpoints]
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    task = AttributionTask(model, loss=nn.CrossEntropyLoss(reduction="none"), layers=layers)
    return {
        "name": "cnn",
        "task": task,
        "train": as_data(imgs, labels, "fashion-mnist-train"),
        "targets": as_data(t_imgs, t_labels, "fashion-mnist-test"),
        "checkpoints": states,
        "describe": f"ResNet (examples/fashion_mnist_cnn.py, BatchNorm in eval mode), attributed "
        f"conv+linear weights p={task.n_params:,}, Fashion-MNIST 28x28, trained 1 epoch (Adam) on the n points",
    }


def minilm_workload(n: int, n_targets: int, max_len: int, seed: int = 0) -> dict:
    """MiniLM, last encoder layer + linear head fine-tuned on reviews; the tail on cached prefix states."""
    from dataclasses import replace

    from torch import nn

    from ggda.applications.text import load_text_setup
    from ggda.models.text import TextTrainConfig, prefix_dataset, train_text_classifier
    from ggda.task import TextClassificationTask

    _, train_set, test_set, clf = load_text_setup(
        "sentiment",
        max(int(np.ceil(n / 0.8)) + 2, 5 * n_targets),
        True,
        max_len,
        0.2,
        seed,
        None,
        1,
        "linear",
        "cpu",
    )
    train_set = train_set.subset(np.arange(min(n, len(train_set))))
    test_set = test_set.subset(np.arange(n_targets))
    prefix = prefix_dataset(clf, train_set)
    cfg = TextTrainConfig(lp_epochs=5, ft_epochs=3, seed=seed)  # 3 epoch checkpoints for TracIn
    train_text_classifier(clf, train_set, replace(cfg, ft_epochs=0), prefix=prefix)
    with tempfile_dir() as tmp:  # fine-tuning saves tail checkpoints (TracIn)
        res = train_text_classifier(
            clf, train_set, replace(cfg, lp_epochs=0, checkpoint_every=1), prefix=prefix, checkpoint_dir=tmp
        )
        checkpoints = [(torch.load(c.path, weights_only=False)["state_dict"], c.lr) for c in res.checkpoints]
    tail = clf.tail().eval()
    checkpoints = checkpoints[-3:] or [({k: v.clone() for k, v in tail.state_dict().items()}, 1.0)]
    layers = [name for name, m in tail.named_modules() if isinstance(m, nn.Linear)]
    task = TextClassificationTask(tail, layers=layers)
    return {
        "name": "minilm",
        "task": task,
        "train": prefix,
        "targets": prefix_dataset(clf, test_set),
        "checkpoints": checkpoints,
        "describe": f"all-MiniLM-L6-v2, last encoder layer + linear head fine-tuned (3 epochs), {max_len} "
        f"tokens, attributed: the layer's 6 Linear maps + head, p={task.n_params:,} (LayerNorms fixed), "
        "on cached prefix states (exact: TextClassifier.tail), clothing reviews (balanced sentiment)",
    }


class tempfile_dir:
    def __enter__(self) -> str:
        import tempfile

        self._d = tempfile.TemporaryDirectory()
        return self._d.name

    def __exit__(self, *exc) -> None:
        self._d.cleanup()


# -- measurements ------------------------------------------------------------------------------------
def floor_pass(task, X: torch.Tensor, y: torch.Tensor, chunk: int) -> None:
    """One forward + backward of the summed loss over all rows, gradients for the attributed
    parameters only (the others are frozen for the pass)."""
    model = task.model
    named = dict(model.named_parameters())
    flags = {k: p.requires_grad for k, p in named.items()}
    attributed = set(task.param_names)
    for k, p in named.items():
        p.requires_grad_(k in attributed)
    try:
        for s in range(0, len(y), chunk):
            task.loss_fn(model(X[s : s + chunk]), y[s : s + chunk]).sum().backward()
    finally:
        for k, p in named.items():
            p.requires_grad_(flags[k])
            p.grad = None


def consume(task, data, grouping, max_batch: int) -> None:
    from ggda.gradients import iter_group_gradients

    seen = 0
    for gids, G in iter_group_gradients(task, data.X, data.y, grouping, max_batch=max_batch):
        seen += len(gids)
        G[:, :1].sum()
    assert seen == grouping.n_groups


def paired(fn, floor_fn, repeat: int) -> tuple[float, float, float]:
    """(median s, median ratio to the floor, median floor s) over back-to-back (floor, fn) pairs."""
    secs, ratios, floors = [], [], []
    for _ in range(repeat):
        t_floor = timed(floor_fn)[0]
        t = timed(fn)[0]
        secs.append(t)
        floors.append(t_floor)
        ratios.append(t / t_floor)
    return float(np.median(secs)), float(np.median(ratios)), float(np.median(floors))


def method_options(name: str, w: dict, max_batch: int, args) -> dict:
    """Options per method, identical for the per-point and the group runs."""
    opts: dict = {"max_batch": max_batch, "memory_mb": args.memory_mb}
    if name == "tracin":
        opts["checkpoints"] = w["checkpoints"]
    elif name == "ekfac":
        opts["fisher"] = args.ekfac_fisher
    elif name == "if-cg":
        opts["max_iter"] = args.cg_iter
    elif name.startswith("trak"):
        opts.update(proj_dim=args.trak_dim, ensemble="final", agreement=False)
        if name == "trak-kronecker":  # the LoGra-style sketch from layer factors (the example's choice)
            opts["projection"] = "kronecker"
    return opts


def run_model(w: dict, args, earlier: list[Table] = ()) -> list[Table]:
    from ggda.groups import Grouping, make_grouping
    from ggda.methods import make_method
    from ggda.properties import ExampleLoss

    task, train, name = w["task"], w["train"], w["name"]
    n = len(train)
    max_batch = args.max_batch
    Xt, yt = task.to_tensor(train.X, train.y)
    floor_fn = lambda: floor_pass(task, Xt, yt, max_batch)  # noqa: E731
    timed(floor_fn)  # warm-up
    Ks = [k for k in (n // 10, n // 100, n // 1000) if k >= 1]
    workload = f"{w['describe']}; n={n:,} training points, chunks of {max_batch} rows, fp32, 1 thread"

    from ggda.gradients.backend import gradient_backend

    backend = gradient_backend(task, Xt[:8], yt[:8]).name
    ftab = Table(
        f"[{name}] all K group gradients vs the floor",
        workload + f"; random groups; gradient backend: {backend}",
        ["K", "group size", "median s", "x floor", "floor s"],
    )
    from ggda.groups import random_grouping

    floors = []
    for K in [*Ks, n]:
        g = random_grouping(n, K, seed=0) if K < n else Grouping.singleton(n)
        t, r, f = paired(
            lambda g=g: consume(task, train, g, max_batch), floor_fn, args.repeat if K < n else 1
        )
        ftab.add(K, f"{n // K}", t, r, f)
        floors.append(f)
        print(f"  [{name}] group gradients K={K}: {t:.3f} s = {r:.2f}x floor ({f:.3f} s)", flush=True)
    ftab.notes.append(
        "x floor = median over back-to-back (floor, group gradients) pairs; bar: <= 2x for K <= n/10. "
        "K = n: per-example gradients."
    )

    prop = ExampleLoss(w["targets"].X, w["targets"].y)
    T = len(w["targets"])
    methods = [m for m in args.methods if m in METHODS]
    cols = ["method", "per point s", "per point / floor"]
    for gname in args.groupings:
        cols += [f"{gname} K={K} s" for K in Ks]
    cols += [f"speedup {gname} K={K}" for gname in args.groupings for K in Ks]
    mtab = Table(
        f"[{name}] group vs per-point attribution time per method",
        workload
        + f"; property = loss of {T} test examples ({T} score rows); time = grouping + cache + attribute",
        cols,
    )
    grouping_times: dict[str, float] = {}

    def grouping_for(gname: str, K: int):
        t0 = time.perf_counter()
        if gname == "random":
            g = make_grouping("random", train, n_groups=K, seed=0)
        else:
            g = make_grouping(gname, train, n_groups=K, task=task, seed=0)
        grouping_times[f"{gname} K={K}"] = time.perf_counter() - t0
        return g

    for mname in methods:
        opts = method_options(mname, w, max_batch, args)
        row: list = [mname]
        try:

            def once(make_g, mname=mname, opts=opts):
                return (
                    make_method(mname.split("-kronecker")[0], task, **opts)
                    .cache(train, make_g())
                    .attribute(prop)
                )

            t_pp, _, s_pp = timed(lambda once=once: once(lambda: Grouping.singleton(n)))
            t_floor = timed(floor_fn)[0]  # right after: the same machine load
            row += [t_pp, t_pp / t_floor]
            print(f"  [{name}] {mname} per point: {t_pp:.2f} s", flush=True)
            times = []
            for gname in args.groupings:
                for K in Ks:
                    if mname in args.bar_only and K != n // 100:
                        times.append(float("nan"))
                        continue
                    t, _, s_g = timed(
                        lambda K=K, gname=gname, once=once: once(lambda: grouping_for(gname, K))
                    )
                    times.append(t)
                    print(f"  [{name}] {mname} {gname} K={K}: {t:.2f} s ({t_pp / t:.1f}x)", flush=True)
                    if mname in ("grad-dot", "tracin") and gname == "random" and K == Ks[-1]:
                        g = grouping_for("random", K)  # linear methods: group score = Σ member scores
                        summed = np.zeros_like(s_g)
                        np.add.at(summed.T, g.labels, s_pp.T)
                        err = np.abs(summed - s_g).max() / np.abs(summed).max()
                        mtab.notes.append(
                            f"{mname}: group score = sum of per-point scores, max rel. error {err:.1e}"
                        )
            row += times + [t_pp / t for t in times]  # nan: not run (--bar-only)
        except Exception as e:  # a failing method is listed with its error, not hidden
            row.append(f"error: {type(e).__name__}: {str(e)[:100]}")
            row += [""] * (len(cols) - len(row))
        mtab.add(*row)
        save(args.out, [*earlier, ftab, mtab])  # partial results survive an interrupted run
    mtab.notes.append(
        "per point / floor: per-point time over one forward+backward of the summed loss timed right after "
        "it. Any exact group attribution costs at least the floor, so this bounds every group speedup "
        f"of the method on this workload (floor {float(np.median(floors)):.2f} s median in the table above)."
    )
    mtab.notes.append(
        "grouping seconds (included above): " + ", ".join(f"{k} {v:.2f}" for k, v in grouping_times.items())
    )
    mtab.notes.append(
        f"options: tracin {len(w['checkpoints'])} checkpoints; ekfac fisher={args.ekfac_fisher}; if-cg "
        f"max_iter={args.cg_iter}; trak proj_dim={args.trak_dim} (rademacher, final model; trak-kronecker: "
        f"projection=kronecker); memory_mb={args.memory_mb}; nan = not run ({', '.join(args.bar_only)}: "
        "per point and K = n/100 only)"
    )
    return [ftab, mtab]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("cnn", "minilm", "all"), default="all")
    ap.add_argument("--n-cnn", type=int, default=2000, help="CNN training points (default 2,000)")
    ap.add_argument("--n-minilm", type=int, default=500, help="MiniLM training reviews (default 500)")
    ap.add_argument("--max-len", type=int, default=64, help="MiniLM tokens per review (64-128)")
    ap.add_argument("--targets", type=int, default=10, help="test examples whose losses are attributed")
    ap.add_argument("--max-batch", type=int, default=256, help="training rows per forward/backward chunk")
    ap.add_argument("--memory-mb", type=float, default=1024.0, help="methods' memory budget")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--bar-only",
        default="ekfac,if-cg",
        help="methods run per point and at K = n/100 only (their curvature work does not depend on K; "
        "saves the compute budget); empty: every K",
    )
    ap.add_argument("--groupings", default=",".join(GROUPINGS))
    ap.add_argument("--cg-iter", type=int, default=5, help="IF-CG iterations")
    ap.add_argument("--trak-dim", type=int, default=2048, help="TRAK projection size (ggda's default)")
    ap.add_argument("--ekfac-fisher", default="expected", choices=("expected", "empirical"))
    ap.add_argument("--repeat", type=int, default=3, help="(floor, group gradients) pairs per K")
    ap.add_argument("--out", default="group_models", help="results/<out>.{txt,json}")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.bar_only = [m.strip() for m in args.bar_only.split(",") if m.strip()]
    args.groupings = [g.strip() for g in args.groupings.split(",") if g.strip()]
    torch.set_num_threads(1)
    tables: list[Table] = []
    for model in ("cnn", "minilm") if args.model == "all" else (args.model,):
        t0 = time.perf_counter()
        if model == "cnn":
            w = cnn_workload(args.n_cnn, args.targets)
        else:
            w = minilm_workload(args.n_minilm, args.targets, args.max_len)
        print(f"[{model}] workload ready in {time.perf_counter() - t0:.1f} s: {w['describe']}", flush=True)
        tables += run_model(w, args, tables)
        save(args.out, tables)  # partial results survive
        for t in tables[-2:]:
            print(t.render(), flush=True)
    print(save(args.out, tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
