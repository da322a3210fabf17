import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ggda.cli.main import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.mark.slow
def test_train_then_attribute_every_method(tmp_path):
    run = tmp_path / "run"
    r = invoke(
        "train", "--data", "digits", "--out", run, "--epochs", "3", "--max-train", "400", "--threads", "1"
    )
    assert r.exit_code == 0, r.output
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["metrics"]["test_accuracy"] > 0.7
    assert len(list((run / "checkpoints").glob("*.pt"))) == 3
    for method in ("grad-dot", "grad-cos", "tracin"):
        for grouping, K in (("singleton", 400), ("random:40", 40)):
            out = tmp_path / f"{method}-{K}"
            r = invoke(
                "attribute",
                "--run",
                run,
                "--method",
                method,
                "--grouping",
                grouping,
                "--targets",
                7,
                "--out",
                out,
            )
            assert r.exit_code == 0, r.output
            assert np.load(out / "scores.npy").shape == (7, K)
            table = pd.read_csv(out / "top_k.csv")
            assert len(table) == 7 * 10 and set(table["rank"]) == set(range(1, 11))


def test_user_csv_with_given_groups(tmp_path):
    rng = np.random.default_rng(0)
    n = 120
    frame = pd.DataFrame(
        {"x1": rng.normal(size=n), "x2": rng.normal(size=n), "src": rng.choice(list("abcd"), n)}
    )
    frame["label"] = (frame.x1 + frame.x2 > 0).astype(int)
    frame.to_csv(tmp_path / "d.csv", index=False)
    run = tmp_path / "run"
    r = invoke(
        "train",
        "--data",
        tmp_path / "d.csv",
        "--label",
        "label",
        "--group-column",
        "src",
        "--model",
        "logreg",
        "--out",
        run,
        "--epochs",
        "2",
    )
    assert r.exit_code == 0, r.output
    r = invoke(
        "attribute",
        "--run",
        run,
        "--grouping",
        "column",
        "--property",
        "mean-test-loss",
        "--out",
        tmp_path / "a",
    )
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "a" / "scores.npy").shape == (1, 4)


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "ggda.cli.main", "train", "--data", "nope", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Unknown data set 'nope'") and "digits" in lines[0]
