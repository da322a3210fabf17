"""TRAK ensembles at sub-linear cost (issue #20, item 4): time and LDS vs the number of models M.

M independently trained models (same architecture and recipe, training seeds 0..M−1) on a bundled
data set; per-point TRAK over the first M of them for every M in ``--ms``:

* ggda, one shared projection (default: one seeded P, generated once; the members' gradients are
  traversed together and projected in the same passes over P; per point, the MLP's input layer is
  projected once for all members, ``info["shared_input_layer"]``);
* ggda with ``member_seeds=True`` (member m has its own P, seed + m, projected separately), the
  A/B of the shared pass, timed alternately in the same process;
* dattri 0.3.0's ``TRAKAttributor`` on the same models (``checkpoints`` = their state dicts),
  same projection dimension and the same ridge (ggda's resolved λ, divided by p because dattri
  scales gradients by 1/√p), run in ``benchmarks/.venv-dattri`` (created by
  ``bench_dattri.ensure_venv``) by this script's ``--dattri-worker`` mode.

LDS (:func:`ggda.evaluate.lds`): the same random half-subsets of the training points for every M
and method (``--subsets`` × 1 retraining seed, the models' own recipe), Spearman per target over
the subsets, mean over the first ``--targets`` test points; with ``--groups K`` the same for K
Grad-K-Means groups (ggda only). Times are ``cache`` + ``attribute`` (one torch thread, warm
process, best of ``--repeat``; ggda's split-half seed agreement off, as dattri computes none), wall
and process CPU seconds (the CPU time is the work done, less disturbed by other processes on a
shared machine). Results: ``benchmarks/results/trak_ensemble.{txt,json}``.

    .venv/bin/python benchmarks/bench_trak_ensemble.py                 # digits, mlp-s, M = 1, 5, 20
    .venv/bin/python benchmarks/bench_trak_ensemble.py --proj-dim 2048 --no-dattri --name trak_ensemble_k2048
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# -- dattri side (runs inside benchmarks/.venv-dattri: torch + dattri only, no ggda) ---------------
def dattri_worker(job_path: str, out_path: str) -> None:
    """Run dattri's TRAKAttributor over the M models in JOB; write scores (n_train, T) and seconds."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from dattri.algorithm import TRAKAttributor
    from dattri.task import AttributionTask
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    job = np.load(job_path, allow_pickle=False)
    n_models = int(job["n_models"])
    states = [
        {k.split("::", 2)[2]: torch.as_tensor(job[k]) for k in job.files if k.startswith(f"param::{m}::")}
        for m in range(n_models)
    ]
    w0, w1 = states[0]["0.weight"], states[0]["2.weight"]
    model = nn.Sequential(nn.Linear(w0.shape[1], w0.shape[0]), nn.ReLU(), nn.Linear(w1.shape[1], w1.shape[0]))
    model.load_state_dict(states[0])
    model.eval()
    Xtr, ytr = torch.as_tensor(job["Xtr"]), torch.as_tensor(job["ytr"]).long()
    Xte, yte = torch.as_tensor(job["Xte"]), torch.as_tensor(job["yte"]).long()

    from dattri_worker import trak_functions  # this folder; the worker runs in the dattri venv

    margin_func, correct_prob = trak_functions(model)

    t0, c0 = time.perf_counter(), time.process_time()
    task = AttributionTask(loss_func=margin_func, model=model, checkpoints=states)
    attr = TRAKAttributor(
        task,
        correct_probability_func=correct_prob,
        projector_kwargs={"proj_dim": int(job["proj_dim"]), "device": "cpu"},
        regularization=float(job["regularization"]),
    )
    attr.cache(DataLoader(TensorDataset(Xtr, ytr), batch_size=int(job["train_bs"]), shuffle=False))
    scores = attr.attribute(DataLoader(TensorDataset(Xte, yte), batch_size=len(Xte), shuffle=False))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.savez(out_path, scores=scores.detach().numpy(), seconds=seconds, cpu=cpu)


