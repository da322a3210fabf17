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
* **workers**: as on every backend, ``workers`` is how many jobs run at once: at most that many
  tasks are in flight, and a private cluster is started with ``workers × threads_per_worker``
  CPUs;
* **cluster ownership**: ``address=None`` starts a private local cluster (``ray.init`` with
  ``address="local"``, never silently joining someone else's), shut down by :meth:`close`, which
  also runs at exit and after SIGINT/SIGTERM (they unwind through ``atexit``). Even a SIGKILLed
  driver leaves nothing behind: a tiny watchdog process, started with the cluster, waits for the
  driver's end of a pipe to close and then stops every process of that cluster (Ray's dashboard
  and runtime-env agents otherwise outlive their driver). ``address="auto"`` or ``"HOST:PORT"``
  joins an existing cluster and :meth:`close` only disconnects; an already-initialised Ray session
  in this process is used and left alone;
* **Ray's own failures** — a task killed by Ray's out-of-memory monitor, a lost worker or node, a
  private cluster whose raylet or GCS died (checked every second, long before Ray's own 60 s
  "Failed to connect to GCS") — end the run with one :class:`~ggda.errors.GGDAError` that says what
  happened, how many jobs are stored, and to rerun the same command to resume.

Token authentication (on by default in recent Ray, e.g. 2.60, which writes ``~/.ray/auth_token``) is disabled
for clusters this executor starts, unless ``RAY_AUTH_MODE`` is already set, and the dashboard
is not started.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import ray
from ray.exceptions import OutOfMemoryError, RayError, RayTaskError

from ggda.errors import GGDAError
from ggda.execution.jobs import Executor, Job, JobFn, call_job, limit_threads
from ggda.execution.lock import DirectoryLock
from ggda.execution.store import ResultStore
from ggda.progress import progress as progress_bar

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_SHARE_BYTES = 1 << 20  # kwargs values above this size go to the object store once, not per task
_OWNER_VAR = "GGDA_RAY_OWNER"  # marks every process of a cluster ggda started (inherited env)
_VITAL = {"gcs_server": "GCS server", "raylet": "raylet"}  # a private cluster dies without these
_HEALTH_SECONDS = 1.0

# The watchdog of a private cluster: blocks on stdin until the driver's end of the pipe closes
# (a normal close, or the driver's death, SIGKILL included), then stops every process whose
# environment carries the cluster's owner token. Plain Python, no imports of ggda or Ray.
_WATCHDOG = r"""
import os, signal, sys, time
token = sys.argv[1].encode()
sys.stdin.buffer.read()
def ours():
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open("/proc/%s/environ" % name, "rb") as fh:
                    if token in fh.read().split(b"\0"):
                        found.append(int(name))
            except OSError:
                pass
    return found
for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 1.0)):
    pids = ours()
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    end = time.monotonic() + grace
    while pids and time.monotonic() < end:
        time.sleep(0.1)
        pids = [p for p in pids if os.path.exists("/proc/%d" % p)]
"""


