"""Comparison metrics and the methods-vs-gold engine (NOTES B6, B8 finding 1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from typer.testing import CliRunner

from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.gold import GoldConfig, GoldResult, compute_gold, select_units
from ggda.gold.compare import compare_methods, cosine, mean_sem, seed_window_study, spearman
from ggda.models.training import TrainConfig, train_model
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask
from tests.gold.conftest import as_dataset, make_data


def test_cosine_and_spearman_match_scipy():
    rng = np.random.default_rng(0)
    gold, scores = rng.normal(size=(3, 4, 9)), rng.normal(size=(4, 9))
    scores[1, :3] = scores[1, 3]  # ties
    cos = cosine(gold, scores)
    sp = spearman(gold, scores)
    for e in range(3):
        for t in range(4):
            g, s = gold[e, t], scores[t]
            assert cos[e, t] == pytest.approx(g @ s / np.linalg.norm(g) / np.linalg.norm(s))
            assert sp[e, t] == pytest.approx(spearmanr(g, s).statistic)
    assert np.isnan(cosine(gold, np.zeros((4, 9)))).all()
    mean, sem = mean_sem(cos)
    np.testing.assert_allclose(mean, cos.mean(1))
    np.testing.assert_allclose(sem, cos.std(1) / 2)


def test_seed_window_study_arithmetic():
    rng = np.random.default_rng(1)
    diffs, scores = rng.normal(size=(6, 2, 3, 5)), rng.normal(size=(3, 5))
    study = seed_window_study(diffs, scores, [1, 2, 6])
    per_seed = [cosine(diffs[s], scores).mean(1) for s in range(6)]
    np.testing.assert_allclose(study[1]["curve"], np.mean(per_seed, 0))
    np.testing.assert_allclose(study[6]["curve"], cosine(diffs.mean(0), scores).mean(1))
    pairs = [cosine(diffs[2 * w : 2 * w + 2].mean(0), scores).mean(1) for w in range(3)]
    np.testing.assert_allclose(study[2]["curve"], np.mean(pairs, 0))
    assert study[6]["max"] == pytest.approx(max(study[6]["curve"])) and study[2]["windows"] == 3


@pytest.fixture(scope="module")
def logistic_gold():
    X, y, Xt, yt = make_data(n=200, d=5, n_test=10, seed=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 2))
    train_model(model, as_dataset(X, y), TrainConfig(epochs=5, lr=0.1, batch_size=32))
    task = AttributionTask(model)
    units = select_units(Grouping.singleton(200), n_units=30, seed=0)
    prop = ExampleLoss(Xt, yt)
    res = compute_gold(task, X, y, prop, units, GoldConfig(epochs=3, seeds=4, lr=0.01, batch_size=32))
    return res, task, as_dataset(X, y), prop


def test_graddot_approximates_short_further_training(logistic_gold):
    """NOTES B8 finding 1: first-order scores are close to the gold after little further training."""
    res, task, train, prop = logistic_gold
    comp = compare_methods(
        res, task, train, Grouping.singleton(len(train)), prop, ["grad-dot", "grad-cos", "absent"]
    )
    dot = mean_sem(comp.cos["grad-dot"])[0]
    assert dot[0] > 0.9 and (dot > 0.8).all()
    assert mean_sem(comp.spearman["grad-dot"])[0][0] > 0.9
    assert dot[0] > mean_sem(comp.cos["grad-cos"])[0][0]  # the normalisation is "not justified" (B3)
    assert "absent" in comp.failed
    assert set(comp.seed_study["grad-dot"]) == {1, 2}


def test_group_columns_and_save(logistic_gold, tmp_path):
    res, task, train, prop = logistic_gold
    comp = compare_methods(
        res, task, train, Grouping.singleton(len(train)), prop, ["grad-dot"], variant="raw"
    )
    comp.save(tmp_path)
    for f in ("compare.csv", "compare.json", "compare.png", "similarity.npz", "seed_study.csv"):
        assert (tmp_path / f).exists()
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert len(summary["methods"]["grad-dot"]["cosine_mean"]) == len(res.epochs)


def test_given_scores_are_reused_not_recomputed(logistic_gold):
    """One scoring serves every gold variant: given scores are compared as computed scores are,
    a missing method is scored once and added to the dict, a wrong shape is refused."""
    res, task, train, prop = logistic_gold
    grouping = Grouping.singleton(len(train))
    cache: dict[str, np.ndarray] = {}
    first = compare_methods(res, task, train, grouping, prop, ["grad-dot"], variant="raw", scores=cache)
    assert set(cache) == {"grad-dot"} and cache["grad-dot"].shape == (prop.n_targets, len(res.unit_ids))
    # reuse for the centred variant equals a fresh scoring of it
    fresh = compare_methods(res, task, train, grouping, prop, ["grad-dot"], variant="centred")
    reused = compare_methods(res, task, train, grouping, prop, ["grad-dot"], variant="centred", scores=cache)
    np.testing.assert_allclose(reused.cos["grad-dot"], fresh.cos["grad-dot"], rtol=1e-12)
    np.testing.assert_allclose(first.cos["grad-dot"], cosine(res.gold_raw, cache["grad-dot"]))
    assert "grad-dot" not in reused.seconds  # not scored again
    # given scores are what is compared: negated scores flip every cosine
    flipped = compare_methods(
        res, task, train, grouping, prop, ["grad-dot"], variant="raw", scores={"grad-dot": -cache["grad-dot"]}
    )
    np.testing.assert_allclose(flipped.cos["grad-dot"], -first.cos["grad-dot"])
    with pytest.raises(GGDAError, match="shape"):
        compare_methods(res, task, train, grouping, prop, ["grad-dot"], scores={"grad-dot": np.zeros((2, 2))})


def test_group_units_select_group_columns():
    """For group units the method's group scores (sum over members) are compared column by column."""
    X, y, Xt, yt = make_data(n=60, d=4, n_test=3, seed=5)
    torch.manual_seed(0)
    task = AttributionTask(nn.Sequential(nn.Linear(4, 2)).double())
    grouping = Grouping(np.arange(60) % 12)
    units = select_units(grouping, ids=[1, 7, 3])
    prop = ExampleLoss(Xt, yt)
    res = compute_gold(task, X, y, prop, units, GoldConfig(epochs=1, lr=0.01, batch_size=16))
    comp = compare_methods(res, task, as_dataset(X, y), grouping, prop, ["grad-dot"], strict=True)
    from ggda.methods import make_method

    full = make_method("grad-dot", task).cache(as_dataset(X, y), grouping).attribute(prop)
    np.testing.assert_allclose(comp.cos["grad-dot"], cosine(res.gold, full[:, [1, 7, 3]]), rtol=1e-6)


