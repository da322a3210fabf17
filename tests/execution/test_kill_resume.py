"""Kill at random points, rerun, compare: every resumable command ends with results bit-identical
to an uninterrupted run, however often it was SIGKILLed (no cleanup, no signal handler) midway.

Commands: ``ggda gold`` (stored further-training jobs), ``ggda evaluate retraining`` (stored
retrains) and ``ggda features build`` (stored feature chunks). Kill times are drawn from a seeded
generator so a failure reproduces.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
GGDA = str(Path(sys.executable).with_name("ggda"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
KILLS = 2  # random kill points per command


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from ggda.models.training import TrainConfig
    from ggda.runs import DataSpec, Run

    path = tmp_path_factory.mktemp("kill") / "run"
    Run.create(path, DataSpec("digits", max_train=100), "logreg", TrainConfig(epochs=2, lr=0.05))
    return path


def _commands(run: Path, out: Path) -> dict[str, tuple[list[str], Path, str]]:
    """name -> (argv after `ggda`, the result that must match an uninterrupted run, the glob of
    the units of work it stores as they finish)."""
    return {
        "gold": (
            ["gold", "--run", str(run), "--n-units", "12", "--chunk", "1", "--path", "sequential",
             "--epochs", "2", "--targets", "4", "--backend", "serial", "--out", str(out / "gold")],
            out / "gold" / "gold.npz",
            "gold/store/*.json",
        ),
        "evaluate": (
            ["evaluate", "retraining", "--run", str(run), "--method", "grad-dot", "--grouping", "random:10",
             "--fractions", "0.1,0.2", "--seeds", "2", "--epochs", "2", "--backend", "serial",
             "--out", str(out / "evaluate"), "--store", str(out / "retrains")],
            out / "evaluate",
            "retrains/*.json",
        ),
        "features": (
            ["features", "build", "--run", str(run), "--out", str(out / "store"), "--proj-dim", "32",
             "--chunk-rows", "10", "--backend", "inline"],
            out / "store",
            "store/chunks/*.npy",
        ),
    }  # fmt: skip


def _main(argv: list[str]) -> int:
    from ggda.cli.main import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array a result holds: one .npz, or every .npz/.npy/.csv under a directory (by name)."""
    kinds = (".npz", ".npy", ".csv")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in kinds)
    out = {}
    for f in files:
        name = str(f.relative_to(path.parent if path.is_file() else path))
        if f.suffix == ".npy":
            out[name] = np.load(f)
        elif f.suffix == ".csv":  # a table of the results, compared as text
            out[name] = np.array(f.read_text())
        else:
            with np.load(f) as data:
                out.update({f"{name}:{k}": data[k] for k in data.files})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("command", ["gold", "evaluate", "features"])
def test_sigkill_at_random_points_then_resume_is_bit_identical(run_dir, tmp_path, command, capsys):
    out = tmp_path / "killed"
    argv, result, units = _commands(run_dir, out)[command]
    ref_argv, ref_result, _ = _commands(run_dir, tmp_path / "reference")[command]
    assert _main(ref_argv) == 0
    capsys.readouterr()
    rng = np.random.default_rng(sum(map(ord, command)))
    killed = 0
    for _ in range(KILLS):
        before = len(list(out.glob(units)))
        proc = subprocess.Popen(
            [GGDA, *argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 120
        while proc.poll() is None and len(list(out.glob(units))) <= before and time.monotonic() < deadline:
            time.sleep(0.02)  # until this process has stored new work ...
        time.sleep(float(rng.uniform(0.0, 0.3)))  # ... then kill it at a random point after that
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait(timeout=60)
    assert killed >= 1, "the command finished before any kill: give it more work"
    assert _main(argv) == 0  # resume to the end
    got, want = _arrays(result), _arrays(ref_result)
    assert got and sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(got[key], want[key]), key
