"""Attribution results on disk (:mod:`ggda.results`): every output names its data by id, groups by
name, scores in one dtype, and ``ggda.load_attribution`` reads it back as a labelled table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import ggda
from ggda.cli.main import app
from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.results import SCORE_DTYPE, load_attribution, save_attribution, select_targets
from ggda.runs import Run


def invoke(*args, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("results") / "run"
    invoke("train", "--data", "digits", "--model", "logreg", "--out", path, "--epochs", 2, "--max-train", 60,
           "--checkpoint-every", 1, "--threads", 1)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def run(run_dir):
    return Run.load(run_dir)


def test_round_trip_every_method_float32_ids_and_names(run, tmp_path):
    """save -> load for every registered method: float32, the run's ids, named groups, all members."""
    from ggda.methods.base import METHODS
    from ggda.properties import ExampleLoss

    rows = np.array([4, 0, 7])
    prop = ExampleLoss(run.test.X[rows], run.test.y[rows])
    g = Grouping(np.arange(len(run.train)) % 6, method="random", names=[f"g{k}" for k in range(6)])
    for name in sorted(METHODS):
        scores = run.method(name, run.task()).cache(run.train, g).attribute(prop)
        out = save_attribution(tmp_path / name, scores, g, run.train.ids, run.test.ids[rows], name, {"x": 1})
        res = ggda.load_attribution(out)
        assert res.values.dtype == SCORE_DTYPE and np.load(out / "scores.npy").dtype == SCORE_DTYPE, name
        assert res.method == name and res.options == {"x": 1} and res.ids_recorded
        assert res.scores.index.tolist() == run.test.ids[rows].tolist()
        assert res.scores.columns.tolist() == [f"g{k}" for k in range(6)]
        np.testing.assert_array_equal(res.values, np.asarray(scores).astype(np.float32), err_msg=name)
        for k in range(6):  # every member of every group, by data id
            np.testing.assert_array_equal(res.groups[f"g{k}"], run.train.ids[g.labels == k])
        np.testing.assert_array_equal(res.as_grouping().labels, g.labels)


def test_attribute_cli_records_ids_provenance_and_all_members(run_dir, run, tmp_path):
    out = tmp_path / "a"
    invoke(
        "attribute", "--run", run_dir, "--grouping", "random:4", "--targets", 3, "--top-k", 4, "--out", out
    )
    res = load_attribution(out)
    assert res.values.dtype == np.float32 and res.values.shape == (3, 4)
    assert res.scores.index.tolist() == run.test.ids[:3].tolist()
    prov = res.provenance
    assert prov["ggda"] == ggda.__version__ and prov["torch"] and prov["run"] == str(run_dir.resolve())
    assert prov["command"].startswith("ggda attribute") and "random:4" in prov["command"]
    assert res.options["grouping"] == "random:4" and res.grouping["K"] == 4
    top = pd.read_csv(out / "top_k.csv", keep_default_na=False, dtype={"group_name": str})
    assert (top["size"] > 5).all()  # groups of 15: formerly listed with no ids at all
    for _, row in top.iterrows():
        ids = [int(v) for v in row["train_ids"].split()]
        assert len(ids) == row["size"]
        np.testing.assert_array_equal(ids, res.groups[row["group_name"]])
        assert row["target_id"] == run.test.ids[row["target"]]
    members = pd.read_csv(out / "members.csv")
    np.testing.assert_array_equal(members["train_id"], run.train.ids)
    # singleton groups are named by their data id
    single = tmp_path / "s"
    invoke("attribute", "--run", run_dir, "--targets", 2, "--out", single)
    assert load_attribution(single).scores.columns.tolist() == [str(v) for v in run.train.ids]


def test_target_ids_select_exactly_those_targets(run_dir, run, tmp_path):
    invoke("attribute", "--run", run_dir, "--method", "grad-dot", "--targets", 8, "--out", tmp_path / "n")
    wanted = [int(run.test.ids[6]), int(run.test.ids[1]), int(run.test.ids[3])]
    invoke("attribute", "--run", run_dir, "--method", "grad-dot", "--target-ids", ",".join(map(str, wanted)),
           "--out", tmp_path / "ids")  # fmt: skip
    by_n, by_id = load_attribution(tmp_path / "n"), load_attribution(tmp_path / "ids")
    assert by_id.scores.index.tolist() == wanted
    np.testing.assert_allclose(
        by_id.scores.to_numpy(), by_n.scores.loc[wanted].to_numpy(), rtol=1e-5, atol=1e-6
    )
    train_id = int(run.train.ids[0])  # a training point is not a target
    r = invoke("attribute", "--run", run_dir, "--target-ids", f"{wanted[0]},{train_id}", "--out", tmp_path / "x",
               ok=False)  # fmt: skip
    assert r.exit_code != 0 and isinstance(r.exception, GGDAError)
    assert str(train_id) in str(r.exception) and "not the data id of a test point" in str(r.exception)
    assert not (tmp_path / "x").exists()