def _signal_handlers() -> dict:
    """This process's SIGINT/SIGTERM handlers (main thread only: elsewhere they cannot change)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(handlers: dict) -> None:
    """``ray.init`` replaces SIGTERM's handler (by ``sys.exit(15)``, and a native one that aborts):
    put back the process's own, so SIGTERM still ends a ggda command cleanly with status 143."""
    for sig, handler in handlers.items():
        if handler is not None:
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_unwrapped() -> Iterator[None]:
    """Ray's blocking calls poll for signals in native code: an exception raised by a signal
    handler there (ggda's :class:`~ggda.execution.lifecycle.Interrupted` on SIGINT/SIGTERM) comes
    back wrapped in a ``SystemError``. Re-raise the signal's own exception."""
    try:
        yield
    except SystemError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, BaseException) and not isinstance(cause, Exception):
            raise cause from None
        raise


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
        num_cpus: CPUs of a cluster this executor starts (default: ``workers × threads_per_worker``,
            else all cores); must be ``None`` when joining a cluster (its nodes declare their own).
        workers: tasks running at once at most (as ``--workers`` means on every backend; default:
            as many as the cluster's CPUs allow).
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
        workers: int | None = None,
        threads_per_worker: int | None = 1,
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
        threads_per_worker = 1 if threads_per_worker is None else threads_per_worker
        if (
            threads_per_worker < 1
            or retries < 0
            or gpus_per_task < 0
            or (workers is not None and workers < 1)
        ):
            raise GGDAError(
                "workers and threads_per_worker must be >= 1, retries >= 0 and gpus_per_task >= 0."
            )
        self.address = address
        self.num_cpus = num_cpus
        self.workers = None if workers is None else int(workers)
        self.threads = int(threads_per_worker)
        self.gpus_per_task = float(gpus_per_task)
        self.retries = int(retries)
        self.max_in_flight = max_in_flight
        self.store_on_worker = store_on_worker
        self.runtime_env = dict(runtime_env or {})
        self.init_kwargs = dict(init_kwargs or {})
        self._owns_session = False
        self._remote = None
        self._watchdog: subprocess.Popen | None = None

    # -- cluster connection ---------------------------------------------------------------------
    def connect(self) -> RayExecutor:
        """Start or join the cluster (idempotent); called by :meth:`run` on first use."""
        if ray.is_initialized():
            return self  # someone else's session in this process: use it, never shut it down
        env = dict(self.runtime_env)
        env["env_vars"] = {**{v: str(self.threads) for v in _THREAD_VARS}, **env.get("env_vars", {})}
        kwargs: dict = {"runtime_env": env, "log_to_driver": False, **self.init_kwargs}
        token = None
        if self.address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            cpus = self.num_cpus or (self.workers * self.threads if self.workers else None)
            kwargs.update(address="local", num_cpus=cpus or os.cpu_count() or 1)
            kwargs.setdefault("include_dashboard", False)
            kwargs.setdefault("logging_level", logging.WARNING)  # ggda prints its own progress
            token = f"{os.getpid()}-{secrets.token_hex(8)}"
            self._start_watchdog(token)  # first: it also sweeps up after a failed start
            os.environ[_OWNER_VAR] = token  # inherited by every process of the new cluster
        else:
            kwargs["address"] = self.address
        handlers = _signal_handlers()
        try:
            ray.init(**kwargs)
        except BaseException as exc:
            self._stop_watchdog()
            if not isinstance(exc, (ConnectionError, ValueError, RuntimeError)):
                raise
            where = "start a local Ray cluster" if self.address is None else f"join Ray at '{self.address}'"
            raise GGDAError(
                f"Could not {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                "check that `ray status --address ADDRESS` works, or use --backend local."
            ) from exc
        finally:
            if token is not None:
                os.environ.pop(_OWNER_VAR, None)
            _restore_signal_handlers(handlers)
        self._owns_session = True
        atexit.register(self.close)
        return self

    def _start_watchdog(self, token: str) -> None:
        if not sys.platform.startswith("linux"):
            return  # it reads /proc; elsewhere the atexit/signal paths are the only teardown
        with contextlib.suppress(OSError):
            self._watchdog = subprocess.Popen(
                [sys.executable, "-S", "-c", _WATCHDOG, f"{_OWNER_VAR}={token}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C to the driver's group must not stop it first
            )

    def close(self) -> None:
        """Disconnect; stops the cluster only if this executor started it (``address=None``).

        Registered with ``atexit`` on connect, so it also runs at exit and after SIGINT/SIGTERM.
        """
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if self._owns_session and ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.shutdown()
        self._owns_session = False
        self._remote = None
        self._stop_watchdog()

    def _stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:  # closing its pipe makes it sweep up stragglers and exit
            with contextlib.suppress(Exception):
                watchdog.stdin.close()
                watchdog.wait(timeout=10)

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
        with DirectoryLock(store.root):
            todo = self.pending(todo, store)
            if todo:
                self._run(todo, store, progress)
        return len(todo)

    def _run(self, todo: list[Job], store: ResultStore, progress: bool) -> None:
        self.connect()
        if self._remote is None:
            self._remote = ray.remote(_ray_task)
        options: dict = {"num_cpus": self.threads, "max_retries": self.retries, "retry_exceptions": False}
        if self.gpus_per_task:
            options["num_gpus"] = self.gpus_per_task
        remote = self._remote.options(**options)
        limit = self.max_in_flight or 2 * self._ray(self.slots, todo=todo, store=store)
        if self.workers:
            limit = min(limit, self.workers)
        # Objects stay referenced in `shared` for the whole run, so their id() cannot be reused.
        shared = {
            id(obj): (obj, self._ray(ray.put, obj, todo=todo, store=store)) for obj in self._shareable(todo)
        }
        attempts = {j.key: 0 for j in todo}
        queue = list(reversed(todo))  # pop() from the end keeps submission in job order
        running: dict = {}
        bar = progress_bar(total=len(todo), desc="jobs (ray)", disable=not progress)
        try:
            while queue or running:
                while queue and len(running) < limit:
                    job = queue.pop()
                    running[self._ray(self._submit, remote, job, store, shared, todo=todo, store=store)] = job
                done = self._wait(list(running), todo, store)
                for ref in done:
                    job = running.pop(ref)
                    try:
                        with _signals_unwrapped():
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
                    except (RayError, ConnectionError) as exc:  # Ray's own failure, beyond its retries
                        raise self._failure(exc, todo, store, job) from exc
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
            bar.close()
            if running and ray.is_initialized():  # (after a lost cluster, any ray call would hang)
                self._keep_finished(running, store)
                for ref in running:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)  # stop the workers now; the rest is not wanted

    # -- Ray's failures -------------------------------------------------------------------------
    def _ray(self, fn, *args, todo: list[Job], store: ResultStore, **kwargs):
        """Call a Ray API function; Ray's own failures become one GGDAError."""
        try:
            with _signals_unwrapped():
                return fn(*args, **kwargs)
        except GGDAError:
            raise
        except (RayError, ConnectionError) as exc:
            raise self._failure(exc, todo, store) from exc

    def _wait(self, refs: list, todo: list[Job], store: ResultStore) -> list:
        """Refs that finished (at least one); checks every second that a private cluster lives."""
        while True:
            done, _ = self._ray(
                ray.wait, refs, num_returns=1, timeout=_HEALTH_SECONDS, todo=todo, store=store
            )
            if done:
                return done
            dead = self._dead_processes()
            if dead:
                raise self._failure(None, todo, store, dead=dead)

    def _dead_processes(self) -> list[str]:
        """Vital processes of the cluster this executor started that have died (else [])."""
        if not self._owns_session or self.address is not None:
            return []
        try:
            node = ray._private.worker._global_node
            return sorted({name for name, _ in node.dead_processes() if name in _VITAL})
        except Exception:  # private API moved: no check rather than a false alarm
            return []

    def _failure(
        self, exc: BaseException | None, todo: list[Job], store: ResultStore, job: Job | None = None,
        dead: list[str] | None = None,
    ) -> GGDAError:  # fmt: skip
        stored = sum(store.has(j.key) for j in todo)
        resume = (
            f"{stored} of {len(todo)} jobs of this run are stored in {store.root}; rerun the same command "
            "to resume"
        )
        dead = dead if dead is not None else self._dead_processes()
        if dead:
            what = (
                f"The Ray cluster ggda started lost its {' and '.join(_VITAL[d] for d in dead)} (killed, "
                "most often by the system's out-of-memory killer)"
            )
            self.close()  # it cannot recover; stop what is left of it
            return GGDAError(f"{what}; {resume}, with fewer --workers or --backend local.")
        if isinstance(exc, OutOfMemoryError):
            what = f"Ray killed job {job.key if job else '?'} for lack of memory {self.retries + 1} times"
            return GGDAError(f"{what}; {resume} with fewer --workers (or more memory per task).")
        first = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
        kind = type(exc).__name__ if exc is not None else "RayError"
        if job is not None:
            what = f"Job {job.key} lost its Ray worker or node {self.retries + 1} times ({kind}: {first})"
        else:
            where = "the Ray cluster" if self.address is None else f"the Ray cluster at {self.address}"
            what = f"Lost contact with {where} ({kind}: {first})"
        return GGDAError(f"{what}; {resume}, with fewer --workers if memory is short.")

    def _keep_finished(self, running: dict, store: ResultStore) -> None:
        """After an error or a signal: store the results that already arrived."""
        try:
            done, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
        except Exception:
            return
        for ref in done:
            job = running[ref]
            try:
                result, seconds = ray.get(ref, timeout=1)
                if result is not None:
                    self._store(store, job, result, seconds)
            except Exception:  # never mask the error that ended the run
                continue

    def describe(self) -> str:
        """One line on the cluster: nodes and resources (connects if needed)."""
        self.connect()
        res = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return (
            f"ray {ray.__version__}: {len(nodes)} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; "
            f"{self.threads} thread(s) per task, {self.slots()} concurrent task(s)"
        )
