"""Scale benchmark: executor scaling (local 1 vs 2 workers, Ray) and a 10⁶-point store attribution.

Two sections, each printing a table and returning a dict (``main`` writes them to JSON):

* ``jobs`` — the same set of small retraining jobs (MLP-S on random halves of the digits
  training split) run by ``local`` with 1 worker, ``local`` with 2 workers and ``ray`` (a private
  2-CPU local cluster; its start-up time is reported separately), all with 1 torch thread per
  worker. The results of every backend are checked to be bit-identical.
* ``store`` — a synthetic n = 10⁶-point classification problem (16 features, 2 classes) and an
  MLP-S (p = 2,434 parameters): per-example gradients are streamed into a chunked on-disk store
  through a Gaussian projection (d = 64), then 1,000 test targets are scored against it with a
  streamed top-10 / bottom-10, and self-influence is computed. Neither the n × p gradient matrix
  (9.7 GB in fp32) nor the 1,000 × n score matrix (4 GB) is ever allocated. Peak RSS
  (``getrusage``) and wall time are printed per phase; run this section in a fresh process
  (it is run first by ``main``) so the peak is this workload's.

Usage::

    python benchmarks/bench_scale.py                     # both sections, n = 10⁶
    python benchmarks/bench_scale.py --section store --n 100000
    python benchmarks/bench_scale.py --quick             # small sizes (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # job functions must be importable by spawned workers as benchmarks.*
    sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from common import peak_rss_mb  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- jobs section ------------------------------------------------------------------------------
def retrain_job(train, test, keep: np.ndarray, seed: int, epochs: int) -> dict:
    """One retraining: MLP-S on a subset; returns parameters and per-target test losses."""
    from ggda.models import TrainConfig, build_model, train_model

    sub = train.subset(keep)
    model = build_model("mlp-s", sub.n_features, sub.n_outputs, seed=seed)
    train_model(model, sub, TrainConfig(epochs=epochs, batch_size=32, lr=0.05, seed=seed))
    with torch.no_grad():
        out = model(torch.as_tensor(test.X))
        loss = torch.nn.functional.cross_entropy(out, torch.as_tensor(test.y), reduction="none")
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"params": params.numpy(), "test_loss": loss.numpy()}


def bench_jobs(n_jobs: int, epochs: int, with_ray: bool) -> dict:
    from benchmarks.bench_scale import retrain_job as job_fn  # importable name for workers

    from ggda.data.spec import DataSpec, prepare_data
    from ggda.execution import Job, LocalExecutor, ResultStore, job_key

    train, test, _ = prepare_data(DataSpec("digits"))
    rng = np.random.default_rng(0)
    config = {"bench": "scale", "model": "mlp-s", "epochs": epochs}
    jobs = [
        Job(
            job_key(config, unit=i, seed=i),
            job_fn,
            {
                "train": train,
                "test": test,
                "keep": np.sort(rng.choice(len(train), len(train) // 2, replace=False)),
                "seed": i,
                "epochs": epochs,
            },
        )  # fmt: skip
        for i in range(n_jobs)
    ]
    rows, stores = [], {}
    backends = [
        ("local, 1 worker", lambda: LocalExecutor(workers=1, threads_per_worker=1)),
        ("local, 2 workers", lambda: LocalExecutor(workers=2, threads_per_worker=1)),
    ]
    if with_ray:
        from ggda.execution.ray_backend import RayExecutor

        env = {"env_vars": {"PYTHONPATH": str(ROOT)}}  # workers import benchmarks.bench_scale
        backends.append(
            ("ray, 2 CPUs", lambda: RayExecutor(num_cpus=2, threads_per_worker=1, runtime_env=env))
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in backends:
            executor = make()
            startup = 0.0
            if hasattr(executor, "connect"):
                t0 = time.perf_counter()
                executor.connect()
                startup = time.perf_counter() - t0
            store = ResultStore(Path(tmp) / name.replace(" ", "").replace(",", "_"))
            t0 = time.perf_counter()
            executor.run(jobs, store)
            seconds = time.perf_counter() - t0
            if hasattr(executor, "close"):
                executor.close()
            stores[name] = store
            job_seconds = sum(float(store.get(j.key)[1]["seconds"]) for j in jobs)
            rows.append({"backend": name, "jobs": n_jobs, "seconds": seconds, "startup_seconds": startup,
                         "job_seconds": job_seconds, "concurrency": job_seconds / seconds,
                         "loadavg_1min_after": os.getloadavg()[0]})  # fmt: skip
        ref = stores[rows[0]["backend"]]
        for row in rows:
            other = stores[row["backend"]]
            row["identical"] = all(
                np.array_equal(ref.get(j.key)[0]["params"], other.get(j.key)[0]["params"]) for j in jobs
            )
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_1_worker"] = base / row["seconds"]
    print(
        f"\n== jobs: {n_jobs} retrainings (MLP-S, {len(train) // 2} points, {epochs} epochs), 1 thread per worker =="
    )
    print("(job s = sum of per-job durations; concurrency = job s / run s: ~2 means two jobs ran at once)")
    print(
        f"{'backend':18s} {'run s':>8s} {'start s':>8s} {'jobs/s':>7s} {'speedup':>8s} {'job s':>8s} {'conc.':>6s} identical"
    )
    for r in rows:
        print(
            f"{r['backend']:18s} {r['seconds']:8.2f} {r['startup_seconds']:8.2f} {n_jobs / r['seconds']:7.2f} "
            f"{r['speedup_vs_1_worker']:8.2f} {r['job_seconds']:8.2f} {r['concurrency']:6.2f} {r['identical']}"
        )
    print(f"1-min load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return {"n_jobs": n_jobs, "epochs": epochs, "cpu_count": os.cpu_count(), "rows": rows}


# -- store section -----------------------------------------------------------------------------
def bench_store(n: int, n_targets: int, proj_dim: int, top_k: int) -> dict:
    from ggda.data.dataset import Dataset
    from ggda.models import TrainConfig, build_model, train_model
    from ggda.properties import ExampleLoss
    from ggda.store import build_gradient_store, score_store, self_scores, target_features
    from ggda.task import AttributionTask

    phases = []

    def mark(name: str, t0: float, **extra) -> None:
        phases.append({"phase": name, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                       "rss_mb": rss_mb(), **extra})  # fmt: skip

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    d_in = 16
    w = rng.normal(size=d_in)
    X = rng.normal(size=(n, d_in)).astype(np.float32)
    y = (X @ w + rng.normal(scale=2.0, size=n) > 0).astype(np.int64)
    Xt = rng.normal(size=(n_targets, d_in)).astype(np.float32)
    yt = (Xt @ w > 0).astype(np.int64)
    fit = Dataset(X[:20000], y[:20000], name="synthetic", n_classes=2)
    model = build_model("mlp-s", d_in, 2, seed=0)
    train_model(model, fit, TrainConfig(epochs=2, batch_size=128, lr=0.05))
    task = AttributionTask(model)
    p = task.n_params
    mark("data + model", t0, n=n, p=p)

    with tempfile.TemporaryDirectory(dir=os.environ.get("GGDA_BENCH_TMP")) as tmp:
        t0 = time.perf_counter()
        store = build_gradient_store(
            Path(tmp) / "store", task, X, y, projection="gaussian", proj_dim=proj_dim, memory_mb=128.0
        )
        disk = sum(f.stat().st_size for f in (Path(tmp) / "store" / "chunks").iterdir())
        mark("build store (per-example grads -> projection -> disk)", t0, chunks=store.n_chunks,
             store_mb=disk / 2**20)  # fmt: skip

        t0 = time.perf_counter()
        Q = target_features(store, task, ExampleLoss(Xt, yt))
        res = score_store(store, Q, top_k=top_k, bottom_k=top_k)
        mark(f"score {n_targets} targets, streamed top/bottom-{top_k}", t0)
        assert res.scores is None and res.top_indices.shape == (n_targets, top_k)

        t0 = time.perf_counter()
        selfinf = self_scores(store)
        mark("self-influence (chunked)", t0)
        assert selfinf.shape == (n,)

    avoided = {"n_x_p_fp32_gb": n * p * 4 / 1e9, "scores_fp32_gb": n_targets * n * 4 / 1e9}
    print(
        f"\n== store: n={n:,} training points, p={p:,} parameters, projected to d={proj_dim}, {n_targets} targets =="
    )
    print(
        f"never allocated: n x p gradients {avoided['n_x_p_fp32_gb']:.1f} GB, score matrix {avoided['scores_fp32_gb']:.1f} GB"
    )
    print(f"{'phase':55s} {'seconds':>8s} {'peak RSS MB':>12s}")
    for ph in phases:
        print(f"{ph['phase']:55s} {ph['seconds']:8.2f} {ph['peak_rss_mb']:12.0f}")
    return {"n": n, "p": p, "proj_dim": proj_dim, "n_targets": n_targets, "top_k": top_k, "avoided": avoided,
            "phases": phases, "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    """Run the sections asked for; print tables; write JSON to ``--out``; return the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("all", "jobs", "store"), default="all")
    parser.add_argument("--n", type=int, default=1_000_000, help="training points of the store section")
    parser.add_argument("--targets", type=int, default=1_000)
    parser.add_argument("--proj-dim", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=48, help="retraining jobs of the jobs section")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray backend")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.targets, args.jobs, args.epochs = 50_000, 100, 6, 3
    results: dict = {
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_at_start": os.getloadavg()[0],  # other work on the machine makes timings noisy
    }
    if args.section in ("all", "store"):
        results["store"] = bench_store(args.n, args.targets, args.proj_dim, args.top_k)
    if args.section in ("all", "jobs"):
        try:
            import ray  # noqa: F401

            with_ray = not args.no_ray
        except ImportError:
            with_ray = False
        results["jobs"] = bench_jobs(args.jobs, args.epochs, with_ray)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