def run_dattri(models, train, test, proj_dim: int, regularization: float, timeout: float) -> dict:
    """dattri's TRAK on ``models`` in its own venv; ``{"scores": (T, n), "seconds": ...}``."""
    from bench_dattri import PY

    job = {
        "n_models": len(models),
        "Xtr": train.X.astype(np.float32),
        "ytr": train.y,
        "Xte": test.X.astype(np.float32),
        "yte": test.y,
        "proj_dim": proj_dim,
        "regularization": regularization,
        "train_bs": 500,
    }
    for m, model in enumerate(models):
        job.update({f"param::{m}::{k}": v.detach().numpy() for k, v in model.state_dict().items()})
    with tempfile.TemporaryDirectory() as tmp:
        jp, op = Path(tmp) / "job.npz", Path(tmp) / "out.npz"
        np.savez(jp, **job)
        r = subprocess.run(
            [str(PY), str(Path(__file__).resolve()), "--dattri-worker", str(jp), str(op)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        )
        if r.returncode != 0:
            raise RuntimeError(f"dattri worker failed: {r.stderr.strip().splitlines()[-1:]}")
        out = np.load(op)
        return {"scores": out["scores"].T, "seconds": float(out["seconds"]), "cpu": float(out["cpu"])}


# -- ggda side -------------------------------------------------------------------------------------
def run(
    quick: bool = True,
    data: str = "digits",
    model: str = "mlp-s",
    ms: tuple[int, ...] = (1, 5, 20),
    proj_dim: int = 512,
    epochs: int = 20,
    n_subsets: int = 25,
    n_targets: int = 50,
    repeat: int = 2,
    dattri: bool = True,
    groups: int = 144,
    store: str | None = None,
):
    """Tables of time and LDS vs M (``quick`` is accepted for ``run_all``; the workload is the same)."""
    from common import Table

    from ggda.data.grouping import Grouping
    from ggda.data.spec import DataSpec, prepare_data
    from ggda.evaluate import Retrainer, RetrainSpec, lds
    from ggda.execution import SerialExecutor
    from ggda.groups import make_grouping
    from ggda.methods.trak import TRAK
    from ggda.models import ModelSpec, TrainConfig, build_model, train_model
    from ggda.properties import ExampleLoss
    from ggda.task import AttributionTask

    train, test = prepare_data(DataSpec(data))[:2]
    spec = ModelSpec(model, train.n_features, train.n_outputs, train.input_shape)
    t0 = time.perf_counter()
    models = []
    for seed in range(max(ms)):
        net = build_model(spec, seed=seed)
        train_model(net, train, TrainConfig(epochs=epochs, seed=seed))
        models.append(net.eval())
    t_train = time.perf_counter() - t0
    task = AttributionTask(models[0])
    targets = test.subset(np.arange(min(n_targets, len(test))))
    prop = ExampleLoss(targets.X, targets.y)
    p, n, T = task.n_params, len(train), len(targets)
    print(f"trained {len(models)} x {model} on {data} (p={p:,}, n={n:,}) in {t_train:.1f} s", flush=True)

    def ggda(M: int, member_seeds: bool, grouping) -> tuple[tuple[float, float], np.ndarray, TRAK]:
        best, best_cpu, out = float("inf"), float("inf"), None
        for _ in range(repeat):
            trak = TRAK(
                task,
                proj_dim=proj_dim,
                models=models[:M],
                ensemble="models",
                member_seeds=member_seeds,
                agreement=False,
            )
            t, c = time.perf_counter(), time.process_time()
            s = trak.cache(train, grouping).attribute(prop)
            best, out = min(best, time.perf_counter() - t), (s, trak)
            best_cpu = min(best_cpu, time.process_time() - c)
        return (best, best_cpu), out[0], out[1]

    def ggda_all(grouping) -> tuple[dict, dict, dict]:
        scores: dict[str, np.ndarray] = {}
        times: dict[str, float] = {}
        ridges: dict[int, float] = {}
        for M in ms:  # shared and per-member P alternate for each M (same load for the A/B)
            for member_seeds in (False, True):
                if M == 1 and member_seeds:
                    continue  # identical to the shared run
                label = f"ggda M={M} " + ("member P" if member_seeds else "shared P")
                t, s, trak = ggda(M, member_seeds, grouping)
                times[label], scores[label] = t, s
                if not member_seeds:
                    ridges[M] = float(np.mean([m.ridge for m in trak.members]))
                print(f"  K={grouping.n_groups} {label}: {t[0]:.2f} s ({t[1]:.2f} s cpu)", flush=True)
        return times, scores, ridges

    points = Grouping.singleton(n)
    ggda(1, False, points)  # warm-up: lazy torch.func imports, first-touch of buffers (not timed)
    times, scores, ridges = ggda_all(points)
    why = None
    if dattri:
        from bench_dattri import ensure_venv

        why = ensure_venv()
        for M in ms if why is None else ():
            label = f"dattri M={M}"
            try:
                d = run_dattri(models[:M], train, targets, proj_dim, ridges[M] / p, timeout=1800)
            except Exception as e:  # reported in the table, not hidden
                why = f"{label}: {type(e).__name__}: {str(e)[:200]}"
                break
            times[label], scores[label] = (d["seconds"], d["cpu"]), d["scores"]
            print(f"  {label}: {d['seconds']:.2f} s ({d['cpu']:.2f} s cpu)", flush=True)
    runs = [("points", points, times, scores)]
    if groups:
        grouping = make_grouping("grad-kmeans", train, n_groups=groups, task=task, per_class=True, seed=0)
        g_times, g_scores, _ = ggda_all(grouping)
        runs.append((f"{grouping.n_groups} Grad-K-Means groups (of model 0)", grouping, g_times, g_scores))

    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        retrainer = Retrainer(
            RetrainSpec(spec, TrainConfig(epochs=epochs)), store or tmp, SerialExecutor(), train, test
        )
        for _, grouping, _, sc in runs:
            results.append(lds(retrainer, sc, grouping, n_subsets=n_subsets, seeds=[0], targets=np.arange(T)))
        retrainer.close()
    t_lds = time.perf_counter() - t0
    print(f"LDS retrains: {n_subsets} subsets per grouping in {t_lds:.1f} s", flush=True)

    tables = []
    first, last = ms[0], ms[-1]
    for (units, grouping, times, _), res in zip(runs, results, strict=True):
        table = Table(
            f"TRAK ensembles: time and LDS vs number of models M ({units})",
            f"data={data}, n={n:,} train, K={grouping.n_groups:,} units, T={T} test-loss targets; {model} "
            f"(p={p:,}) x M independently trained ({epochs} epochs, seeds 0..M-1); proj_dim={proj_dim}; LDS: "
            f"{n_subsets} half-subsets of the units x 1 seed (same subsets for every row); fp32, cpu, 1 thread",
            ["M", "method", "seconds", "cpu s", "cpu s / model", "cpu vs M=1", "LDS", "LDS sem"],
        )
        base = {"ggda": times[f"ggda M={first} shared P"][1] / first}
        if f"dattri M={first}" in times:
            base["dattri"] = times[f"dattri M={first}"][1] / first
        for label, (t, c) in times.items():
            M = int(label.split("M=")[1].split()[0])
            method = label.replace(f" M={M}", "")
            table.add(M, method, t, c, c / M, c / base[label.split()[0]], res[label].score, res[label].sem)
        table.rows.sort(key=lambda r: (r[1], r[0]))

        def ratio(a: str, b: str, times: dict = times) -> str:
            return f"{times[a][1] / times[b][1]:.2f} cpu ({times[a][0] / times[b][0]:.2f} wall)"

        table.notes.append(
            f"ggda shared P: time(M={last}) / time(M={first}) = "
            f"{ratio(f'ggda M={last} shared P', f'ggda M={first} shared P')} (linear: {last / first:g})"
        )
        if last > 1:
            table.notes.append(
                f"M={last}: per-member P / shared P time = "
                f"{ratio(f'ggda M={last} member P', f'ggda M={last} shared P')} (same process, alternated)"
            )
        if f"dattri M={last}" in times:
            table.notes.append(
                f"dattri: time(M={last}) / time(M={first}) = {ratio(f'dattri M={last}', f'dattri M={first}')}; "
                f"dattri / ggda at M={last}: {ratio(f'dattri M={last}', f'ggda M={last} shared P')}"
            )
        table.notes += [
            "cpu s = process CPU time (one thread, so the work done; less sensitive to other processes than "
            "wall seconds); cpu vs M=1 = cpu s / (the library's M=1 cpu s): linear cost would give M.",
            f"training the {len(models)} models took {t_train:.1f} s, all LDS retrains {t_lds:.1f} s (not in the table).",
            f"ggda: cache + attribute, best of {repeat}, split-half seed agreement off, average='scores' (mean of "
            "member scores).",
        ]
        if units == "points" and dattri:
            table.notes += [
                "dattri: its cache + attribute inside the worker (imports and data transfer excluded), one run; "
                "same ridge (ggda's mean resolved λ / p: dattri scales gradients by 1/sqrt(p)); one P per model "
                "(seed + 1e5·m); averages as the TRAK paper (mean un-weighted scores x mean residuals).",
            ]
            if why:
                table.notes.append(f"dattri not run: {why}")
        print(table.render(), flush=True)
        tables.append(table)
    return tables


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits", help="bundled data set (ggda datasets), default digits")
    ap.add_argument(
        "--model", default="mlp-s", help="zoo MLP (mlp-s: dattri's worker rebuilds it), default mlp-s"
    )
    ap.add_argument("--ms", default="1,5,20", help="ensemble sizes M, comma-separated (default 1,5,20)")
    ap.add_argument("--proj-dim", type=int, default=512, help="projection dimension k (both libraries)")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs of every model and retrain")
    ap.add_argument("--subsets", type=int, default=25, help="LDS subsets (1 retraining seed each)")
    ap.add_argument("--targets", type=int, default=50, help="test-loss targets (first test points)")
    ap.add_argument("--repeat", type=int, default=2, help="ggda timings: best of this many")
    ap.add_argument("--groups", type=int, default=144, help="also K Grad-K-Means groups (ggda only); 0: skip")
    ap.add_argument("--no-dattri", action="store_true", help="skip dattri")
    ap.add_argument(
        "--store", default=None, help="LDS retrain store (reused by later runs); default: a temporary one"
    )
    ap.add_argument("--name", default="trak_ensemble", help="results file name under benchmarks/results/")
    ap.add_argument("--dattri-worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dattri_worker:
        dattri_worker(*args.dattri_worker)
        return 0
    sys.path.insert(0, str(HERE))
    import common  # noqa: F401  (one torch thread before torch is used)

    tables = run(
        data=args.data,
        model=args.model,
        ms=tuple(int(m) for m in args.ms.split(",")),
        proj_dim=args.proj_dim,
        epochs=args.epochs,
        n_subsets=args.subsets,
        n_targets=args.targets,
        repeat=args.repeat,
        dattri=not args.no_dattri,
        groups=args.groups,
        store=args.store,
    )
    print(common.save(args.name, tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
