"""Jobs and the executor contract, shared by every backend (``executor.py``, ``ray_backend.py``).

A :class:`Job` is a keyed call of a module-level function returning a dict of arrays;
:func:`call_job` runs one and times it; :class:`Executor` is what every backend implements.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ggda.errors import GGDAError
from ggda.execution.store import ResultStore

JobFn = Callable[..., dict[str, np.ndarray]]


@dataclass(frozen=True)
class Job:
    """One idempotent unit of work: ``fn(**kwargs)`` returning a dict of arrays, stored under ``key``.

    ``fn`` must be a module-level function (picklable) and deterministic given ``kwargs``.
    """

    key: str
    fn: JobFn
    kwargs: dict = field(default_factory=dict, hash=False, compare=False)
    meta: dict = field(default_factory=dict, hash=False, compare=False)


def job_key(config: dict | None = None, **parts: object) -> str:
    """Stable key: readable parts (``seed=3``) plus a short hash of the configuration."""
    digest = hashlib.sha1(json.dumps(config or {}, sort_keys=True, default=str).encode()).hexdigest()[:10]
    readable = "_".join(f"{k}={v}" for k, v in parts.items())
    return ResultStore.check_key(f"{digest}_{readable}" if readable else digest)


def limit_threads(threads: int) -> None:
    """Per-process thread cap, applied in every worker before any work."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def call_job(job_fn: JobFn, kwargs: dict) -> tuple[dict[str, np.ndarray], float]:
    """Run ``job_fn(**kwargs)``; its result (a dict of arrays, checked) and the seconds it took."""
    t0 = time.perf_counter()
    out = job_fn(**kwargs)
    if not isinstance(out, dict):
        raise GGDAError(
            f"Job function {job_fn.__name__} must return a dict of arrays, got {type(out).__name__}."
        )
    return out, time.perf_counter() - t0


class Executor(ABC):
    """Runs jobs into a store. ``run`` returns the number of jobs it executed (not skipped)."""

    retries: int = 2

    def pending(self, jobs: Sequence[Job], store: ResultStore) -> list[Job]:
        keys = [j.key for j in jobs]
        if len(set(keys)) != len(keys):
            raise GGDAError("Two jobs share a key; build keys with job_key(config, unit=..., seed=...).")
        return [j for j in jobs if not store.has(j.key)]

    @abstractmethod
    def run(self, jobs: Sequence[Job], store: ResultStore, progress: bool = False) -> int: ...

    @staticmethod
    def _store(store: ResultStore, job: Job, result: dict, seconds: float) -> None:
        store.put(job.key, result, {**job.meta, "seconds": seconds})
