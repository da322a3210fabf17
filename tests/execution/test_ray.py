"""The Ray backend against a real local Ray cluster started by this module (``ray start --head``).

One cluster serves every test here (module fixture); it is joined by address, exactly as a user
points ggda at an existing cluster, and stopped by signalling the head process this module
started (never ``ray stop``, which would stop other people's clusters on the machine).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from ggda.errors import GGDAError  # noqa: E402
from ggda.execution import Job, LocalExecutor, ResultStore, job_key, make_executor  # noqa: E402
from ggda.execution.lifecycle import INTERRUPTED_MESSAGE  # noqa: E402
from ggda.execution.ray_backend import RayExecutor  # noqa: E402
from tests.execution import _jobs, _scale_jobs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Start a 2-CPU head node on 127.0.0.1 and yield its address; SIGTERM it afterwards."""
    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    log = tmp_path_factory.mktemp("ray") / "head.log"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    ray_cli = Path(sys.executable).with_name("ray")
    with open(log, "w") as fh:
        head = subprocess.Popen(
            [str(ray_cli), "start", "--head", "--port", str(port), "--num-cpus", "2", "--node-ip-address",
             "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats", "--block"],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "will now block" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()


@pytest.fixture(scope="module")
def executor(cluster):
    ex = RayExecutor(address=cluster, retries=2)
    ex.connect()
    yield ex
    ex.close()
    assert not ray.is_initialized()  # joined cluster: disconnected, not stopped (head still owns it)


def _retraining_jobs(small_digits, n_jobs=4):
    train, test = small_digits
    rng = np.random.default_rng(0)
    config = {"model": "logreg", "epochs": 3, "subset": 200}
    return [
        Job(
            job_key(config, unit=i, seed=i),
            _scale_jobs.train_subset,
            {
                "train": train,
                "test": test,
                "keep": np.sort(rng.choice(len(train), 200, replace=False)),
                "seed": i,
            },
            meta={"unit": i},
        )
        for i in range(n_jobs)
    ]


def test_ray_matches_local_backend_exactly(executor, small_digits, tmp_path):
    jobs = _retraining_jobs(small_digits)
    local, remote = ResultStore(tmp_path / "local"), ResultStore(tmp_path / "ray")
    LocalExecutor(workers=1, threads_per_worker=1).run(jobs, local)
    remote.put(jobs[0].key, *local.get(jobs[0].key))  # a finished job: must be skipped
    assert executor.run(jobs, remote) == len(jobs) - 1
    for job in jobs:
        a, b = local.get(job.key)[0], remote.get(job.key)[0]
        np.testing.assert_array_equal(a["params"], b["params"])  # bit-identical retrainings
        np.testing.assert_array_equal(a["test_loss"], b["test_loss"])
        assert int(b["threads"][0]) == 1  # workers capped their torch threads
    assert remote.get(jobs[1].key)[1]["unit"] == 1 and "seconds" in remote.get(jobs[1].key)[1]
    assert executor.run(jobs, remote) == 0  # resume: nothing left to do


def test_killed_worker_is_survived(executor, tmp_path):
    store = ResultStore(tmp_path / "s")
    jobs = [Job(f"j{i}", _jobs.suicide_once, {"path": str(tmp_path / f"m{i}"), "x": i + 1}) for i in range(2)]
    jobs.append(Job("plain", _jobs.square, {"x": 3}))
    assert executor.run(jobs, store) == 3
    assert [int(store.get(k)[0]["y"][0]) for k in ("j0", "j1", "plain")] == [1, 2, 9]
    assert all((tmp_path / f"m{i}").exists() for i in range(2))  # every job really lost its worker once


def test_transient_failure_retried_and_retries_bounded(executor, tmp_path):
    store = ResultStore(tmp_path / "s")
    executor.run([Job("flaky", _jobs.flaky, {"path": str(tmp_path / "marker")})], store)
    assert store.has("flaky")
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    with pytest.raises(RuntimeError, match="permanent failure"):
        executor.run([Job("bad", _scale_jobs.always_fails, {"counter_dir": str(attempts)})], store)
    assert len(list(attempts.iterdir())) == executor.retries + 1 and not store.has("bad")
    user = tmp_path / "user"
    user.mkdir()
    with pytest.raises(GGDAError, match="fix the configuration"):
        executor.run([Job("user", _scale_jobs.user_error, {"counter_dir": str(user)})], store)
    assert len(list(user.iterdir())) == 1  # user errors are not retried


def test_worker_side_writes(cluster, tmp_path):
    store = ResultStore(tmp_path / "s")
    ex = RayExecutor(address=cluster, store_on_worker=True)  # same session: joins, never owns it
    jobs = [Job(f"k{i}", _jobs.square, {"x": i}) for i in range(5)]
    assert ex.run(jobs, store) == 5
    assert [int(store.get(f"k{i}")[0]["y"][0]) for i in range(5)] == [i * i for i in range(5)]
    assert {int(store.get(f"k{i}")[0]["pid"][0]) for i in range(5)}.isdisjoint({os.getpid()})
    ex.close()
    assert ray.is_initialized()  # it did not start this session, so it left it alone


def test_bad_arguments():
    with pytest.raises(GGDAError, match="num_cpus"):
        RayExecutor(address="auto", num_cpus=2)
    assert isinstance(make_executor("ray", address="auto"), RayExecutor)


@pytest.mark.slow
def test_private_cluster_started_and_stopped(tmp_path):
    """address=None starts its own local cluster and close() stops it (run in a fresh process)."""
    script = f"""
import numpy as np, ray
from ggda.execution import Job, ResultStore
from ggda.execution.ray_backend import RayExecutor
from tests.execution import _jobs
with RayExecutor(num_cpus=1) as ex:
    store = ResultStore({str(tmp_path / "s")!r})
    assert ex.run([Job(f"k{{i}}", _jobs.square, {{"x": i}}) for i in range(3)], store) == 3
    assert ray.cluster_resources()["CPU"] == 1
    print(ex.describe())
assert not ray.is_initialized()
print("ok", sorted(int(store.get(k)[0]["y"][0]) for k in store.keys()))
"""
    env = {**os.environ, "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok [0, 1, 4]" in out.stdout and "1 concurrent task" in out.stdout


def test_feature_store_built_by_ray_tasks(executor, small_digits, tmp_path):
    """Chunks computed by Ray tasks (shared filesystem) are byte-identical to an in-process build."""
    from ggda.models import build_model
    from ggda.store import build_gradient_store
    from ggda.task import AttributionTask

    train, _ = small_digits
    task = AttributionTask(build_model("logreg", train.n_features, train.n_outputs, seed=0))
    local = build_gradient_store(tmp_path / "a", task, train.X, train.y, chunk_rows=100)
    remote = build_gradient_store(tmp_path / "b", task, train.X, train.y, chunk_rows=100, executor=executor)
    assert remote.complete and remote.n_chunks == 3
    for c in range(3):
        assert remote.chunk_path(c).read_bytes() == local.chunk_path(c).read_bytes()


def test_workers_means_concurrent_tasks(cluster, tmp_path):
    """`--workers N` is accepted by every backend; for Ray it caps the tasks running at once."""
    from ggda.runs import Run

    assert Run.executor("ray", 2).workers == 2  # used to raise TypeError (evaluate, gold, experiment)
    ex = make_executor("ray", address=cluster, workers=1)
    jobs = [Job(f"t{i}", _jobs.timed, {"x": i, "seconds": 0.3}) for i in range(4)]
    store = ResultStore(tmp_path / "s")
    assert ex.run(jobs, store) == 4
    spans = sorted(tuple(store.get(j.key)[0]["span"]) for j in jobs)
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:], strict=False))  # never two at once
    with pytest.raises(GGDAError, match="workers"):
        RayExecutor(workers=0)


