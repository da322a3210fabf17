import numpy as np
import pytest

from ggda.errors import GGDAError
from ggda.execution import Job, LocalExecutor, ResultStore, SerialExecutor, job_key, make_executor
from tests.execution import _jobs


def test_store_roundtrip_and_atomic(tmp_path):
    store = ResultStore(tmp_path)
    store.put("a", {"x": np.arange(3)}, {"seed": 1})
    arrays, meta = store.get("a")
    assert arrays["x"].tolist() == [0, 1, 2] and meta["seed"] == 1
    (tmp_path / "b.npz").write_bytes(b"partial")  # npz without json = incomplete, not trusted
    assert store.keys() == ["a"] and not store.has("b")
    with pytest.raises(GGDAError, match="job_key"):
        store.put("bad/key", {})


def test_job_key_stable_and_distinct():
    assert job_key({"lr": 0.1}, seed=1) == job_key({"lr": 0.1}, seed=1)
    assert job_key({"lr": 0.1}, seed=1) != job_key({"lr": 0.2}, seed=1)


@pytest.mark.parametrize("executor", [SerialExecutor(), LocalExecutor(workers=2)])
def test_runs_skips_done_and_matches(tmp_path, executor):
    store = ResultStore(tmp_path)
    jobs = [Job(f"k{i}", _jobs.square, {"x": i}) for i in range(6)]
    store.put("k0", {"y": np.array([0])})  # already done: must be skipped
    assert executor.run(jobs, store) == 5
    assert [int(store.get(f"k{i}")[0]["y"][0]) for i in range(6)] == [i * i for i in range(6)]
    assert executor.run(jobs, store) == 0  # resume: nothing left


def test_retry_transient_failure(tmp_path):
    store = ResultStore(tmp_path / "s")
    SerialExecutor(retries=1).run([Job("f", _jobs.flaky, {"path": str(tmp_path / "m")})], store)
    assert store.has("f")


@pytest.mark.slow
def test_lost_worker_is_survived(tmp_path):
    store = ResultStore(tmp_path / "s")
    jobs = [Job(f"j{i}", _jobs.suicide_once, {"path": str(tmp_path / f"m{i % 2}"), "x": i}) for i in range(4)]
    LocalExecutor(workers=2, retries=2).run(jobs, store)
    assert sorted(int(store.get(j.key)[0]["y"][0]) for j in jobs) == [0, 1, 2, 3]


def test_unknown_backend():
    with pytest.raises(GGDAError, match="local"):
        make_executor("spark")
    with pytest.raises(GGDAError, match="share a key"):
        SerialExecutor().run(
            [Job("a", _jobs.square, {"x": 1}), Job("a", _jobs.square, {"x": 2})], ResultStore("/tmp/x_ggda")
        )
