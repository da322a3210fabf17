"""Executors: run keyed jobs, store each result as it finishes, skip what is done, retry failures.

Workers of every backend limit torch/BLAS threads so that workers × threads ≤ cores: on small
machines oversubscription slows small-model training by an order of magnitude (DATA-SOURCES §5).

Every backend takes the same ``workers`` (jobs running at once: processes for ``local``,
concurrent tasks for ``ray``; ``serial`` runs one) and ``retries``, claims the result store's
directory for the length of :meth:`~Executor.run` (:mod:`ggda.execution.lock`: a second command on
the same store refuses instead of redoing every job), and on any exit — an error, Ctrl-C, SIGTERM —
stores the results that already finished and stops its workers (:mod:`ggda.execution.lifecycle`).
Local-pool workers die with the process that started them, even when it is SIGKILLed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from ggda.errors import GGDAError
from ggda.execution.jobs import Executor, Job, JobFn, call_job, job_key, limit_threads
from ggda.execution.lifecycle import stop_pool, worker_init
from ggda.execution.lock import DirectoryLock
from ggda.progress import progress as progress_bar

__all__ = [
    "BACKENDS",
    "Executor",
    "Job",
    "JobFn",
    "LocalExecutor",
    "SerialExecutor",
    "job_key",
    "limit_threads",
    "make_executor",
]


class SerialExecutor(Executor):
    """In-process, one job at a time (debugging, tiny jobs, and the reference for other backends).

    ``workers`` is accepted for a uniform signature and must be 1 (or None).
    """

    def __init__(self, retries: int = 0, workers: int | None = None) -> None:
        if workers not in (None, 1):
            raise GGDAError(
                f"The serial backend runs one job at a time, not {workers}; use --backend local for workers."
            )
        self.retries = retries
        self.workers = 1

    def run(self, jobs, store, progress=False):
        todo = self.pending(jobs, store)
        if not todo:
            return 0
        with DirectoryLock(store.root):
            todo = self.pending(todo, store)  # another command may have finished some meanwhile
            bar = progress_bar(todo, desc="jobs", disable=not progress)
            try:
                for job in bar:
                    for attempt in range(self.retries + 1):
                        try:
                            result, seconds = call_job(job.fn, job.kwargs)
                            break
                        except GGDAError:
                            raise
                        except Exception:
                            if attempt == self.retries:
                                raise
                    self._store(store, job, result, seconds)
            finally:
                bar.close()
        return len(todo)


class LocalExecutor(Executor):
    """Process pool on this machine; workers × threads ≤ cores; a dead worker's jobs are re-run.

    Workers ignore SIGINT (the parent stops them), die with the parent (``PR_SET_PDEATHSIG``), and
    are terminated — after the results that already finished are stored — when :meth:`run` ends
    by an error or a signal.

    Args:
        workers: processes (default: number of cores).
        threads_per_worker: torch/BLAS threads per worker (default: cores // workers, at least 1).
        retries: extra attempts per job after a failure or a lost worker.
    """

    def __init__(
        self, workers: int | None = None, threads_per_worker: int | None = None, retries: int = 2
    ) -> None:
        if workers is not None and workers < 1:
            raise GGDAError(f"workers must be >= 1, got {workers}.")
        cores = os.cpu_count() or 1
        self.workers = max(1, workers or cores)
        self.threads = max(1, threads_per_worker or cores // self.workers)
        self.retries = retries

    def run(self, jobs, store, progress=False):
        todo = self.pending(jobs, store)
        if not todo:
            return 0
        with DirectoryLock(store.root):
            todo = self.pending(todo, store)
            if not todo:
                return 0
            if self.workers == 1:
                limit_threads(self.threads)
                return SerialExecutor(self.retries).run(todo, store, progress)
            bar = progress_bar(total=len(todo), desc="jobs", disable=not progress)
            try:
                self._run_pool(todo, store, bar)
            finally:
                bar.close()
        return len(todo)

    def _run_pool(self, todo: list[Job], store, bar) -> None:
        import multiprocessing as mp

        attempts = {j.key: 0 for j in todo}
        queue = list(todo)
        while queue:
            ctx = mp.get_context("spawn")  # no forked torch state; safe with CUDA too
            pool = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=worker_init, initargs=(self.threads, os.getpid())
            )
            running: dict = {}
            finished = False
            try:
                running = {pool.submit(call_job, j.fn, j.kwargs): j for j in queue}
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
                finished = True
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
            finally:
                if finished:
                    pool.shutdown(wait=True)
                else:  # an error or a signal: keep what finished, stop the rest now
                    self._keep_finished(running, store)
                    stop_pool(pool)

    def _keep_finished(self, running: dict, store) -> None:
        for fut, job in running.items():
            try:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    result, seconds = fut.result()
                    self._store(store, job, result, seconds)
            except Exception:  # never mask the error that ended the run
                continue


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