def test_select_targets_errors_name_the_fix():
    ids = np.array([10, 20, 30])
    assert select_targets(ids, 2).tolist() == [0, 1]
    assert select_targets(ids, None, "30,10").tolist() == [2, 0]
    for bad, match in (
        ("x", "comma-separated integer"),
        ("10,10", "twice"),
        (",", "at least one"),
        ("99", "99"),
    ):
        with pytest.raises(GGDAError, match=match):
            select_targets(ids, None, bad)


def test_column_grouping_names_from_a_file_and_from_codes(run_dir, run, tmp_path):
    """A grouping file of years keeps the years as group names through attribute -> load."""
    years = 70 + (np.arange(len(run.train)) % 13)
    pd.DataFrame({"group": years}).to_csv(tmp_path / "years.csv", index=False)
    invoke(
        "attribute",
        "--run",
        run_dir,
        "--grouping",
        tmp_path / "years.csv",
        "--targets",
        2,
        "--out",
        tmp_path / "y",
    )
    res = load_attribution(tmp_path / "y")
    assert res.scores.columns.tolist() == [str(y) for y in range(70, 83)]
    np.testing.assert_array_equal(res.groups["75"], run.train.ids[years == 75])
    # codes into a data set's group names (a train split that misses a value keeps the right names)
    g = Grouping.from_ids(np.array([3, 1, 3, 4]), names=np.array(["70", "71", "72", "73", "74"]))
    assert g.names == ["71", "73", "74"] and g.labels.tolist() == [1, 0, 1, 2]
    with pytest.raises(GGDAError, match="names"):
        Grouping(np.array([0, 1]), names=["a"])
    with pytest.raises(GGDAError, match="distinct"):
        Grouping(np.array([0, 1]), names=["a", "a"])


def test_csv_column_grouping_keeps_names_end_to_end(tmp_path):
    """train --group-column model_year -> attribute --grouping column -> load_attribution."""
    from ggda.data.dataset import Dataset

    if "group_names" not in Dataset.__dataclass_fields__:
        pytest.skip("needs Dataset.group_names (the CSV path's change on another branch)")
    rng = np.random.default_rng(0)
    n = 150
    frame = pd.DataFrame(
        {"x1": rng.normal(size=n), "x2": rng.normal(size=n), "model_year": 70 + np.arange(n) % 13}
    )
    frame["label"] = (frame.x1 + frame.x2 > 0).astype(int)
    frame.to_csv(tmp_path / "cars.csv", index=False)
    run = tmp_path / "run"
    invoke("train", "--data", tmp_path / "cars.csv", "--label", "label", "--group-column", "model_year",
           "--model", "logreg", "--out", run, "--epochs", 1)  # fmt: skip
    invoke("attribute", "--run", run, "--grouping", "column", "--targets", 3, "--out", tmp_path / "a")
    res = load_attribution(tmp_path / "a")
    assert res.scores.columns.tolist() == [str(y) for y in range(70, 83)]
    top = pd.read_csv(tmp_path / "a" / "top_k.csv")
    assert set(top["group_name"]) <= set(range(70, 83))


def test_pooled_property_and_old_directories_load(run_dir, run, tmp_path):
    out = tmp_path / "m"
    invoke(
        "attribute", "--run", run_dir, "--grouping", "random:5", "--property", "mean-test-loss", "--out", out
    )
    res = load_attribution(out)
    assert res.pooled and res.scores.index.tolist() == ["mean"] and res.values.shape == (1, 5)
    np.testing.assert_array_equal(res.target_ids, run.test.ids[:50])  # every test id the row averages
    assert (pd.read_csv(out / "top_k.csv")["target_id"] == -1).all()
    # a directory of the earlier format (scores, groups, meta only) still loads, by position
    old = tmp_path / "old"
    old.mkdir()
    np.save(old / "scores.npy", np.arange(10.0).reshape(2, 5))
    np.save(old / "groups.npy", np.arange(20) % 5)
    (old / "meta.json").write_text(json.dumps({"method": "grad-dot", "property": "test-loss"}))
    res = load_attribution(old)
    assert not res.ids_recorded and res.values.dtype == np.float32 and res.scores.index.tolist() == [0, 1]
    np.testing.assert_array_equal(res.groups["2"], [2, 7, 12, 17])
    with pytest.raises(GGDAError, match="20 entries"):
        load_attribution(old, n_train=21)


