"""``ggda features build|score|info``: the store pipeline from a run directory, end to end."""

import json

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from ggda.cli.main import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_features_build_score_matches_attribute(tmp_path):
    run = tmp_path / "run"
    r = invoke("train", "--data", "digits", "--out", run, "--model", "logreg", "--epochs", "2", "--max-train", "200",
               "--threads", "1")  # fmt: skip
    assert r.exit_code == 0, r.output
    store = tmp_path / "store"
    r = invoke(
        "features", "build", "--run", run, "--out", store, "--grouping", "random:25", "--chunk-rows", "8"
    )
    assert r.exit_code == 0, r.output
    r = invoke(
        "features", "build", "--run", run, "--out", store, "--grouping", "random:25", "--chunk-rows", "8"
    )
    assert r.exit_code == 0, r.output  # re-running a finished build is a no-op resume
    r = invoke("features", "info", "--store", store)
    assert r.exit_code == 0 and "25×650" in r.output and "chunks 4/4" in r.output, r.output
    out = tmp_path / "scores"
    r = invoke("features", "score", "--run", run, "--store", store, "--targets", "6", "--top-k", "3", "--bottom-k",
               "2", "--full", "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    r = invoke("attribute", "--run", run, "--method", "grad-dot", "--grouping", "random:25", "--targets", "6",
               "--out", tmp_path / "ref")  # fmt: skip
    assert r.exit_code == 0, r.output
    ref, full = np.load(tmp_path / "ref" / "scores.npy"), np.load(out / "scores.npy")
    np.testing.assert_allclose(full, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    top = pd.read_csv(out / "top_k.csv")
    assert len(top) == 18 and len(pd.read_csv(out / "bottom_k.csv")) == 12
    best = top[top["rank"] == 1].sort_values("target")["group"].to_numpy()
    np.testing.assert_array_equal(best, full.argmax(1))
    assert json.loads((out / "meta.json").read_text())["kernel"] == "none"


def test_features_errors_are_one_line(tmp_path):
    r = invoke("features", "info", "--store", tmp_path / "none")
    assert r.exit_code != 0 and "not a feature store" in str(r.exception)
    r = invoke("features", "build", "--run", tmp_path, "--out", tmp_path / "s", "--address", "auto")
    assert r.exit_code != 0
