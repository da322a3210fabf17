"""Shared pieces of the ggda benchmarks: workloads, timers, peak-memory sampling, result tables.

Benchmarks run single-threaded (``torch.set_num_threads(1)``) unless they measure scaling: the
project machine has 2 shared cores and multi-threaded BLAS on a busy core is erratic.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FASHION = Path("/usr/share/datasets/fashion-mnist")


# -- data and models ------------------------------------------------------------------------------
def _idx(path: Path) -> np.ndarray:
    b = gzip.open(path, "rb").read()
    nd = b[3]
    dims = [int.from_bytes(b[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(b, np.uint8, offset=4 + 4 * nd).reshape(dims)


def image_data(n_train: int, n_test: int, seed: int = 0):
    """(train, test) Datasets of 784-d images: Fashion-MNIST when installed (``make data``),
    otherwise a synthetic 10-class MNIST-shaped mixture (class prototypes + noise, in [0, 1])."""
    from ggda.data.dataset import Dataset

    if FASHION.exists() and n_train <= 60_000 and n_test <= 10_000:
        Xtr = _idx(FASHION / "train-images-idx3-ubyte.gz")[:n_train].reshape(n_train, -1) / 255.0
        ytr = _idx(FASHION / "train-labels-idx1-ubyte.gz")[:n_train].astype(np.int64)
        Xte = _idx(FASHION / "t10k-images-idx3-ubyte.gz")[:n_test].reshape(n_test, -1) / 255.0
        yte = _idx(FASHION / "t10k-labels-idx1-ubyte.gz")[:n_test].astype(np.int64)
        name = "fashion-mnist"
    else:
        rng = np.random.default_rng(seed)
        protos = rng.uniform(0, 1, size=(10, 784)) * (rng.uniform(size=(10, 784)) < 0.3)
        n = n_train + n_test
        y = rng.integers(0, 10, n)
        X = np.clip(protos[y] + rng.normal(0, 0.35, size=(n, 784)), 0, 1)
        Xtr, ytr, Xte, yte = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
        name = "synthetic-784"
    mk = lambda X, y, nm: Dataset(  # noqa: E731
        X.astype(np.float32), y, name=nm, n_classes=10, input_shape=(1, 28, 28)
    )
    return mk(Xtr, ytr, f"{name}-train"), mk(Xte, yte, f"{name}-test")


def trained_model(name: str, train, epochs: int = 2, seed: int = 0) -> torch.nn.Module:
    from ggda.models import TrainConfig, build_model, train_model

    model = build_model(name, train.n_features, 10, input_shape=(1, 28, 28), seed=seed)
    train_model(model, train, TrainConfig(epochs=epochs, batch_size=128, lr=0.05, seed=seed))
    return model.eval()


# -- measurement ----------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the parent
    across fork + exec, so a benchmark started by a large process would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak resident memory above the starting level while the block runs (sampled every 2 ms)."""

    def __enter__(self) -> PeakMemory:
        self.base = _rss_mb()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def mb(self) -> float:
        return self.peak - self.base


def timed(fn, repeat: int = 1):
    """(best seconds, peak extra MB, last result) over ``repeat`` runs."""
    best, peak, out = float("inf"), 0.0, None
    for _ in range(repeat):
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
        best, peak = min(best, dt), max(peak, mem.mb)
    return best, peak, out


# -- reporting ------------------------------------------------------------------------------------
def machine() -> str:
    dev = "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, threads={torch.get_num_threads()}, device={dev}, "
        f"load average at report time {os.getloadavg()[0]:.1f} (other processes share the cores)"
    )


@dataclass
class Table:
    title: str
    workload: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *row) -> None:
        self.rows.append(list(row))

    def render(self) -> str:
        def fmt(v):
            if isinstance(v, float):
                return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
            return str(v)

        cells = [self.columns] + [[fmt(v) for v in r] for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
        out = [f"== {self.title} ==", f"workload: {self.workload}", f"machine:  {machine()}", line(cells[0])]
        out.append("  ".join("-" * w for w in widths))
        out += [line(r) for r in cells[1:]]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "workload": self.workload,
            "machine": machine(),
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
        }


def save(name: str, tables: list[Table]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(t.render() for t in tables) + "\n"
    (RESULTS / f"{name}.txt").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps([t.to_dict() for t in tables], indent=1, default=float))
    return RESULTS / f"{name}.txt"
