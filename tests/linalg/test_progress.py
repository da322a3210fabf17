"""Progress of long solves (issue #19): iteration/residual lines when asked, silence otherwise,
and the same numbers either way."""

import io
import time

import numpy as np
import pytest
import torch

import ggda.progress
from ggda.linalg.arnoldi import arnoldi
from ggda.linalg.cg import ihvp_cg
from ggda.linalg.lissa import ihvp_lissa
from ggda.progress import Iterations, set_default, wanted


@pytest.fixture(autouse=True)
def _no_delay(monkeypatch):
    """Show progress from the first iteration (solves here take milliseconds)."""
    monkeypatch.setattr(ggda.progress, "DELAY_SECONDS", 0.0)


def _spd(p: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, p, generator=g, dtype=torch.float64)
    return A @ A.T / p + 0.1 * torch.eye(p, dtype=torch.float64)


def test_cg_reports_iterations_and_residual_and_scores_do_not_change(capsys):
    H = _spd()
    B = torch.randn(3, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    quiet = ihvp_cg(lambda V: V @ H, B, damping=0.01, tol=1e-10, max_iter=500)
    assert capsys.readouterr().err == ""  # off by default in the library
    loud = ihvp_cg(lambda V: V @ H, B, damping=0.01, tol=1e-10, max_iter=500, progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("CG solve") for line in lines)
    last = lines[-1]  # the final line: the iteration count the solve stopped at and its residual
    assert f"iteration {loud.iterations}/500" in last
    residual = float(last.split("residual=")[1].split(",")[0])
    assert residual == float(f"{float(loud.residual.max()):.3g}") and residual <= 1e-10
    assert "active=0/3" in last
    assert torch.equal(quiet.x, loud.x) and quiet.iterations == loud.iterations


def test_lissa_and_arnoldi_report_and_match(capsys):
    H = _spd(30)
    B = torch.randn(2, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = ihvp_lissa(lambda V: V @ H, B, damping=0.1, scale=20.0, depth=40)
    b = ihvp_lissa(lambda V: V @ H, B, damping=0.1, scale=20.0, depth=40, progress=True)
    err = capsys.readouterr().err
    assert torch.equal(a, b)
    assert "LiSSA" in err and "iteration 40/40" in err and "residual=" in err
    e1 = arnoldi(lambda V: V @ H, 30, iterations=20, rank=5, dtype=torch.float64)
    e2 = arnoldi(lambda V: V @ H, 30, iterations=20, rank=5, dtype=torch.float64, progress=True)
    err = capsys.readouterr().err
    assert torch.equal(e1.values, e2.values) and torch.equal(e1.vectors, e2.vectors)
    assert "Arnoldi" in err and "iteration 20/20" in err and "residual=" in err


def test_default_switch_and_plain_lines_off_a_terminal():
    assert wanted(None) is False and wanted(True) is True
    previous = set_default(True)
    try:
        assert wanted(None) is True and wanted(False) is False
    finally:
        set_default(previous)
    out = io.StringIO()  # not a terminal: plain lines, no carriage returns
    with Iterations("solve", 3, progress=True, file=out) as bar:
        for k in range(3):
            bar.step(residual=10.0**-k)
    text = out.getvalue()
    assert "\r" not in text and text.strip().splitlines()[-1].startswith("solve: iteration 3/3")
    assert "residual=0.01" in text


def test_influence_methods_pass_progress_through(capsys):
    """if-cg with progress=True reports power iteration and CG; scores equal the quiet run."""
    from ggda.data.dataset import Dataset
    from ggda.methods import make_method
    from ggda.properties import ExampleLoss
    from ggda.task import AttributionTask

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 5)), rng.integers(0, 3, 60)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    task, prop = AttributionTask(model), ExampleLoss(X[:4], y[:4])
    quiet = make_method("if-cg", task).cache(Dataset(X, y)).attribute(prop)
    assert capsys.readouterr().err == ""
    loud = make_method("if-cg", task, progress=True).cache(Dataset(X, y)).attribute(prop)
    err = capsys.readouterr().err
    assert "power iteration" in err and "CG solve" in err and "residual=" in err
    np.testing.assert_array_equal(quiet, loud)
    make_method("ekfac", task, progress=True).cache(Dataset(X, y))
    assert "EK-FAC fit" in capsys.readouterr().err


def test_short_computations_print_nothing(monkeypatch):
    monkeypatch.setattr(ggda.progress, "DELAY_SECONDS", 0.2)
    out = io.StringIO()
    with Iterations("quick", 3, progress=True, file=out) as bar:
        for _ in range(3):
            bar.step(residual=1.0)
    assert out.getvalue() == ""
    with Iterations("slow", 3, progress=True, file=out) as bar:
        for _ in range(3):
            time.sleep(0.1)
            bar.step(residual=0.5)
    lines = out.getvalue().strip().splitlines()
    assert lines and lines[-1].startswith("slow: iteration 3/3") and "residual=0.5" in lines[-1]
