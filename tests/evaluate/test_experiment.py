"""``run_experiment`` end to end on a tiny configuration, resumability, and the evaluate CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ggda.applications.experiment import ExperimentConfig, resolve_k, run_experiment
from ggda.cli.main import app
from ggda.errors import GGDAError


def tiny_config(**kw) -> ExperimentConfig:
    base = dict(
        data="digits",
        max_train=200,
        model="logreg",
        methods=["grad-dot"],
        groupings=["random", "kmeans"],
        ks=["n/20"],
        seeds=2,
        fractions=[0.1, 0.2],
        prune_fractions=[0.2],
        lds_subsets=5,
        lds_targets=10,
        noise=0.1,
        epochs=3,
        batch_size=32,
        backend="serial",
    )
    base.update(kw)
    return ExperimentConfig(**base)


def test_resolve_k():
    assert resolve_k("n/50", 1438) == 29 and resolve_k(7, 100) == 7 and resolve_k("12", 100) == 12
    with pytest.raises(GGDAError):
        resolve_k("n/x", 10)
    with pytest.raises(GGDAError):
        resolve_k(0, 10)


@pytest.mark.slow
def test_experiment_records_every_score_and_resumes(tmp_path):
    out = tmp_path / "exp"
    logs: list[str] = []
    results = run_experiment(tiny_config(), out, log=logs.append, progress=False)
    labels = {r["label"] for r in results["attributions"]}
    assert labels == {"grad-dot|singleton", "grad-dot|random:10", "grad-dot|kmeans:10"}
    assert all(r["seconds"] >= r["grouping_seconds"] >= 0 for r in results["attributions"])
    retraining = pd.DataFrame(results["retraining"])
    assert set(retraining["label"]) == labels | {"random"}
    assert (retraining.groupby("label").size() == 2).all()
    assert retraining["n_removed"].isin([20, 40]).all()  # exact budgets at 10% / 20% of 200
    assert 0.5 < results["no_removal"]["acc_mean"] <= 1.0
    assert {r["label"] for r in results["lds"]} == labels and all(-1 <= r["lds"] <= 1 for r in results["lds"])
    noisy = pd.DataFrame(results["noisy"])
    assert set(noisy["ranking"]) == {"self-influence", "test-harm"} and noisy["auc"].between(0, 1).all()
    assert results["noisy_info"]["n_flipped"] == 20
    assert len(results["pruning"]) == 4 and not results["failures"]
    for name in ("results.json", "config.json", "retraining.csv", "lds.csv", "noisy.csv", "attributions.csv"):
        assert (out / name).exists(), name
    ran = results["retrains"]["ran"]
    assert ran == results["retrains"]["distinct"] > 20
    # what the report reads: per-point scores of the sampled targets, group labels, flagged points
    record = json.loads((out / "inspect" / "inspect.json").read_text())
    with np.load(out / "inspect" / "inspect.npz") as z:
        assert z[record["point_scores"]["grad-dot"]].shape == (6, 200)
        assert set(record["groupings"]) == {"random:10", "kmeans:10"}
        assert len(z[record["groupings"]["kmeans:10"]["labels"]]) == 200
    assert len(record["flagged"]["grad-dot"]["test-harm"]["ids"]) == 12
    assert results["provenance"]["methods"]["grad-dot"]["options"]["aggregate"] == "sum"
    stamps = {p: p.stat().st_mtime_ns for p in (out / "attributions").iterdir()}

    logs.clear()
    again = run_experiment(tiny_config(), out, log=logs.append, progress=False)
    assert any("noisy labels: loaded" in line for line in logs)  # the noisy stage is not rerun
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "attributions").iterdir()}
    assert again["noisy"] == results["noisy"] or _same(again["noisy"], results["noisy"])
    assert again["retrains"]["ran"] == 0
    # NaN-aware equality (NaN != NaN in plain dict comparison; e.g. a 'grouping' field of the baseline rows)
    assert _same(again["retraining"], results["retraining"]) and _same(again["lds"], results["lds"])
    assert [r["seconds"] for r in again["attributions"]] == [r["seconds"] for r in results["attributions"]]


def test_failed_method_is_reported_not_fatal(tmp_path):
    # valid options (checked before any training) with which the method fails on this model
    config = tiny_config(
        methods=["grad-dot", "if-explicit"],
        groupings=[],
        fractions=[0.1],
        prune_fractions=[],
        lds_subsets=0,
        noise=0.0,
        seeds=1,
        method_options={"if-explicit": {"max_params": 10}},
    )
    results = run_experiment(config, tmp_path / "exp", log=lambda _: None, progress=False)
    assert [r["label"] for r in results["attributions"]] == ["grad-dot|singleton"]
    assert results["failures"] and results["failures"][0]["label"] == "if-explicit|singleton"


def test_bad_options_are_refused_before_training(tmp_path):
    for bad in (
        {"method_options": {"tracin": {"no_such_option": 1}}, "methods": ["tracin"]},
        {"method_options": {"if-cg": {"damping": float("nan")}}, "methods": ["if-cg"]},
        {"ks": ["n/0"]},
        {"groupings": ["nope"]},
        {"lds_subsets": 2},
    ):
        with pytest.raises(GGDAError):
            run_experiment(tiny_config(**bad), tmp_path / "exp", log=lambda _: None, progress=False)
        assert not (tmp_path / "exp").exists()


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_evaluate_cli_commands(tmp_path):
    run = tmp_path / "run"
    r = invoke(
        "train",
        "--data",
        "digits",
        "--model",
        "logreg",
        "--out",
        run,
        "--epochs",
        "3",
        "--max-train",
        "200",
        "--noise",
        "0.1",
        "--threads",
        "1",
    )
    assert r.exit_code == 0, r.output
    common = ["--run", run, "--backend", "serial", "--seeds", "1"]
    r = invoke("evaluate", "retraining", *common, "--method", "grad-dot", "--fractions", "0.1,0.2")
    assert r.exit_code == 0, r.output
    table = pd.read_csv(run / "evaluations" / "retraining" / "retraining.csv")
    assert set(table["label"]) == {"grad-dot-singleton", "random"} and len(table) == 4
    r = invoke(
        "attribute",
        "--run",
        run,
        "--method",
        "grad-dot",
        "--grouping",
        "random:20",
        "--property",
        "mean-test-loss",
        "--targets",
        "1000",
        "--out",
        tmp_path / "att",
    )
    assert r.exit_code == 0, r.output
    r = invoke("evaluate", "prune", *common, "--scores", tmp_path / "att", "--fractions", "0.3")
    assert r.exit_code == 0, r.output
    assert "att" in set(pd.read_csv(run / "evaluations" / "prune" / "prune.csv")["label"])
    r = invoke(
        "evaluate",
        "lds",
        "--run",
        run,
        "--backend",
        "serial",
        "--method",
        "grad-dot",
        "--subsets",
        "4",
        "--targets",
        "5",
    )
    assert r.exit_code == 0, r.output
    lds = json.loads((run / "evaluations" / "lds" / "lds.json").read_text())
    assert lds["rows"][0]["targets"] == 5
    r = invoke("evaluate", "noisy", "--run", run, "--method", "grad-dot", "--scores", tmp_path / "att")
    assert r.exit_code == 0, r.output
    noisy = pd.read_csv(run / "evaluations" / "noisy" / "noisy.csv")
    assert set(noisy["ranking"]) == {"self-influence", "test-harm"}
    assert noisy.loc[noisy["ranking"] == "self-influence", "auc"].iloc[0] > 0.8
    r = invoke("evaluate", "lds", "--run", run, "--scores", tmp_path / "att")
    assert r.exit_code != 0 and "per-target" in str(r.exception or r.output)


def test_experiment_cli_rejects_unknown_method(tmp_path):
    r = invoke("experiment", "--methods", "no-such-method", "--out", tmp_path / "x")
    assert r.exit_code != 0
    assert np.any(["no-such-method" in str(r.exception), "no-such-method" in r.output])


def _same(a, b) -> bool:
    import json

    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def test_per_grouping_options_override_the_global_ones(small_digits, trained_mlp):
    """--gopt grad-kmeans:per_class=true must reach make_grouping (it used to collide with per_class)."""
    from ggda.applications.experiment import ExperimentConfig, build_groupings
    from ggda.task import AttributionTask

    train, _ = small_digits
    config = ExperimentConfig(
        data="digits",
        model="mlp-s",
        methods=["grad-dot"],
        groupings=["grad-kmeans"],
        ks=[20],
        grouping_options={"grad-kmeans": {"per_class": True}},
    )
    groupings, failures = build_groupings(config, train, AttributionTask(trained_mlp), lambda *a, **k: None)
    assert not failures
    g = groupings["grad-kmeans:20"]
    assert g.purity(train.y) == 1.0 and g.meta["per_class"] is True


def test_method_record_states_the_resolved_damping(small_digits):
    """The report's provenance block shows the damping an IF actually used, not just 'auto'."""
    from ggda.applications.experiment import method_record
    from ggda.methods import make_method
    from ggda.models import build_model
    from ggda.task import AttributionTask

    train, _ = small_digits
    net = build_model("logreg", train.n_features, train.n_outputs, seed=0)
    att = make_method("if-explicit", AttributionTask(net), damping_rel=0.05).cache(train.subset(range(100)))
    record = method_record(att, {"damping_rel": 0.05})
    assert record["options"]["damping_rel"] == 0.05 and record["options"]["damping"] is None
    assert record["resolved_damping"] == pytest.approx(0.05 * record["info"]["lambda_max"], rel=1e-6)
    json.dumps(record)  # JSON as saved