@pytest.mark.slow
def test_cli_gold_then_compare(tmp_path):
    from ggda.cli.main import app

    runner = CliRunner()
    run = tmp_path / "run"

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    r = invoke(
        "train",
        "--data",
        "digits",
        "--model",
        "logreg",
        "--epochs",
        "3",
        "--max-train",
        "200",
        "--out",
        run,
        "--threads",
        "1",
    )
    assert r.exit_code == 0, r.output
    gold = tmp_path / "gold"
    args = ["gold", "--run", run, "--n-units", 12, "--targets", 5, "--epochs", 2, "--seeds", 2, "--lr", 0.01]
    args += ["--batch-size", 32, "--backend", "serial", "--out", gold]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    first = GoldResult.load(gold)
    assert first.gold.shape == (2, 5, 12)
    r = invoke(*args)  # resume: nothing left to run, same numbers
    assert "ran now 0" in r.output and np.array_equal(GoldResult.load(gold).gold, first.gold)
    r = invoke("compare", "--run", run, "--gold", gold, "--methods", "grad-dot,not-a-method")
    assert r.exit_code != 0 and "not-a-method" in str(r.exception)  # refused before any work
    r = invoke("compare", "--run", run, "--gold", gold, "--methods", "grad-dot,grad-cos,tracin")
    assert r.exit_code == 0, r.output
    assert (gold / "compare" / "compare.png").exists()
    table = (gold / "compare" / "compare.csv").read_text()
    assert "grad-dot" in table and "tracin" in table
    summary = json.loads((gold / "compare" / "compare.json").read_text())  # the data compared, by id
    split = np.load(run / "split.npz")
    assert summary["target_ids"] == split["test_ids"][:5].tolist()
    units = summary["unit_train_ids"]
    assert len(units) == 12 and all(len(v) == 1 for v in units.values())
    assert {v[0] for v in units.values()} <= set(split["train_ids"].tolist())
    from ggda.models.checkpoint import save_model

    bogus = save_model(tmp_path / "bogus.pt", nn.Sequential(nn.Linear(64, 3)))
    for bad, msg in (
        (["--epochs", 0], "epochs"),
        (["--unit-ids", "5,100000"], "not in the data"),
        (["--lr", -1], "lr"),
        (["--checkpoint", bogus], "does not match the model"),
    ):
        r = invoke(*args[:-2], "--out", tmp_path / "bad", *bad)
        assert r.exit_code != 0 and msg in str(r.exception), (bad, r.output)
