"""Directory locks: one command per output directory, stale locks taken over, nothing left behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ggda.errors import GGDAError
from ggda.execution import Job, LocalExecutor, ResultStore, SerialExecutor
from ggda.execution import lock as lockmod
from ggda.execution.lock import LOCK_NAME, DirectoryLock, claim_directory
from tests.execution import _jobs

ROOT = Path(__file__).resolve().parents[2]
# Another command holding a lock, kept light (no torch/numpy imports): lock.py loaded by path.
_HOLDER = """
import importlib.util, sys, time
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
load("ggda.errors", sys.argv[3] + "/errors.py")
load("ggda_lock", sys.argv[3] + "/execution/lock.py").DirectoryLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold(directory: Path, seconds: float = 60.0) -> subprocess.Popen:
    """Another process holding the lock on ``directory``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(directory), str(seconds), str(ROOT / "src" / "ggda")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_claim_release_reentrant_and_clean(tmp_path):
    d = tmp_path / "out"
    with claim_directory(d) as lock:
        info = json.loads((d / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert "started" in info and info["command"]
        with DirectoryLock(d):  # the same process again (gold OUT, then its executor): fine
            assert lock.held
        assert (d / LOCK_NAME).exists()  # still claimed by the outer block
    assert not (d / LOCK_NAME).exists()  # a finished command leaves nothing behind
    lock.release()  # idempotent


def test_second_process_is_refused_naming_the_holder(tmp_path):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(GGDAError) as err:
            DirectoryLock(tmp_path).acquire()
        msg = str(err.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg
        assert "wait for it to finish" in msg and "another output directory" in msg
        assert "\n" not in msg
        # executors claim their store: two commands never run the same jobs at once
        jobs = [Job("k0", _jobs.square, {"x": 2})]
        for ex in (SerialExecutor(), LocalExecutor(workers=2)):
            with pytest.raises(GGDAError, match="in use by another ggda command"):
                ex.run(jobs, ResultStore(tmp_path))
        assert not ResultStore(tmp_path).has("k0")
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing (SIGKILL): the kernel dropped its flock, the next one claims it
    assert (tmp_path / LOCK_NAME).exists()
    assert SerialExecutor().run([Job("k0", _jobs.square, {"x": 2})], ResultStore(tmp_path)) == 1
    assert int(ResultStore(tmp_path).get("k0")[0]["y"][0]) == 4
    assert not (tmp_path / LOCK_NAME).exists()


def test_wait_for_the_holder(tmp_path):
    holder = _hold(tmp_path, seconds=1.0)
    with pytest.raises(GGDAError):
        DirectoryLock(tmp_path).acquire()  # wait=0 (the default): refused at once
    with DirectoryLock(tmp_path, wait=60):  # claimed as soon as the holder has ended
        assert holder.wait(timeout=5) == 0


def test_stale_lock_file_is_taken_over(tmp_path):
    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "started": "earlier", "command": "ggda gold"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    with DirectoryLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_without_flock_the_contents_decide(tmp_path, monkeypatch):
    """Filesystems without flock: dead pid on this host → taken over; live → refused; other host →
    refused with the file to delete."""
    monkeypatch.setattr(lockmod.DirectoryLock, "_flock", staticmethod(lambda fd: None))
    path = tmp_path / LOCK_NAME
    here = socket.gethostname()
    path.write_text(json.dumps({"pid": _dead_pid(), "host": here}))
    with DirectoryLock(tmp_path):
        pass
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({"pid": sleeper.pid, "host": here, "command": "ggda evaluate"}))
        with pytest.raises(GGDAError, match=f"pid {sleeper.pid}"):
            DirectoryLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "command": "ggda gold"}))
    with pytest.raises(GGDAError, match=f"delete {path}"):
        DirectoryLock(tmp_path).acquire()


def test_output_under_a_file_is_one_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(GGDAError, match="choose another output path"):
        DirectoryLock(tmp_path / "f" / "out").acquire()


def test_retrainer_claims_its_store(tmp_path, small_digits):
    from ggda.evaluate import Retrainer, RetrainSpec
    from ggda.models import ModelSpec, TrainConfig

    train, test = small_digits
    spec = RetrainSpec(ModelSpec("logreg", train.n_features, train.n_outputs), TrainConfig(epochs=1))
    holder = _hold(tmp_path / "store")
    try:
        with pytest.raises(GGDAError, match="in use by another ggda command"):
            Retrainer(spec, tmp_path / "store", executor=SerialExecutor(), train=train, test=test)
    finally:
        holder.kill()
        holder.wait()
    with Retrainer(spec, tmp_path / "store", executor=SerialExecutor(), train=train, test=test) as r:
        assert (tmp_path / "store" / LOCK_NAME).exists()
        out = r.run_pairs([(np.array([0]), 0)])
        assert out.losses.shape == (1, 1, len(test))
    assert not (tmp_path / "store" / LOCK_NAME).exists()
