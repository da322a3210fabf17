"""ggda vs dattri 0.3.0 per point on the ResNet CNN of ``bench_group_models.py`` (issue #20, item 3).

Same trained ResNet (``examples/fashion_mnist_cnn.py``, BatchNorm in eval mode), same n training
images and the same test targets as the ``[cnn]`` tables of ``bench_group_models.py``, same
attributed parameters (conv + linear weights, p = 77,082; dattri differentiates only parameters
with ``requires_grad``, so BatchNorm's are frozen in its worker too):

* **Grad-Dot** per point: ggda's default (per-example gradients from layer factors, grouped
  convolution weight gradients) vs dattri's ``TracInAttributor`` on the final model with exact
  gradients (no projection; ``vmap`` over per-example gradients). Agreement: max relative error.
* **TRAK** per point: k = 2,048 Rademacher in both (dattri's ``proj_type="rademacher"``), margin
  output, ridge λ_dattri = λ_ggda / p (dattri scales gradients by 1/√p). The two libraries draw
  different random matrices, so agreement is Spearman's rank correlation, next to that of two ggda
  runs differing only in the projection seed.
* ggda's TRAK with ``projection="kronecker"`` (its fastest per-point TRAK, a different sketch) is
  listed for reference, without a dattri counterpart.

dattri runs in ``benchmarks/.venv-dattri`` through ``dattri_worker.py`` (the mechanism of
``bench_dattri.py``; the worker takes the ResNet's class definitions from the example's source).
Its training loader has ``--dattri-batch`` rows (its per-example gradients of a CNN hold every
activation for the whole batch). Times are ``cache`` + ``attribute``; the floor (one forward +
backward of the summed loss over the n points, chunks of 256) is timed right before each ggda run.

    python benchmarks/bench_dattri_cnn.py --n 1000 --targets 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_dattri import ensure_venv, run_dattri, spearman  # noqa: E402
from bench_group_models import cnn_workload, floor_pass  # noqa: E402
from common import Table, save, timed  # noqa: E402


def ggda_run(task, train, prop, method: str, opts: dict):
    """(seconds, peak MB, method object, scores) of one per-point ggda attribution."""
    from ggda.groups import Grouping
    from ggda.methods import make_method

    def go():
        m = make_method(method, task, **opts).cache(train, Grouping.singleton(len(train)))
        return m, m.attribute(prop)

    t, mb, (obj, scores) = timed(go)
    return t, mb, obj, scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="training images (bench_group_models' quick n)")
    ap.add_argument("--targets", type=int, default=10, help="test images whose losses are attributed")
    ap.add_argument("--trak-dim", type=int, default=2048, help="TRAK projection size in both libraries")
    ap.add_argument("--dattri-batch", type=int, default=100, help="dattri's training-loader batch")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per dattri run")
    ap.add_argument("--out", default="dattri_cnn", help="results/<out>.{txt,json}")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    w = cnn_workload(args.n, args.targets)
    task, train, targets = w["task"], w["train"], w["targets"]
    from ggda.properties import ExampleLoss

    prop = ExampleLoss(targets.X, targets.y)
    Xt, yt = task.to_tensor(train.X, train.y)
    floor_fn = lambda: floor_pass(task, Xt, yt, 256)  # noqa: E731
    timed(floor_fn)  # warm-up
    table = Table(
        "[cnn] ggda vs dattri 0.3.0, per point",
        f"{w['describe']}; n={args.n:,} training images x T={args.targets} test targets, fp32, cpu, 1 thread; "
        f"dattri training loader batch {args.dattri_batch}, test batch {args.targets}",
        ["method", "ggda s", "ggda / floor", "ggda MB", "dattri s", "dattri MB", "dattri/ggda", "agreement"],
    )
    why = ensure_venv()
    trak = {"proj_dim": args.trak_dim, "projection": "rademacher", "ensemble": "final", "agreement": False}
    cases = [
        ("grad-dot", "grad-dot", {}),
        ("trak", "trak", trak),
        ("trak (kronecker)", "trak", {**trak, "projection": "kronecker"}),
    ]
    for label, method, opts in cases:
        t_floor = timed(floor_fn)[0]
        print(f"  {label}: ggda ...", flush=True)
        t_g, mb_g, obj, s_g = ggda_run(task, train, prop, method, opts)
        row = [label, t_g, t_g / t_floor, mb_g]
        print(f"  {label}: ggda {t_g:.2f} s ({t_g / t_floor:.1f} floors)", flush=True)
        if label.endswith("(kronecker)") or why:
            table.add(*row, "", "", "", "no dattri counterpart" if not why else f"dattri: {why}")
            continue
        job = {
            "method": method,
            "arch": "resnet",
            "attributed": np.asarray(task.param_names),
            "Xtr": np.asarray(train.X, np.float32),
            "ytr": np.asarray(train.y),
            "Xte": np.asarray(targets.X, np.float32),
            "yte": np.asarray(targets.y),
            "train_bs": args.dattri_batch,
            "test_bs": args.targets,
            "regularization": 0.0,
            "proj_dim": args.trak_dim,
            "proj_type": "rademacher",
        }
        if method == "trak":  # dattri divides gradients by sqrt(p) before projecting
            job["regularization"] = float(obj.members[0].ridge) / task.n_params
        net = task.model[1]  # the ResNet inside Sequential(Unflatten, ResNet): the worker's layout
        job.update({f"param::1.{k}": v.detach().numpy() for k, v in net.state_dict().items()})
        print(f"  {label}: dattri ...", flush=True)
        try:
            d = run_dattri(job, timeout=args.timeout)
        except Exception as e:  # a failing run is listed with its error, not hidden
            table.add(*row, "failed", "", "", f"{type(e).__name__}: {str(e)[:120]}")
            continue
        s_d = d["scores"].T  # (T, n) like ggda
        if method == "grad-dot":
            agree = f"max rel err {np.abs(s_g - s_d).max() / np.abs(s_d).max():.1e}"
        else:
            s_g1 = ggda_run(task, train, prop, method, {**opts, "seed": 1})[3]
            per_target = np.mean([spearman(a, b) for a, b in zip(s_g, s_d, strict=True)])
            seeds = np.mean([spearman(a, b) for a, b in zip(s_g, s_g1, strict=True)])
            agree = (
                f"spearman {spearman(s_g, s_d):.3f}, per-target mean {per_target:.3f} "
                f"(ggda seed 0 vs 1: {seeds:.3f})"
            )
        table.add(*row, d["seconds"], d["peak_mb"], d["seconds"] / t_g, agree)
        print(" ", table.rows[-1], flush=True)
        save(args.out, [table])  # partial results survive an interrupted run
    table.notes += [
        "ggda s and dattri s: cache + attribute (dattri's inside its worker: imports and data transfer "
        "excluded); ggda MB: peak RSS growth during the run; dattri MB: the worker's peak RSS (whole process).",
        "ggda / floor: over one forward + backward of the summed loss (n points, chunks of 256) timed just before.",
        f"TRAK: k = {args.trak_dim} Rademacher in both, margin output, dattri regularization = ggda's ridge / p; "
        "trak (kronecker): ggda's LoGra-style sketch from layer factors (a different sketch, for reference).",
    ]
    print(table.render(), flush=True)
    print(save(args.out, [table]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