def test_features_score_records_data_ids(run_dir, run, tmp_path):
    store, out = tmp_path / "store", tmp_path / "scores"
    invoke("features", "build", "--run", run_dir, "--out", store, "--grouping", "random:6")
    invoke("features", "score", "--run", run_dir, "--store", store, "--targets", 4, "--top-k", 2,
           "--bottom-k", 1, "--full", "--out", out)  # fmt: skip
    res = load_attribution(out)
    assert res.scores.index.tolist() == run.test.ids[:4].tolist() and res.values.dtype == np.float32
    np.testing.assert_array_equal(res.train_ids, run.train.ids)
    assert sum(len(v) for v in res.groups.values()) == len(run.train)
    for name in ("top_k", "bottom_k"):
        table = pd.read_csv(out / f"{name}.csv", keep_default_na=False, dtype={"group_name": str})
        assert set(table["target_id"]) == set(run.test.ids[:4].tolist())
        for _, row in table.iterrows():
            np.testing.assert_array_equal(
                [int(v) for v in row["train_ids"].split()], res.groups[row["group_name"]]
            )
    assert json.loads((out / "meta.json").read_text())["kernel"] == "none"
    # rescoring into the same directory without --bottom-k leaves no stale bottom_k.csv behind
    invoke("features", "score", "--run", run_dir, "--store", store, "--targets", 2, "--full", "--out", out)
    assert not (out / "bottom_k.csv").exists() and load_attribution(out).values.shape == (2, 6)
    # a grouping other than the store's is refused, not used to name its rows' members
    from ggda.store import FeatureStore
    from ggda.store.scoring import check_store_grouping

    with pytest.raises(GGDAError, match="another grouping"):
        check_store_grouping(FeatureStore.open(store), Grouping(np.arange(len(run.train)) % 6))


def test_evaluate_outputs_record_ids(run_dir, run, tmp_path):
    """retraining: removed data ids per ranking and fraction; noisy: flagged ids (no retrains)."""
    from ggda.evaluate import removal_set

    out = tmp_path / "m"
    invoke(
        "attribute", "--run", run_dir, "--grouping", "random:5", "--property", "mean-test-loss", "--out", out
    )
    ev = tmp_path / "ev"
    invoke("evaluate", "retraining", "--run", run_dir, "--scores", out, "--fractions", "0.1", "--seeds", 1,
           "--backend", "serial", "--epochs", 1, "--out", ev)  # fmt: skip
    removed = pd.read_csv(ev / "removed.csv", keep_default_na=False)
    res = load_attribution(out)
    row = removed[removed["label"] == "m"].iloc[0]
    expect = run.train.ids[removal_set(res.values, res.as_grouping(), 0.1)]
    assert sorted(int(v) for v in row["train_ids"].split()) == sorted(expect.tolist())
    assert row["n_removed"] == 6 and (removed["label"] == "random").sum() == 1
    assert (ev / "retraining.csv").exists()


def test_noisy_flagged_ids(tmp_path):
    from ggda.applications.evaluation import noisy_evaluation

    run_dir = tmp_path / "noisy"
    invoke("train", "--data", "digits", "--model", "logreg", "--out", run_dir, "--epochs", 1, "--max-train", 60,
           "--noise", 0.2, "--threads", 1)  # fmt: skip
    invoke("attribute", "--run", run_dir, "--property", "mean-test-loss", "--out", tmp_path / "a")
    r = Run.load(run_dir)
    result = noisy_evaluation(r, [tmp_path / "a"])
    result.write(tmp_path / "ev")
    flagged = pd.read_csv(tmp_path / "ev" / "flagged.csv")
    assert len(flagged) == 12 and flagged["rank"].tolist() == list(range(1, 13))
    noisy_ids = set(r.train.ids[r.train.noisy].tolist())
    assert flagged["flipped"].tolist() == [int(i) in noisy_ids for i in flagged["train_id"]]
    assert set(flagged["train_id"]) <= set(r.train.ids.tolist())


def test_lds_scores_the_targets_a_result_chose_by_id(run_dir, run, tmp_path):
    wanted = [int(run.test.ids[9]), int(run.test.ids[2]), int(run.test.ids[5])]
    out = tmp_path / "a"
    invoke("attribute", "--run", run_dir, "--grouping", "random:6", "--target-ids", ",".join(map(str, wanted)),
           "--out", out)  # fmt: skip
    ev = tmp_path / "lds"
    invoke("evaluate", "lds", "--run", run_dir, "--scores", out, "--subsets", 3, "--epochs", 1, "--backend", "serial",
           "--out", ev)  # fmt: skip
    per_target = pd.read_csv(ev / "lds_targets.csv")
    assert per_target["target_id"].tolist() == wanted and (per_target["label"] == "a").all()
    assert json.loads((ev / "lds.json").read_text())["rows"][0]["targets"] == 3
