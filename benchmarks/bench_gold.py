"""Benchmark: stacked (vectorised) further training vs a sequential loop of the same runs.

``python benchmarks/bench_gold.py [--runs 100] [--n 8000] [--device cpu] [--threads 1]
[--kernel auto|mlp|vmap] [--compare-vmap] [--repeats 3]``

The issue's setting: R further-training runs (one left-out point each, ``mask`` removal, SGD) of
an MLP 100→128→128→2 on n = 8,000 synthetic points, batch 128, one epoch, float32. Prints one
JSON object: seconds for both paths (the vectorised path: median of ``--repeats`` timings; the
sequential loop is timed on ``--seq-runs`` runs and scaled to R), the speedup, the batched path's
achieved FLOP/s (Linear-layer FLOPs of the steps it actually executed) as a fraction of a plain
large matmul measured in the same process (median of ``--repeats``), the largest difference
between the two paths' property values, the gradient kernel used (``mlp``: the hand-written
stacked MLP; ``vmap``: ``vmap(grad)``) and the load average before and after (the machine may be
shared). ``--compare-vmap`` also times the generic ``vmap`` kernel on the same runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from torch import nn


def linear_flops_per_example(model: nn.Module) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs per example of the Linear layers (first layer: no input grad)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    fwd = sum(2.0 * m.in_features * m.out_features for m in layers)
    bwd = fwd + sum(2.0 * m.in_features * m.out_features for m in layers[1:])
    return fwd, fwd + bwd


def matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 1.5) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2.0 * size**3 * reps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seq-runs", type=int, default=20, help="sequential runs actually timed")
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--d", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=0, help="runs per stacked model (0: all)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-fork", action="store_true", help="train every run from step 1 (no sharing)")
    parser.add_argument("--kernel", default="auto", choices=["auto", "mlp", "vmap"])
    parser.add_argument("--compare-vmap", action="store_true", help="also time the vmap(grad) kernel")
    parser.add_argument("--repeats", type=int, default=3, help="vectorised/matmul timings (median)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    from ggda.data.grouping import Grouping
    from ggda.gold import GoldConfig, select_units
    from ggda.gold.problem import make_problem
    from ggda.gold.removal import fork_steps, steps_per_epoch
    from ggda.gold.sequential import train_sequential
    from ggda.gold.vectorised import resolve_kernel, train_vectorised
    from ggda.models.zoo import build_model
    from ggda.properties import ExampleLoss
    from ggda.task import AttributionTask

    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.n, args.d)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] * X[:, 2] + 0.5 * rng.normal(size=args.n) > 0).astype(np.int64)
    model = build_model("mlp-m", args.d, 2, seed=0)
    task = AttributionTask(model, device=args.device)
    prop = ExampleLoss(X[:20], y[:20])
    units = select_units(Grouping.singleton(args.n), n_units=args.runs, seed=0)
    chunk = args.chunk or args.runs
    config = GoldConfig(
        epochs=args.epochs, lr=1e-3, batch_size=args.batch_size, dtype=args.dtype, chunk=chunk
    )
    problem = make_problem(task, X, y, prop, units, config, "vectorised", chunk)
    dev = problem.task.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    labels = [str(i) for i in range(args.runs)]

    def time_vectorised(kernel: str) -> tuple[float, np.ndarray]:
        train_vectorised(problem, 0, units.members[:2], labels[:2], kernel=kernel)  # warm-up
        times = []
        for _ in range(max(1, args.repeats)):
            sync()
            t0 = time.perf_counter()
            out = [
                train_vectorised(
                    problem,
                    0,
                    units.members[a : a + chunk],
                    labels[a : a + chunk],
                    fork=not args.no_fork,
                    kernel=kernel,
                )
                for a in range(0, args.runs, chunk)
            ]
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), np.concatenate(out, axis=-1)

    kernel = resolve_kernel(problem, args.kernel)
    t_vec, vec = time_vectorised(kernel)
    t_vmap = time_vectorised("vmap")[0] if args.compare_vmap and kernel != "vmap" else None

    k = min(args.seq_runs, args.runs)
    t0 = time.perf_counter()
    seq = train_sequential(problem, 0, units.members[:k], labels[:k])
    sync()
    t_seq = (time.perf_counter() - t0) * args.runs / k

    nb = steps_per_epoch(args.n, args.batch_size)
    total_steps = nb * args.epochs
    executed = 0
    for a in range(0, args.runs, chunk):
        runs = [None, *units.members[a : a + chunk]]
        starts = [1] * len(runs) if args.no_fork else fork_steps(args.n, runs, config, 0)
        executed += sum(total_steps - s + 1 for s in starts)
    _, per_example = linear_flops_per_example(problem.task.model)
    flops = executed * args.batch_size * per_example
    peak = statistics.median(
        matmul_flops(dev, problem.task.dtype, seconds=1.0) for _ in range(max(1, args.repeats))
    )
    out = {
        "device": str(dev),
        "threads": args.threads,
        "kernel": kernel,
        "runs": args.runs,
        "chunk": chunk,
        "steps_per_run": total_steps,
        "dtype": args.dtype,
        "fork": not args.no_fork,
        "sequential_seconds": round(t_seq, 3),
        "sequential_ms_per_step": round(1000 * t_seq / (args.runs * total_steps), 3),
        "vectorised_seconds": round(t_vec, 3),
        "speedup": round(t_seq / t_vec, 2),
        "executed_run_steps": executed,
        "vectorised_gflops": round(flops / t_vec / 1e9, 2),
        "matmul_gflops": round(peak / 1e9, 2),
        "fraction_of_matmul": round(flops / t_vec / peak, 3),
        "max_abs_diff_vs_sequential": float(np.abs(vec[..., :k] - seq).max()),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if t_vmap is not None:
        out["vmap_seconds"] = round(t_vmap, 3)
        out["vmap_fraction_of_matmul"] = round(flops / t_vmap / peak, 3)
        out["mlp_over_vmap"] = round(t_vmap / t_vec, 2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