_PRIVATE_CLUSTER = """
import sys
from ggda.errors import GGDAError
from ggda.execution import Job, ResultStore
from ggda.execution.ray_backend import RayExecutor
from tests.execution import _jobs
jobs = [Job(f"k{i}", _jobs.sleepy, {"x": i, "seconds": 0.1 if i < 2 else 60.0}) for i in range(6)]
from ggda.execution.lifecycle import INTERRUPTED_MESSAGE, Interrupted, exit_on_signals
try:
    with exit_on_signals():  # as `ggda` runs every command
        RayExecutor(workers=2, retries=0).run(jobs, ResultStore(sys.argv[1]))
except GGDAError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
except Interrupted as exc:
    print(INTERRUPTED_MESSAGE, file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def _cluster_processes() -> dict[int, str]:
    """Processes of clusters ggda started (they carry its owner token in their environment)."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if b"GGDA_RAY_OWNER=" in Path(f"/proc/{name}/environ").read_bytes():
                    found[int(name)] = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("victim", ["raylet", "driver", "sigterm"])
def test_private_cluster_failures_and_teardown(tmp_path, victim):
    """A private cluster that loses its raylet (as under the OOM killer) ends the run with one error
    line saying how to resume; SIGTERM (whose handler ``ray.init`` replaces) still ends it with 143
    and one line; a SIGKILLed driver leaves no Ray process behind (its watchdog)."""
    store = tmp_path / "s"
    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _PRIVATE_CLUSTER, str(store)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(list(store.glob("*.json"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.1)
        before = _cluster_processes()
        assert any(cmd.endswith("raylet") for cmd in before.values())
        if victim == "raylet":
            os.kill(next(p for p, cmd in before.items() if cmd.endswith("raylet")), signal.SIGKILL)
        elif victim == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if victim == "raylet":
        assert proc.returncode == 2
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "lost its raylet" in lines[0] and "rerun the same command" in lines[0]
        assert "2 of 6 jobs" in lines[0] and "Traceback" not in err
    if victim == "sigterm":
        assert proc.returncode == 143 and err.strip().splitlines()[-1] == INTERRUPTED_MESSAGE, err[-3000:]
        assert len(list(store.glob("*.json"))) == 2
    deadline = time.monotonic() + 20
    while set(_cluster_processes()) & set(before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(_cluster_processes()) & set(before), _cluster_processes()
