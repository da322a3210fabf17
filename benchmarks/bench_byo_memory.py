"""Peak memory of attributing the Fashion-MNIST ResNet of ``examples/fashion_mnist_cnn.py``.

Issue 15 asks that attributing the full Fashion-MNIST CNN through a torch ``Dataset`` take less
memory than the float32 input matrix (n × 784 × 4 bytes: 179 MiB = 188 MB at n = 60,000), i.e.
that no method builds a whole-set float tensor. Each method runs in a **fresh process** (the
example's own ``attribute`` code path, the same options): it loads the uint8 images and the
trained model, runs a 64-image warm-up (first-use imports of ``torch.func`` and friends, reported
separately), then the Grad-K-Means grouping, the per-point and the group attribution of
``--targets`` test losses, each with its own peak resident memory (VmHWM reset per phase) above
the level after the warm-up.

Usage::

    python benchmarks/bench_byo_memory.py                        # n = 60,000 (trains 1 epoch first)
    python benchmarks/bench_byo_memory.py --model runs/fashion-cnn/model.pt   # the example's model
    python benchmarks/bench_byo_memory.py --n 10000 --methods tracin,trak
    python benchmarks/bench_byo_memory.py --malloc-mmap 131072   # glibc returns freed blocks >= 128 KiB

``--malloc-mmap`` pins glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_``) in the workers: by
default glibc raises it after large frees and keeps freed tensors in the heap, so RSS after one
phase stays high and adds to the next phase's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))

import fashion_mnist_cnn as ex  # noqa: E402
import torch  # noqa: E402
from common import Table, save  # noqa: E402  (one torch thread)


def _data(n: int, targets: int):
    train_set = ex.FashionImages(*ex.load_split("train", n))
    test_set = ex.FashionImages(*ex.load_split("test", targets))
    return train_set, test_set


def worker(args) -> dict:
    """One method in this (fresh) process; prints one JSON line."""
    state = torch.load(args.state, weights_only=False)
    train_set, targets = _data(args.n, args.targets)
    model = ex.make_model(0, state["width"])
    model.load_state_dict(state["model"])
    model.eval()
    rss_loaded = ex._proc_status_mb("VmRSS")
    warm = ex.PeakMemory()
    with warm.phase("warm-up"):  # imports and first-use caches, on 64 images
        small = ex.FashionImages(train_set.images[:64], train_set.targets[:64])
        ex.attribute(
            model, small, targets, methods=[args.worker], checkpoints=state["checkpoints"][-1:], n_groups=10,
            trak_dim=16, rows=args.rows, log=lambda *_: None,
        )  # fmt: skip
    memory = ex.PeakMemory()
    out = ex.attribute(
        model,
        train_set,
        targets,
        methods=[args.worker],
        checkpoints=state["checkpoints"],
        n_groups=args.groups,
        trak_dim=args.trak_dim,
        rows=args.rows,
        memory=memory,
        log=lambda *_: None,
    )
    return {
        "method": args.worker,
        "n": args.n,
        "rss_loaded_mb": rss_loaded,
        "warm_up_mb": warm.phases["warm-up"]["peak_mb"],
        "n_groups": int(out["grouping"].n_groups),
        "phases": memory.phases,
        "peak_mb": memory.peak_mb,
    }


def trained_state(args, tmp: Path) -> Path:
    if args.model is not None:
        return args.model
    train_set, _ = _data(args.n, 1)
    model = ex.make_model(0, 16)
    t0 = time.perf_counter()
    checkpoints = ex.train(model, train_set, 0, default_epochs=args.epochs, n_checkpoints=3)
    print(
        f"trained on {args.n:,} images, {args.epochs} epoch(s), in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    path = tmp / "model.pt"
    torch.save({"width": 16, "model": model.state_dict(), "checkpoints": checkpoints}, path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=60_000)
    p.add_argument("--targets", type=int, default=20)
    p.add_argument("--groups", type=int, default=100)
    p.add_argument("--methods", default=",".join(ex.METHODS))
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--trak-dim", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1, help="training epochs when no --model is given")
    p.add_argument("--model", type=Path, default=None, help="model.pt written by the example's --out")
    p.add_argument("--malloc-mmap", type=int, default=None, help="MALLOC_MMAP_THRESHOLD_ for the workers")
    p.add_argument("--name", default="byo_memory", help="results file name under benchmarks/results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--state", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (ex.FASHION / "train-images-idx3-ubyte.gz").exists():
        print(f"error: Fashion-MNIST is not in {ex.FASHION}; run make data", file=sys.stderr)
        return 2
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0

    input_mb = args.n * 784 * 4 / 2**20
    env = dict(os.environ)
    if args.malloc_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap)
    rows, workers = [], []
    with tempfile.TemporaryDirectory() as tmp:
        state = trained_state(args, Path(tmp))
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", method, "--state", str(state), "--n", str(args.n)]
            cmd += ["--targets", str(args.targets), "--groups", str(args.groups), "--rows", str(args.rows)]
            cmd += ["--trak-dim", str(args.trak_dim)]
            t0 = time.perf_counter()
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                print(run.stderr[-3000:], file=sys.stderr)
                return run.returncode
            res = json.loads(run.stdout.strip().splitlines()[-1])
            ph = res["phases"]
            workers.append(res)
            print(f"{method}: {time.perf_counter() - t0:.0f} s in a fresh process", flush=True)
            for phase, v in ph.items():
                print(f"  {phase:18s} {v['seconds']:7.1f} s  peak +{v['peak_mb']:5.0f} MiB", flush=True)
            rows.append(
                [
                    method,
                    ph["grouping"]["seconds"],
                    ph["grouping"]["peak_mb"],
                    ph[f"{method} points"]["seconds"],
                    ph[f"{method} points"]["peak_mb"],
                    ph[f"{method} groups"]["seconds"],
                    ph[f"{method} groups"]["peak_mb"],
                    res["peak_mb"],
                    res["peak_mb"] / input_mb,
                    res["warm_up_mb"],
                    res["rss_loaded_mb"],
                ]
            )
    malloc = f", MALLOC_MMAP_THRESHOLD_={args.malloc_mmap}" if args.malloc_mmap else ""
    table = Table(
        "Peak memory of attributing a ResNet on Fashion-MNIST through a torch Dataset (uint8 images)",
        f"n = {args.n:,} training images (float32 input matrix {input_mb:.0f} MiB), {args.targets} test "
        f"targets, grad-kmeans per class K = {res['n_groups']}, {args.rows} images per gradient pass, "
        f"77,082 attributed parameters (conv + linear), one fresh process per method{malloc}",
        [
            "method",
            "grouping s",
            "grouping MiB",
            "per point s",
            "per point MiB",
            "groups s",
            "groups MiB",
            "peak MiB",
            "peak / input matrix",
            "warm-up MiB",
            "RSS loaded MiB",
        ],
    )
    for r in rows:
        table.add(*r)
    table.notes += [
        "MiB columns: peak RSS (VmHWM, reset per phase) above the RSS after loading data + model and "
        "a 64-image warm-up; 'peak' is the largest over the process's phases",
        "warm-up MiB: the 64-image warm-up's own increase (first-use imports of torch.func etc.)",
    ]
    print(table.render())
    print(f"wrote {save(args.name, [table])}")
    (HERE / "results" / f"{args.name}_phases.json").write_text(json.dumps(workers, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
