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

How a model is built and trained is a :class:`~ggda.models.recipe.TrainingRecipe`: ggda's zoo
(:class:`~ggda.models.recipe.ZooRecipe`) or the user's model factory and training function
(:class:`~ggda.models.recipe.UserRecipe`), on arrays or on any lazy data source.

Job functions are module-level and rebuild the data from a :class:`~ggda.runs.DataSpec` (cached
once per worker process), receive the arrays, or — for user recipes and lazy data — load one
payload file (recipe, train, test) written once next to the store, so they run in spawned
workers and on other hosts.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ggda.data.dataset import Dataset
from ggda.data.digest import content_digest
from ggda.data.spec import DataSpec, prepare_data
from ggda.errors import GGDAError
from ggda.execution import Executor, Job, ResultStore, job_key, make_executor
from ggda.execution.lock import DirectoryLock
from ggda.io import atomic_write
from ggda.models.recipe import TrainingRecipe, UserRecipe, ZooRecipe
from ggda.models.training import TrainConfig
from ggda.models.zoo import ModelSpec

MODES = ("subset", "weight")


@dataclass
class RetrainSpec:
    """What all retrains of one evaluation share.

    Args:
        model: zoo architecture to rebuild (fresh initialisation per seed); or give ``recipe``.
        train_config: zoo training settings; its ``seed`` is replaced by each job's seed.
        recipe: any :class:`~ggda.models.recipe.TrainingRecipe` (a user model factory and
            training function); default ``ZooRecipe(model, train_config)``.
        data: how to rebuild (train, test) in a worker; ``None`` = pass arrays to the Retrainer.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (resolved inside the worker).
        mode: ``subset`` trains on the kept points only (retraining from scratch on D \\ S, the
            GGDA protocol); ``weight`` keeps every batch as in the full run and gives removed points
            weight 0 (same number of steps; lower variance across removal sets).
    """

    model: ModelSpec | None = None
    train_config: TrainConfig = field(default_factory=TrainConfig)
    data: DataSpec | None = None
    device: str = "cpu"
    mode: str = "subset"
    recipe: TrainingRecipe | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise GGDAError(f"Unknown retraining mode '{self.mode}'; choose one of {', '.join(MODES)}.")
        if self.recipe is None:
            if self.model is None:
                raise GGDAError(
                    "RetrainSpec needs a zoo model or a recipe (UserRecipe(model_factory, train_fn))."
                )
            self.recipe = ZooRecipe(self.model, self.train_config)
        if self.mode == "weight" and not self.recipe.supports_weights:
            raise GGDAError(
                f"{type(self.recipe).__name__} trains on the kept examples only; use mode='subset'."
            )

    def to_dict(self) -> dict:
        return {
            **self.recipe.describe(),
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


_PAYLOADS: dict[str, tuple[TrainingRecipe, Dataset, Dataset]] = {}


def _payload(file: str) -> tuple[TrainingRecipe, Dataset, Dataset]:
    """(recipe, train, test) written by the Retrainer, loaded once per process."""
    if file not in _PAYLOADS:
        with open(file, "rb") as fh:
            _PAYLOADS[file] = pickle.load(fh)
    return _PAYLOADS[file]


def retrain_job(
    spec: dict,
    removed: np.ndarray,
    seed: int,
    arrays: dict | None = None,
    payload: str | None = None,
) -> dict[str, np.ndarray]:
    """Train a fresh model (init + shuffling seeded by ``seed``) without ``removed`` and test it.

    Returns per-test-point ``losses`` (T,) and, for classification, ``correct`` (T,) bool.
    """
    if payload is not None:
        recipe, train, test = _payload(payload)
    else:
        recipe = ZooRecipe(ModelSpec.from_dict(spec["model"]), TrainConfig(**spec["train"]))
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
    model = recipe.build(int(seed))
    if spec["mode"] == "subset":
        recipe.fit(model, train.subset(np.flatnonzero(keep)), int(seed), device=spec["device"])
    else:
        recipe.fit(model, train, int(seed), device=spec["device"], sample_weight=keep.astype(np.float32))
    return recipe.evaluate(model, test, spec["device"])


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


class Retrainer:
    """Runs (removal set, seed) retrains through an executor into a result store.

    Args:
        spec: the shared model/training/data recipe.
        store: result directory (or store); shared stores share retrains across evaluations.
            It is claimed (:class:`~ggda.execution.lock.DirectoryLock`) until :meth:`close`, the
            end of a ``with`` block, garbage collection or exit: another process's retrainer or
            command on the same store refuses with an error naming this one.
        executor: default ``LocalExecutor`` sized to the cores.
        train, test: the data, required when ``spec.data`` is None (passed to every job) and
            otherwise used to check that the spec rebuilds the data you expect.
        progress: show a progress bar per batch of jobs.

    Attributes:
        executed: retrains this object actually ran.
        reused: retrains it was asked for that were already in the store (earlier runs of the same
            command, or the same job asked for twice), so ``executed + reused`` jobs were asked for.
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
        # The store is this retrainer's until it is closed or collected: a second command on it
        # refuses at once (naming this one) instead of after its own attribution work.
        self._lock = DirectoryLock(self.store.root).acquire()
        weakref.finalize(self, self._lock.release)
        self.executor = executor or make_executor("local")
        self.progress = progress
        self.executed = 0
        self.reused = 0
        if spec.data is None:
            if train is None or test is None:
                raise GGDAError("Retrainer needs train and test data when the spec has no DataSpec.")
        else:
            train, test = prepare_data(spec.data)[:2] if train is None or test is None else (train, test)
        self.train, self.test = train, test
        self.n_train = len(train)
        self._arrays = None
        self._payload: str | None = None
        self._config = {**spec.to_dict(), "data_digest": content_digest(train.X, train.y, test.X, test.y)}
        if isinstance(spec.recipe, UserRecipe) or train.lazy or test.lazy:
            self._payload = self._write_payload()
        elif spec.data is None:
            self._arrays = {
                "train_X": train.X,
                "train_y": train.y,
                "test_X": test.X,
                "test_y": test.y,
                "kind": train.kind,
                "n_classes": train.n_classes,
            }

    def close(self) -> None:
        """Release the claim on the store (also done when this object is collected or at exit)."""
        self._lock.release()

    def __enter__(self) -> Retrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_payload(self) -> str:
        """(recipe, train, test) pickled once beside the store; jobs carry only its path."""
        key = hashlib.sha1(json.dumps(self._config, sort_keys=True, default=str).encode()).hexdigest()[:16]
        file = self.store.root / "payloads" / f"{key}.pkl"
        payload = (self.spec.recipe, self.train, self.test)
        _PAYLOADS[str(file)] = payload  # in-process jobs need no file
        # Always rewritten, never trusted as found: workers unpickle this file, so it must be the
        # one this process just wrote (not a file placed in the output directory).
        try:
            blob = pickle.dumps(payload)
        except Exception as exc:  # lambdas, local functions
            if self._serial():
                return str(file)
            raise GGDAError(
                f"The training recipe or data cannot be sent to worker processes ({type(exc).__name__}: "
                f"{exc}); define the model factory and training function at module level, or use "
                "backend='serial'."
            ) from exc
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(file, blob)
        return str(file)

    def _serial(self) -> bool:
        from ggda.execution import SerialExecutor

        return isinstance(self.executor, SerialExecutor) or getattr(self.executor, "workers", 0) == 1

    @property
    def classification(self) -> bool:
        return self.test.kind == "classification"

    def job(self, removed: np.ndarray, seed: int) -> Job:
        removed = np.unique(np.asarray(removed, dtype=np.int64))
        if len(removed) and (removed[0] < 0 or removed[-1] >= self.n_train):
            raise GGDAError(f"Removal positions must lie in 0..{self.n_train - 1}.")
        key = job_key(
            {**self._config, "removed": content_digest(removed)}, removed=len(removed), seed=int(seed)
        )
        kwargs = {"spec": self._config, "removed": removed, "seed": int(seed), "arrays": self._arrays}
        if self._payload is not None:
            kwargs = {**kwargs, "arrays": None, "payload": self._payload}
        return Job(key, retrain_job, kwargs, meta={"n_removed": len(removed), "seed": int(seed)})

    def run_pairs(self, pairs: Sequence[tuple[np.ndarray, int]]) -> Outcomes:
        """Retrain once per (removal set, seed) pair not yet stored; outcomes (P, 1, T) in order.

        All pairs go to the executor in one call (one worker pool), duplicates run once.
        """
        jobs = [self.job(r, s) for r, s in pairs]
        unique = list({j.key: j for j in jobs}.values())
        ran = self.executor.run(unique, self.store, progress=self.progress)
        self.executed += ran
        self.reused += len(unique) - ran
        results = [self.store.get(j.key)[0] for j in jobs]
        if isinstance(self.spec.recipe, UserRecipe):
            _check_removal_honoured(pairs, results)
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


def _check_removal_honoured(pairs: Sequence[tuple[np.ndarray, int]], results: list[dict]) -> None:
    """A user training function that ignores its data gives bit-identical test losses with and
    without a removal under the same seed: refuse such results instead of reporting them."""
    full = {int(s): r["losses"] for (removed, s), r in zip(pairs, results, strict=True) if len(removed) == 0}
    for (removed, s), r in zip(pairs, results, strict=True):
        ref = full.get(int(s))
        if len(removed) and ref is not None and np.array_equal(ref, r["losses"]):
            raise GGDAError(
                f"Training without {len(removed)} examples gave exactly the model trained on all of them "
                f"(seed {int(s)}): the training function ignores its data argument; train on the "
                "dataset it is given."
            )
