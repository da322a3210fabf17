"""Grouping specs (``ggda attribute --grouping SPEC``) and the ``ggda group`` command."""

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ggda.cli.main import app
from ggda.errors import GGDAError
from ggda.groups import build_grouping_from_spec, make_grouping, parse_grouping_spec
from ggda.task import AttributionTask


def test_parse_specs():
    assert parse_grouping_spec("random:50") == ("random", {"n_groups": 50})
    assert parse_grouping_spec("grad-kmeans:size=20:per-class:seed=3:projection-dim=64") == (
        "grad-kmeans",
        {"group_size": 20, "per_class": True, "seed": 3, "projection_dim": 64},
    )
    assert parse_grouping_spec("repr-kmeans:k=8:layer=fc1") == (
        "repr-kmeans",
        {"n_groups": 8, "layer": "fc1"},
    )
    assert parse_grouping_spec("column") == ("given", {})
    assert parse_grouping_spec("singleton") == ("singleton", {})
    for bad, msg in [
        ("gradkmeans:5", "Unknown grouping"),
        ("kmeans", "needs a number of groups"),
        ("kmeans:five", "Cannot read 'five'"),
        ("kmeans:size=big", "not a number"),
    ]:
        with pytest.raises(GGDAError, match=msg):
            parse_grouping_spec(bad)


def test_build_from_spec_matches_api(small_digits, trained_mlp):
    train, test = small_digits
    run = SimpleNamespace(train=train, test=test, model=trained_mlp, kind="classification")
    g = build_grouping_from_spec("grad-kmeans:12:per-class:seed=2", run)
    want = make_grouping(
        "grad-kmeans", train, n_groups=12, task=AttributionTask(trained_mlp), per_class=True, seed=2
    )
    assert np.array_equal(g.labels, want.labels) and g.purity(train.y) == 1.0
    assert build_grouping_from_spec("kmeans:size=30", run).n_groups == 10
    assert build_grouping_from_spec("random:7", run).n_groups == 7
    with pytest.raises(GGDAError, match="needs a trained model"):
        build_grouping_from_spec(
            "repr-kmeans:5", SimpleNamespace(train=train, model=None, kind="classification")
        )


runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("group") / "run"
    r = runner.invoke(
        app,
        [
            "train",
            "--data",
            "digits",
            "--out",
            str(run),
            "--epochs",
            "2",
            "--max-train",
            "300",
            "--threads",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    return run


@pytest.mark.slow
def test_group_cli_then_attribute(run_dir, tmp_path):
    out = tmp_path / "g.parquet"
    r = runner.invoke(
        app,
        [
            "group",
            "--run",
            str(run_dir),
            "--method",
            "grad-kmeans",
            "--groups",
            "15",
            "--per-class",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "K=15" in r.output and "purity 1.000" in r.output and "size min/median/max" in r.output
    frame = pd.read_parquet(out)
    assert frame.columns.tolist() == ["position", "id", "group"] and frame["group"].nunique() == 15
    record = json.loads(out.with_suffix(".json").read_text())
    assert (
        record["summary"]["K"] == 15
        and record["meta"]["per_class"] is True
        and record["summary"]["seconds"] > 0
    )
    for args in (
        ["--method", "kmeans", "--group-size", "20"],
        ["--method", "repr-kmeans", "--groups", "10"],
        ["--method", "random", "--groups", "10"],
        ["--method", "grad-kmeans", "--groups", "10", "--features", "projected", "--projection-dim", "32"],
    ):
        npy = tmp_path / f"{args[1]}.npy"
        r = runner.invoke(app, ["group", "--run", str(run_dir), *args, "--out", str(npy)])
        assert r.exit_code == 0, r.output
        assert np.load(npy).shape == (300,)
    # the saved file feeds `ggda attribute`, and so does a spec
    for grouping in (str(out), "grad-kmeans:size=20:per-class"):
        r = runner.invoke(
            app,
            [
                "attribute",
                "--run",
                str(run_dir),
                "--grouping",
                grouping,
                "--targets",
                "3",
                "--out",
                str(tmp_path / "a"),
            ],
        )
        assert r.exit_code == 0, r.output
        assert np.load(tmp_path / "a" / "scores.npy").shape[0] == 3


def test_group_cli_errors(run_dir, tmp_path):
    from ggda.cli.main import main  # noqa: F401  (main() turns GGDAError into one line; runner raises it)

    cases = [
        (["--method", "kmeans", "--groups", "0"], "--groups 0 is not valid"),
        (["--method", "kmeans", "--groups", "301"], "between 1 and n=300"),
        (["--method", "kmeans", "--group-size", "500"], "Group size 500"),
        (["--method", "kmeans"], "exactly one of"),
        (["--method", "given"], "no group column"),
    ]
    for args, msg in cases:
        r = runner.invoke(app, ["group", "--run", str(run_dir), *args, "--out", str(tmp_path / "x.npy")])
        assert r.exit_code != 0 and isinstance(r.exception, GGDAError) and msg in str(r.exception), r.output
    bad = tmp_path / "bad.npy"
    np.save(bad, np.arange(299))
    r = runner.invoke(
        app,
        [
            "group",
            "--run",
            str(run_dir),
            "--method",
            "given",
            "--values",
            str(bad),
            "--out",
            str(tmp_path / "x.npy"),
        ],
    )
    assert "has 299 entries" in str(r.exception)
    r = runner.invoke(
        app,
        ["group", "--run", str(run_dir), "--method", "random", "-k", "3", "--out", str(tmp_path / "x.txt")],
    )
    assert "--out must end in" in str(r.exception)
