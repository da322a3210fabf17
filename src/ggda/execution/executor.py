"""Executors: run keyed jobs, store each result as it finishes, skip what is done, retry failures.

Workers of every backend limit torch/BLAS threads so that workers × threads ≤ cores: on small
machines oversubscription slows small-model training by an order of magnitude (DATA-SOURCES §5).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

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


def _call(job_fn: JobFn, kwargs: dict) -> tuple[dict[str, np.ndarray], float]:
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


class SerialExecutor(Executor):
    """In-process, one job at a time (debugging, tiny jobs, and the reference for other backends)."""

    def __init__(self, retries: int = 0) -> None:
        self.retries = retries

    def run(self, jobs, store, progress=False):
        todo = self.pending(jobs, store)
        for job in tqdm(todo, desc="jobs", disable=not progress, leave=False):
            for attempt in range(self.retries + 1):
                try:
                    result, seconds = _call(job.fn, job.kwargs)
                    break
                except GGDAError:
                    raise
                except Exception:
                    if attempt == self.retries:
                        raise
            self._store(store, job, result, seconds)
        return len(todo)


class LocalExecutor(Executor):
    """Process pool on this machine; workers × threads ≤ cores; a dead worker's jobs are re-run.

    Args:
        workers: processes (default: number of cores).
        threads_per_worker: torch/BLAS threads per worker (default: cores // workers, at least 1).
        retries: extra attempts per job after a failure or a lost worker.
    """

    def __init__(
        self, workers: int | None = None, threads_per_worker: int | None = None, retries: int = 2
    ) -> None:
        cores = os.cpu_count() or 1
        self.workers = max(1, workers or cores)
        self.threads = max(1, threads_per_worker or cores // self.workers)
        self.retries = retries

    def run(self, jobs, store, progress=False):
        todo = self.pending(jobs, store)
        if not todo:
            return 0
        if self.workers == 1:
            limit_threads(self.threads)
            return SerialExecutor(self.retries).run(todo, store, progress)
        import multiprocessing as mp

        attempts = {j.key: 0 for j in todo}
        queue = list(todo)
        bar = tqdm(total=len(todo), desc="jobs", disable=not progress, leave=False)
        while queue:
            ctx = mp.get_context("spawn")  # no forked torch state; safe with CUDA too
            try:
                with ProcessPoolExecutor(
                    self.workers, mp_context=ctx, initializer=limit_threads, initargs=(self.threads,)
                ) as pool:
                    running = {pool.submit(_call, j.fn, j.kwargs): j for j in queue}
                    queue = []
                    while running:
                        done, _ = wait(running, return_when=FIRST_COMPLETED)
                        for fut in done:
                            job = running.pop(fut)
                            try:
                                result, seconds = fut.result()
                            except BrokenProcessPool:
                                raise
                            except GGDAError:
                                raise
                            except Exception:
                                attempts[job.key] += 1
                                if attempts[job.key] > self.retries:
                                    raise
                                queue.append(job)
                                continue
                            self._store(store, job, result, seconds)
                            bar.update(1)
            except BrokenProcessPool:
                # A worker died (killed, out of memory): re-run everything not yet stored.
                lost = [j for j in todo if not store.has(j.key)]
                for j in lost:
                    attempts[j.key] += 1
                    if attempts[j.key] > self.retries + 1:
                        raise GGDAError(
                            f"Job {j.key} lost its worker {attempts[j.key]} times; check memory, or run with "
                            "--workers 1."
                        ) from None
                queue = lost
        bar.close()
        return len(todo)


def _ray_executor(**kwargs) -> Executor:
    try:
        from ggda.execution.ray_backend import RayExecutor
    except ImportError as exc:
        raise GGDAError("The ray backend needs the optional extra: pip install 'ggda[ray]'.") from exc
    return RayExecutor(**kwargs)


BACKENDS: dict[str, Callable[..., Executor]] = {
    "serial": SerialExecutor,
    "local": LocalExecutor,
    "ray": _ray_executor,
}


def make_executor(backend: str = "local", **kwargs) -> Executor:
    """``serial``, ``local`` (default) or ``ray``; kwargs go to the backend."""
    if backend not in BACKENDS:
        raise GGDAError(f"Unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}.")
    return BACKENDS[backend](**kwargs)
