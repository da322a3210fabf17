"""Retrain-from-scratch jobs: the one way every counterfactual evaluation trains models.

Every evaluation in :mod:`ggda.evaluate` (retraining score, LDS, pruning) asks the same question
many times: *what does the model do on the test set when it is trained without these points?*
A :class:`Retrainer` turns each (removal set, seed) pair into one keyed
:class:`~ggda.execution.Job` and runs them through an :class:`~ggda.execution.Executor`, which
stores each result the moment it finishes. The key hashes the data, architecture, training recipe,
removal set and seed, so

* a restarted evaluation skips every retrain already on disk and ends with identical numbers;
* different evaluations sharing a store share retrains (the no-removal runs, identical subsets);
* a distributed backend only has to implement ``Executor.run``.

Job functions are module-level and rebuild the data from a :class:`~ggda.runs.DataSpec` (cached
once per worker process) or receive the arrays, so they run in spawned workers and on other hosts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.execution import Executor, Job, ResultStore, job_key, make_executor
from ggda.models.losses import loss_for
from ggda.models.training import TrainConfig, predict, train_model
from ggda.models.zoo import ModelSpec, build_model
from ggda.runs import DataSpec, prepare_data

MODES = ("subset", "weight")


@dataclass
class RetrainSpec:
    """What all retrains of one evaluation share.

    Args:
        model: architecture to rebuild (fresh initialisation per seed).
        train_config: training recipe; its ``seed`` is replaced by each job's seed.
        data: how to rebuild (train, test) in a worker; ``None`` = pass arrays to the Retrainer.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (resolved inside the worker).
        mode: ``subset`` trains on the kept points only (retraining from scratch on D \\ S, the
            GGDA protocol); ``weight`` keeps every batch as in the full run and gives removed points
            weight 0 (same number of steps; lower variance across removal sets).
    """

    model: ModelSpec
    train_config: TrainConfig = field(default_factory=TrainConfig)
    data: DataSpec | None = None
    device: str = "cpu"
    mode: str = "subset"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise GGDAError(f"Unknown retraining mode '{self.mode}'; choose one of {', '.join(MODES)}.")

    def to_dict(self) -> dict:
        train = self.train_config.to_dict()
        train.pop("seed", None)  # every job sets its own
        train.pop("checkpoint_every", None)  # retrains write no checkpoints
        return {
            "model": self.model.to_dict(),
            "train": train,
            "data": None if self.data is None else self.data.to_dict(),
            "device": self.device,
            "mode": self.mode,
        }


# -- worker side ------------------------------------------------------------------------------
_DATA_CACHE: dict[str, tuple[Dataset, Dataset]] = {}


def _worker_data(data_spec: dict) -> tuple[Dataset, Dataset]:
    """(train, test) rebuilt from a DataSpec, once per process."""
    key = json.dumps(data_spec, sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        train, test, _ = prepare_data(DataSpec(**data_spec))
        _DATA_CACHE.clear()  # one data set per process at a time
        _DATA_CACHE[key] = (train, test)
    return _DATA_CACHE[key]


def retrain_job(
    spec: dict,
    removed: np.ndarray,
    seed: int,
    arrays: dict | None = None,
) -> dict[str, np.ndarray]:
    """Train a fresh model (init + shuffling seeded by ``seed``) without ``removed`` and test it.

    Returns per-test-point ``losses`` (T,) and, for classification, ``correct`` (T,) bool.
    """
    if arrays is not None:
        kind = arrays["kind"]
        train = Dataset(arrays["train_X"], arrays["train_y"], kind=kind, n_classes=arrays["n_classes"])
        test = Dataset(arrays["test_X"], arrays["test_y"], kind=kind, n_classes=arrays["n_classes"])
    else:
        train, test = _worker_data(spec["data"])
    n = len(train)
    removed = np.asarray(removed, dtype=np.int64)
    keep = np.ones(n, dtype=bool)
    keep[removed] = False
    if not keep.any():
        raise GGDAError("A removal set removes every training point; lower the removal fraction.")
    model = build_model(ModelSpec.from_dict(spec["model"]), seed=int(seed))
    config = TrainConfig(**spec["train"], seed=int(seed))
    if spec["mode"] == "subset":
        train_model(model, train.subset(np.flatnonzero(keep)), config, device=spec["device"])
    else:
        train_model(model, train, config, device=spec["device"], sample_weight=keep.astype(np.float32))
    out = torch.as_tensor(predict(model, test.X, spec["device"]))
    losses = loss_for(test.kind)(out, torch.as_tensor(test.y)).numpy().astype(np.float64)
    result = {"losses": losses}
    if test.kind == "classification":
        result["correct"] = out.argmax(1).numpy() == test.y
    return result


# -- driver side ------------------------------------------------------------------------------
@dataclass
class Outcomes:
    """Test-set behaviour of retrained models: one row per removal set, one column per seed."""

    losses: np.ndarray  # (S, R, T)
    correct: np.ndarray | None  # (S, R, T) bool, classification only

    @property
    def accuracy(self) -> np.ndarray:
        """(S, R) test accuracy of each retrain."""
        if self.correct is None:
            raise GGDAError("Accuracy needs a classification task; use the test loss for regression.")
        return self.correct.mean(axis=2)

    @property
    def mean_loss(self) -> np.ndarray:
        """(S, R) mean test loss of each retrain."""
        return self.losses.mean(axis=2)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


class Retrainer:
    """Runs (removal set, seed) retrains through an executor into a result store.

    Args:
        spec: the shared model/training/data recipe.
        store: result directory (or store); shared stores share retrains across evaluations.
        executor: default ``LocalExecutor`` sized to the cores.
        train, test: the data, required when ``spec.data`` is None (passed to every job) and
            otherwise used to check that the spec rebuilds the data you expect.
        progress: show a progress bar per batch of jobs.

    Attributes:
        executed: retrains this object actually ran (the rest came from the store).
    """

    def __init__(
        self,
        spec: RetrainSpec,
        store: ResultStore | str | Path,
        executor: Executor | None = None,
        train: Dataset | None = None,
        test: Dataset | None = None,
        progress: bool = False,
    ) -> None:
        self.spec = spec
        self.store = store if isinstance(store, ResultStore) else ResultStore(store)
        self.executor = executor or make_executor("local")
        self.progress = progress
        self.executed = 0
        if spec.data is None:
            if train is None or test is None:
                raise GGDAError("Retrainer needs train and test data when the spec has no DataSpec.")
        else:
            train, test = prepare_data(spec.data)[:2] if train is None or test is None else (train, test)
        self.train, self.test = train, test
        self.n_train = len(train)
        self._arrays = None
        if spec.data is None:
            self._arrays = {
                "train_X": train.X,
                "train_y": train.y,
                "test_X": test.X,
                "test_y": test.y,
                "kind": train.kind,
                "n_classes": train.n_classes,
            }
        self._config = {
            **spec.to_dict(),
            "data_digest": _digest(train.X, train.y, test.X, test.y),
        }

    @property
    def classification(self) -> bool:
        return self.test.kind == "classification"

    def job(self, removed: np.ndarray, seed: int) -> Job:
        removed = np.unique(np.asarray(removed, dtype=np.int64))
        if len(removed) and (removed[0] < 0 or removed[-1] >= self.n_train):
            raise GGDAError(f"Removal positions must lie in 0..{self.n_train - 1}.")
        key = job_key({**self._config, "removed": _digest(removed)}, removed=len(removed), seed=int(seed))
        kwargs = {"spec": self._config, "removed": removed, "seed": int(seed), "arrays": self._arrays}
        return Job(key, retrain_job, kwargs, meta={"n_removed": len(removed), "seed": int(seed)})

    def run_pairs(self, pairs: Sequence[tuple[np.ndarray, int]]) -> Outcomes:
        """Retrain once per (removal set, seed) pair not yet stored; outcomes (P, 1, T) in order.

        All pairs go to the executor in one call (one worker pool), duplicates run once.
        """
        jobs = [self.job(r, s) for r, s in pairs]
        unique = list({j.key: j for j in jobs}.values())
        self.executed += self.executor.run(unique, self.store, progress=self.progress)
        results = [self.store.get(j.key)[0] for j in jobs]
        T = len(self.test)
        losses = np.asarray([r["losses"] for r in results], dtype=np.float64).reshape(len(jobs), 1, T)
        correct = None
        if self.classification:
            correct = np.asarray([r["correct"] for r in results], dtype=bool).reshape(len(jobs), 1, T)
        return Outcomes(losses, correct)

    def run(self, removals: Sequence[np.ndarray], seeds: Sequence[int]) -> Outcomes:
        """Every removal set × every seed (paired seeds); outcomes (S, R, T)."""
        pairs = [(r, s) for r in removals for s in seeds]
        flat = self.run_pairs(pairs)
        S, R, T = len(removals), len(seeds), len(self.test)
        return Outcomes(
            flat.losses.reshape(S, R, T),
            None if flat.correct is None else flat.correct.reshape(S, R, T),
        )
