"""Run directories: the named on-disk artifacts that connect the pipeline stages.

``ggda train`` writes a run directory; every later command (attribute, group, gold, evaluate)
reads it back. The data are *not* copied: ``run.json`` records how to rebuild them exactly
(data source, split seed, standardisation, label noise), and ``split.npz`` pins the ids.

Layout::

    RUN/run.json            data spec, model spec, train config, metrics
    RUN/split.npz           train_ids, test_ids (and the noisy mask when labels were flipped)
    RUN/model.pt            final model (self-describing)
    RUN/checkpoints/*.pt    checkpoints with epoch, step and learning rate (TracInCP)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from torch import nn

from ggda.data.bundled import BUNDLED_DATASETS, OFFICIAL_TEST_SPLITS, load_dataset
from ggda.data.dataset import Dataset
from ggda.data.files import load_file
from ggda.data.preprocess import Standardizer, flip_labels, train_test_split
from ggda.errors import GGDAError
from ggda.models.checkpoint import Checkpoint, load_model, load_state
from ggda.models.training import TrainConfig


@dataclass
class DataSpec:
    """How to (re)build the train/test data of a run."""

    source: str  # bundled name or file path
    label: str | None = None
    categorical: list[str] = field(default_factory=list)
    group_column: str | None = None
    kind: str = "classification"
    test_fraction: float = 0.2
    split_seed: int = 0
    standardize: bool = True
    noise: float = 0.0
    noise_seed: int = 0
    max_train: int | None = None  # subsample the training split (seeded) for quick runs

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def load_source(spec: DataSpec) -> Dataset:
    if spec.source in BUNDLED_DATASETS:
        return load_dataset(spec.source)
    path = Path(spec.source)
    if path.suffix.lower() in (".csv", ".parquet", ".pq", ".npz"):
        return load_file(
            path,
            label=spec.label,
            categorical=spec.categorical or None,
            group_column=spec.group_column,
            kind=spec.kind,
        )  # type: ignore[arg-type]
    raise GGDAError(
        f"Unknown data set '{spec.source}'; choose one of {', '.join(BUNDLED_DATASETS)} or pass a "
        ".csv/.parquet/.npz file path."
    )


def prepare_data(spec: DataSpec) -> tuple[Dataset, Dataset, Standardizer | None]:
    """Load, split (seeded), subsample, inject label noise and standardise: (train, test, scaler)."""
    data = load_source(spec)
    if spec.source in OFFICIAL_TEST_SPLITS:
        train, test = data, OFFICIAL_TEST_SPLITS[spec.source]()
    else:
        train, test = train_test_split(data, spec.test_fraction, spec.split_seed)
    if spec.max_train is not None and spec.max_train < len(train):
        keep = np.sort(
            np.random.default_rng(spec.split_seed).choice(len(train), spec.max_train, replace=False)
        )
        train = train.subset(keep)
    if spec.noise > 0:
        train = flip_labels(train, spec.noise, spec.noise_seed)
    scaler = None
    if spec.standardize:
        scaler = Standardizer.fit(train)
        train, test = scaler.transform(train), scaler.transform(test)
    return train, test, scaler


@dataclass
class Run:
    """A trained run read back from disk."""

    path: Path
    config: dict
    train: Dataset
    test: Dataset
    model: nn.Module
    checkpoints: list[Checkpoint]

    @property
    def kind(self) -> str:
        return self.config["data"].get("kind", "classification")


def write_run_config(path: Path, config: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "run.json.part"
    tmp.write_text(json.dumps(config, indent=2, default=str))
    tmp.replace(path / "run.json")


def load_run(path: str | Path) -> Run:
    """Rebuild a run's data and load its final model and checkpoints."""
    path = Path(path)
    cfg_file = path / "run.json"
    if not cfg_file.exists():
        raise GGDAError(f"{path} is not a ggda run directory (no run.json); create one with `ggda train`.")
    config = json.loads(cfg_file.read_text())
    spec = DataSpec(**config["data"])
    train, test, _ = prepare_data(spec)
    split = np.load(path / "split.npz")
    if not np.array_equal(split["train_ids"], train.ids) or not np.array_equal(split["test_ids"], test.ids):
        raise GGDAError(f"The data of {path} no longer match the ids it was trained on; re-run `ggda train`.")
    model = load_model(path / "model.pt")
    ckpts = []
    for f in sorted((path / "checkpoints").glob("epoch_*.pt")):
        meta = load_state(f)["meta"]
        ckpts.append(Checkpoint(f, int(meta["epoch"]), int(meta["step"]), float(meta["lr"])))
    return Run(path, config, train, test, model, ckpts)


def train_config_of(run: Run) -> TrainConfig:
    return TrainConfig(**run.config["train"])


def with_noise_mask(train: Dataset, split: dict) -> Dataset:
    if "noisy" in split:
        return replace(train, noisy=split["noisy"])
    return train
