"""Ray backend: the same keyed, resumable jobs as the local pool, on a Ray cluster.

Why Ray and not a home-made scheduler: gold standards and LDS are thousands of independent
retrainings; when one machine is not enough, users already run Ray clusters, and Ray brings
scheduling by resources (CPUs, GPUs), retries of tasks whose worker or node died, and a shared
object store. This module only adapts ggda's :class:`~ggda.execution.Job` contract to it:

* **keys and resumability** come from the :class:`~ggda.execution.ResultStore`: jobs whose key is
  already stored are never submitted, so re-running an interrupted evaluation resumes it;
* **results land as they finish**: the driver waits on whichever task completes first and
  stores it at once (``store_on_worker=False``, the default, works with any cluster because the
  result travels back through Ray's object store); with ``store_on_worker=True`` each task
  writes its own result into the store directory, which then must be a path every node sees
  (a shared filesystem) — the driver checks this and says so when it is not;
* **bounded retries**: a task whose worker process or node dies is re-executed by Ray itself
  (``max_retries=retries``); a task that raises is resubmitted by the driver up to ``retries``
  times, except :class:`~ggda.errors.GGDAError` (a user error that a retry cannot fix);
* **threads**: every task asks Ray for ``threads_per_worker`` CPUs and caps torch/BLAS to that
  many threads, so concurrent tasks × threads ≤ cores (oversubscription costs 10×, not 2×);
* **cluster ownership**: ``address=None`` starts a private local cluster (``ray.init`` with
  ``address="local"``, never silently joining someone else's), shut down by :meth:`close`;
  ``address="auto"`` or ``"HOST:PORT"`` joins an existing cluster and :meth:`close` only
  disconnects; an already-initialised Ray session in this process is used and left alone.

Token authentication (on by default in recent Ray, e.g. 2.60, which writes ``~/.ray/auth_token``) is disabled
for clusters this executor starts, unless ``RAY_AUTH_MODE`` is already set, and the dashboard
is not started.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import ray
from ray.exceptions import RayError, RayTaskError
from tqdm.auto import tqdm

from ggda.errors import GGDAError
from ggda.execution.jobs import Executor, Job, JobFn, call_job, limit_threads
from ggda.execution.store import ResultStore

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_SHARE_BYTES = 1 << 20  # kwargs values above this size go to the object store once, not per task


def _ray_task(
    fn: JobFn,
    names: list[str],
    threads: int,
    store_root: str | None,
    key: str,
    meta: dict,
    *values: object,
) -> tuple[dict | None, float]:
    """What runs on a Ray worker: cap threads, call the job, optionally store the result there.

    ``values`` are passed positionally so Ray resolves shared ``ObjectRef`` arguments (a data
    set put once into the object store) before the call; they pair up with ``names``.
    """
    limit_threads(threads)
    if store_root is not None:
        store = ResultStore(store_root)
        if store.has(key):  # a retry after the result was already written
            return None, float(store.get(key)[1].get("seconds", 0.0))
    result, seconds = call_job(fn, dict(zip(names, values, strict=True)))
    if store_root is None:
        return result, seconds
    ResultStore(store_root).put(key, result, {**meta, "seconds": seconds})
    return None, seconds


class RayExecutor(Executor):
    """Run :class:`~ggda.execution.Job` s as Ray tasks; results go to the store as they finish.

    Args:
        address: ``None`` starts a private local cluster with ``num_cpus`` CPUs; ``"auto"`` joins
            the cluster started on this machine with ``ray start`` (or ``RAY_ADDRESS``);
            ``"HOST:PORT"`` joins the cluster whose head node listens there (``ray://`` client
            addresses also work).
        num_cpus: CPUs of a cluster this executor starts (default: all cores); must be ``None``
            when joining a cluster (its nodes declare their own).
        threads_per_worker: CPUs each task requests and torch/BLAS threads it may use.
        gpus_per_task: GPUs each task requests (fractions allowed, e.g. 0.25 to pack four small
            trainings per GPU); jobs must then train on ``cuda``.
        retries: re-executions per task after its worker died (by Ray) or it raised (by the driver).
        max_in_flight: submitted-but-unfinished tasks at most (default: 2 × concurrent slots), so
            thousands of jobs do not flood the object store.
        store_on_worker: tasks write their results into the store directory themselves (needs a
            store path shared by all nodes); default: the driver writes.
        runtime_env: extra Ray runtime environment (e.g. ``{"pip": ["ggda"]}`` or ``py_modules``
            for nodes without ggda installed); thread-limit variables are added to its env_vars.
        init_kwargs: further ``ray.init`` arguments (``object_store_memory``, ``_temp_dir``, ...).
    """

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        threads_per_worker: int = 1,
        gpus_per_task: float = 0.0,
        retries: int = 2,
        max_in_flight: int | None = None,
        store_on_worker: bool = False,
        runtime_env: dict | None = None,
        init_kwargs: dict | None = None,
    ) -> None:
        if address is not None and num_cpus is not None:
            raise GGDAError(
                "num_cpus sets the size of a cluster ggda starts; leave it out with --address (the "
                "cluster's nodes declare their CPUs)."
            )
        if threads_per_worker < 1 or retries < 0 or gpus_per_task < 0:
            raise GGDAError("threads_per_worker must be >= 1, retries >= 0 and gpus_per_task >= 0.")
        self.address = address
        self.num_cpus = num_cpus
        self.threads = int(threads_per_worker)
        self.gpus_per_task = float(gpus_per_task)
        self.retries = int(retries)
        self.max_in_flight = max_in_flight
        self.store_on_worker = store_on_worker
        self.runtime_env = dict(runtime_env or {})
        self.init_kwargs = dict(init_kwargs or {})
        self._owns_session = False
        self._remote = None

    # -- cluster connection ---------------------------------------------------------------------
    def connect(self) -> RayExecutor:
        """Start or join the cluster (idempotent); called by :meth:`run` on first use."""
        if ray.is_initialized():
            return self  # someone else's session in this process: use it, never shut it down
        env = dict(self.runtime_env)
        env["env_vars"] = {**{v: str(self.threads) for v in _THREAD_VARS}, **env.get("env_vars", {})}
        kwargs: dict = {"runtime_env": env, "log_to_driver": False, **self.init_kwargs}
        if self.address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            kwargs.update(address="local", num_cpus=self.num_cpus or os.cpu_count() or 1)
            kwargs.setdefault("include_dashboard", False)
        else:
            kwargs["address"] = self.address
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = "start a local Ray cluster" if self.address is None else f"join Ray at '{self.address}'"
            raise GGDAError(
                f"Could not {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                "check that `ray status --address ADDRESS` works, or use --backend local."
            ) from exc
        self._owns_session = True
        return self

    def close(self) -> None:
        """Disconnect; stops the cluster only if this executor started it (``address=None``)."""
        if self._owns_session and ray.is_initialized():
            ray.shutdown()
        self._owns_session = False
        self._remote = None

    def __enter__(self) -> RayExecutor:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def slots(self) -> int:
        """Tasks that can run at once on the cluster with this executor's resource request."""
        resources = ray.cluster_resources()
        slots = int(resources.get("CPU", 1) // self.threads)
        if self.gpus_per_task > 0:
            slots = min(slots, int(resources.get("GPU", 0) // self.gpus_per_task))
        if slots < 1:
            raise GGDAError(
                f"The Ray cluster has {resources.get('CPU', 0)} CPUs and {resources.get('GPU', 0)} GPUs; a "
                f"task asks for {self.threads} CPUs and {self.gpus_per_task} GPUs. Lower "
                "threads_per_worker/gpus_per_task or add nodes."
            )
        return slots

    # -- running --------------------------------------------------------------------------------
    def _submit(self, remote, job: Job, store: ResultStore, shared: dict[int, tuple[object, ray.ObjectRef]]):
        names, values = [], []
        for name, value in job.kwargs.items():
            names.append(name)
            ref = shared.get(id(value))
            values.append(value if ref is None else ref[1])
        root = str(store.root.resolve()) if self.store_on_worker else None
        return remote.remote(job.fn, names, self.threads, root, job.key, job.meta, *values)

    @staticmethod
    def _shareable(todo: Sequence[Job]) -> list[object]:
        """kwargs values worth one object-store copy: used by several jobs, or large arrays."""
        seen: dict[int, tuple[object, int]] = {}
        for job in todo:
            for value in job.kwargs.values():
                if isinstance(value, (int, float, str, bool, type(None))):
                    continue
                obj, count = seen.get(id(value), (value, 0))
                seen[id(value)] = (obj, count + 1)
        return [
            obj
            for obj, count in seen.values()
            if count > 1 or (isinstance(obj, np.ndarray) and obj.nbytes > _SHARE_BYTES)
        ]

    def run(self, jobs: Sequence[Job], store: ResultStore, progress: bool = False) -> int:
        todo = self.pending(jobs, store)
        if not todo:
            return 0
        self.connect()
        if self._remote is None:
            self._remote = ray.remote(_ray_task)
        options: dict = {"num_cpus": self.threads, "max_retries": self.retries, "retry_exceptions": False}
        if self.gpus_per_task:
            options["num_gpus"] = self.gpus_per_task
        remote = self._remote.options(**options)
        limit = self.max_in_flight or 2 * self.slots()
        # Objects stay referenced in `shared` for the whole run, so their id() cannot be reused.
        shared = {id(obj): (obj, ray.put(obj)) for obj in self._shareable(todo)}
        attempts = {j.key: 0 for j in todo}
        queue = list(reversed(todo))  # pop() from the end keeps submission in job order
        running: dict = {}
        bar = tqdm(total=len(todo), desc="jobs (ray)", disable=not progress, leave=False)
        try:
            while queue or running:
                while queue and len(running) < limit:
                    job = queue.pop()
                    running[self._submit(remote, job, store, shared)] = job
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    job = running.pop(ref)
                    try:
                        result, seconds = ray.get(ref)
                    except RayTaskError as exc:  # the job function raised
                        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                        if isinstance(cause, GGDAError):
                            raise cause from None
                        attempts[job.key] += 1
                        if attempts[job.key] > self.retries:
                            raise cause from exc
                        queue.append(job)
                        continue
                    except RayError as exc:  # worker/node lost beyond Ray's own retries
                        raise GGDAError(
                            f"Job {job.key} lost its Ray worker {self.retries + 1} times "
                            f"({type(exc).__name__}); check memory per task or lower concurrency."
                        ) from exc
                    if result is None:
                        if not store.has(job.key):
                            raise GGDAError(
                                f"A Ray worker wrote job {job.key} to {store.root}, but the driver does not see "
                                "it: with store_on_worker=True the store must be on a filesystem shared by all "
                                "nodes (or use the default driver-side writes)."
                            )
                    else:
                        self._store(store, job, result, seconds)
                    bar.update(1)
        finally:
            for ref in running:
                ray.cancel(ref, force=False)
            bar.close()
        return len(todo)

    def describe(self) -> str:
        """One line on the cluster: nodes and resources (connects if needed)."""
        self.connect()
        res = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return (
            f"ray {ray.__version__}: {len(nodes)} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; "
            f"{self.threads} thread(s) per task, {self.slots()} concurrent task(s)"
        )
