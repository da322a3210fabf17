"""Signals and processes: Ctrl-C/SIGTERM end a command with one line and 130/143, keeping what is
stored (a rerun resumes to identical results); local-pool workers never outlive their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ggda.execution.lifecycle import INTERRUPTED_MESSAGE, Interrupted, exit_on_signals

ROOT = Path(__file__).resolve().parents[2]
GGDA = str(Path(sys.executable).with_name("ggda"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# A command that runs jobs on the local pool the way the CLI does (signals → Interrupted → status).
_POOL_SCRIPT = """
import sys
from ggda.execution import Job, LocalExecutor, ResultStore
from ggda.execution.lifecycle import INTERRUPTED_MESSAGE, Interrupted, exit_on_signals
from tests.execution import _jobs
jobs = [Job(f"k{i}", _jobs.sleepy, {"x": i, "seconds": 0.2 if i < 2 else 60.0}) for i in range(6)]
try:
    with exit_on_signals():
        LocalExecutor(workers=2, threads_per_worker=1, retries=0).run(jobs, ResultStore(sys.argv[1]))
except Interrupted as exc:
    print(INTERRUPTED_MESSAGE, file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (pool workers and multiprocessing's resource tracker)."""
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(name))
    return kids


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _stored(store: Path) -> int:
    return len(list(store.glob("*.json"))) if store.is_dir() else 0


def test_signals_raise_interrupted_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as err, exit_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
    assert err.value.exit_code == 143 and err.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # ignored (nohup) stays ignored
    try:
        with exit_on_signals():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_pool_workers_die_with_their_parent(tmp_path, sig):
    """SIGTERM: status 143, one line, finished results kept, workers stopped at once (not after
    their 60 s jobs). SIGKILL: no orphaned workers or resource tracker left."""
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", _POOL_SCRIPT, str(store)],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: _stored(store) >= 2, 120, "the first results")
        kids = _children(proc.pid)
        assert len(kids) >= 2  # two workers (+ the resource tracker)
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        _wait_for(lambda: not _alive(kids), 10, f"workers {kids} to exit")
        assert time.monotonic() - t0 < 20  # not after the 60 s jobs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143
        assert err.strip().splitlines() == [INTERRUPTED_MESSAGE]
    assert _stored(store) == 2  # what finished is kept; nothing else is written


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from ggda.models.training import TrainConfig
    from ggda.runs import DataSpec, Run

    path = tmp_path_factory.mktemp("sig") / "run"
    Run.create(path, DataSpec("digits", max_train=100), "logreg", TrainConfig(epochs=2, lr=0.05))
    return path


def _sigint_as_at_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _gold(run: Path, out: Path, backend: str, *extra: str) -> list[str]:
    return [
        GGDA, "gold", "--run", str(run), "--n-units", "16", "--chunk", "1", "--path", "sequential",
        "--epochs", "2", "--targets", "5", "--backend", backend, "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_ctrl_c_on_gold_keeps_results_and_resumes_identically(tiny_run, tmp_path, capsys):
    out = tmp_path / "interrupted"
    # Ctrl-C reaches a command started from a terminal; a test run started in the background of
    # a non-interactive shell inherits SIGINT ignored, which ggda (rightly) keeps, so the child
    # gets the terminal's default disposition back
    proc = subprocess.Popen(
        _gold(tiny_run, out, "local", "--workers", "2"),
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_sigint_as_at_a_terminal,
    )  # fmt: skip
    try:
        _wait_for(lambda: _stored(out / "store") >= 1, 120, "the first stored job")
        kids = _children(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert lines[-1] == INTERRUPTED_MESSAGE and "Traceback" not in err
    assert sum(INTERRUPTED_MESSAGE in line for line in lines) == 1
    kept = _stored(out / "store")
    assert kept >= 1 and not (out / "gold.npz").exists()
    _wait_for(lambda: not _alive(kids), 10, "the workers to exit")

    # Rerun (in this process, as `ggda` would run it: no second interpreter start-up) and compare
    # with an uninterrupted run.
    assert _main(_gold(tiny_run, out, "serial")[1:], capsys) == 0
    assert f"ran now {17 - kept})" in capsys.readouterr().out  # only what was missing
    reference = tmp_path / "reference"
    assert _main(_gold(tiny_run, reference, "serial")[1:], capsys) == 0
    with np.load(out / "gold.npz") as a, np.load(reference / "gold.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key


def _main(argv: list[str], capsys) -> int:
    from ggda.cli.main import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
