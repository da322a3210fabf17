"""The CSV path guesses right (issue 19, item 5): label kind, standardised regression targets with
test MSE/R², --id-column, compressed and other file forms, group names kept end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ggda.cli.main import app
from ggda.data.dataset import Dataset
from ggda.data.files import data_stem, file_format, infer_label_kind, load_file
from ggda.errors import GGDAError
from ggda.runs import DataSpec, Run, prepare_data

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def mpg_like(n: int = 200, seed: int = 0) -> pd.DataFrame:
    """A float target that is a linear function of the features plus noise (like Auto-MPG's mpg)."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "weight": rng.normal(3000, 800, n),
            "power": rng.normal(100, 30, n),
            "year": rng.integers(70, 83, n),
            "row_id": 1000 + 7 * np.arange(n),
        }
    )
    frame["mpg"] = np.round(45 - 0.006 * frame.weight - 0.05 * frame.power + rng.normal(0, 1.0, n), 1)
    return frame


# -- label kind -------------------------------------------------------------------------------


def test_float_label_with_many_values_is_regression_with_a_notice():
    kind, notice = infer_label_kind(mpg_like().mpg, "mpg")
    assert kind == "regression"
    assert "mpg" in notice and "--classification" in notice


@pytest.mark.parametrize(
    "values",
    [
        np.arange(300) % 3,  # integers, few values
        np.array(["cat", "dog", "eel"] * 100),  # strings
        np.array([True, False] * 150),  # booleans
        (np.arange(300) % 2).astype(float),  # 0.0/1.0 floats: still classes
    ],
)
def test_few_whole_or_string_values_are_classes(values):
    assert infer_label_kind(pd.Series(values)) == ("classification", None)


def test_whole_float_label_with_many_values_is_regression():
    kind, notice = infer_label_kind(pd.Series(np.arange(200, dtype=float) % 40 + 10.0), "price")
    assert kind == "regression" and "40 distinct" in notice


def test_integer_label_with_many_values_is_refused_naming_both_flags():
    with pytest.raises(GGDAError, match="--classification or --regression"):
        infer_label_kind(pd.Series(np.arange(1200) % 1000), "label")
    # but not when the values are few relative to the rows (25 classes in 10,000 rows)
    assert infer_label_kind(pd.Series(np.arange(10_000) % 25))[0] == "classification"


def test_explicit_flags_win(tmp_path):
    frame = mpg_like()
    frame["cls"] = np.arange(len(frame)) % 30  # 30 integer classes, ambiguous for the guess
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    assert load_file(path, label="mpg", kind="auto").kind == "regression"
    assert load_file(path, label="cls", kind="classification").n_classes == 30
    reg = load_file(path, label="cls", kind="regression")
    assert reg.kind == "regression" and np.allclose(reg.y, frame.cls)
    with pytest.raises(GGDAError, match="--classification or --regression"):
        load_file(path, label="cls", kind="auto")
    with pytest.raises(GGDAError, match="non-integer"):
        load_file(path, label="mpg", kind="classification")


def test_explicit_classification_with_too_many_sparse_classes_is_refused(tmp_path):
    frame = mpg_like()
    frame["mpg10"] = (frame.mpg * 10).astype(int)  # ~150 whole-number classes in 200 rows
    frame.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(GGDAError, match="rows per class.*--regression"):
        load_file(tmp_path / "d.csv", label="mpg10", kind="classification")


def test_auto_on_npz_guesses_too(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "r.npz", X=rng.normal(size=(100, 3)), y=rng.normal(size=100))
    ds = load_file(tmp_path / "r.npz", kind="auto")
    assert ds.kind == "regression" and "kind_notice" in ds.meta
    np.savez(tmp_path / "c.npz", X=rng.normal(size=(100, 3)), y=np.arange(100) % 2)
    assert load_file(tmp_path / "c.npz", kind="auto").kind == "classification"


# -- regression end to end --------------------------------------------------------------------


def _printed(output: str, name: str) -> float:
    return float(re.search(rf"\b{name}=([-0-9.e+]+)", output).group(1))


def test_regression_target_standardised_and_metrics_match_closed_form(tmp_path):
    frame = mpg_like()
    frame.to_csv(tmp_path / "d.csv", index=False)
    out = tmp_path / "run"
    r = invoke("train", "--data", tmp_path / "d.csv", "--label", "mpg", "--model", "logreg",
               "--epochs", 40, "--lr", 0.05, "--out", out, "--threads", 1)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "note: label 'mpg'" in r.output and "regression" in r.output
    run = Run.load(out)
    assert run.kind == "regression" and run.config["data"]["kind"] == "regression"
    mean, scale = run.config["target"]["target_mean"], run.config["target"]["target_scale"]
    # the stored scaler is the training split's own mean/std; the model saw standardised targets
    original = frame.set_index(np.arange(len(frame))).mpg
    y_train = original.loc[run.train.ids].to_numpy()
    assert mean == pytest.approx(y_train.mean()) and scale == pytest.approx(y_train.std())
    assert abs(run.train.y.mean()) < 1e-5 and run.train.y.std() == pytest.approx(1.0, abs=1e-4)
    assert np.allclose(run.test.y * scale + mean, original.loc[run.test.ids], atol=1e-4)
    # closed form: predictions of the saved model, back in mpg
    import torch

    with torch.no_grad():
        pred = run.model(torch.as_tensor(run.test.X)).numpy().ravel() * scale + mean
    y = original.loc[run.test.ids].to_numpy()
    mse = float(np.mean((pred - y) ** 2))
    r2 = 1 - float(np.sum((pred - y) ** 2)) / float(np.sum((y - y.mean()) ** 2))
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    assert metrics["test_mse"] == pytest.approx(mse, rel=1e-4)
    assert metrics["test_r2"] == pytest.approx(r2, rel=1e-4)
    assert _printed(r.output, "test_mse") == pytest.approx(mse, rel=1e-3)
    assert _printed(r.output, "test_r2") == pytest.approx(r2, rel=1e-3)
    assert "test R²" in r.output and np.isfinite(metrics["final_train_loss"])
    assert r2 > 0.8  # a linear target is learnt by a linear model
    assert "test_accuracy" not in metrics


def test_regression_flag_on_integer_labels_trains_regression(tmp_path):
    frame = mpg_like().assign(cls=lambda f: np.arange(len(f)) % 3)
    frame.to_csv(tmp_path / "d.csv", index=False)
    auto = invoke("train", "--data", tmp_path / "d.csv", "--label", "cls", "--model", "logreg",
                  "--epochs", 1, "--out", tmp_path / "a", "--threads", 1)  # fmt: skip
    assert auto.exit_code == 0 and "test_accuracy" in auto.output and "note:" not in auto.output
    reg = invoke("train", "--data", tmp_path / "d.csv", "--label", "cls", "--model", "logreg",
                 "--epochs", 1, "--regression", "--out", tmp_path / "r", "--threads", 1)  # fmt: skip
    assert reg.exit_code == 0 and "test_mse" in reg.output
    assert Run.load(tmp_path / "r").kind == "regression"


def test_divergence_advice_does_not_ask_to_standardise_standardised_data():
    from ggda.models.training import TrainConfig, train_model
    from ggda.models.zoo import ModelSpec, build_model

    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 3)).astype(np.float32)
    data = Dataset(X=X, y=(X @ [1.0, 2.0, 3.0]).astype(np.float32), kind="regression")
    net = build_model(ModelSpec("logreg", 3, 1), seed=0)
    with pytest.raises(GGDAError, match="lower the learning rate") as err:
        train_model(net, data, TrainConfig(epochs=5, lr=1e6, batch_size=64))
    assert "standardise" not in str(err.value)
    raw = Dataset(X=X * 1000 + 500, y=data.y * 1000, kind="regression")
    with pytest.raises(GGDAError, match="standardise the features.*standardise the target"):
        train_model(build_model(ModelSpec("logreg", 3, 1), seed=0), raw, TrainConfig(epochs=5, lr=1e6))


def test_old_regression_runs_keep_their_unscaled_target():
    from ggda.runs import config_data_spec

    old = {"data": {"source": "x.csv", "label": "y", "kind": "regression"}, "model": {}, "train": {}}
    assert config_data_spec(Path("r"), old).standardize_target is False
    assert DataSpec("x.csv").standardize_target is True


# -- ids ---------------------------------------------------------------------------------------


def test_id_column_ids_reach_the_loaded_run(tmp_path):
    frame = mpg_like()
    frame.to_csv(tmp_path / "d.csv", index=False)
    out = tmp_path / "run"
    r = invoke("train", "--data", tmp_path / "d.csv", "--label", "mpg", "--id-column", "row_id",
               "--model", "logreg", "--epochs", 1, "--out", out, "--threads", 1)  # fmt: skip
    assert r.exit_code == 0, r.output
    run = Run.load(out)
    ids = np.concatenate([run.train.ids, run.test.ids])
    assert sorted(ids.tolist()) == sorted(frame.row_id.tolist())
    assert "row_id" not in (run.train.feature_names or [])
    by_id = frame.set_index("row_id")
    assert np.allclose(run.test.y * run.config["target"]["target_scale"] + run.config["target"]["target_mean"],
                       by_id.loc[run.test.ids, "mpg"], atol=1e-4)  # fmt: skip
    assert np.array_equal(np.load(out / "split.npz")["train_ids"], run.train.ids)


@pytest.mark.parametrize(
    "column, match",
    [
        (lambda n: np.r_[np.arange(n - 1), 0], "repeats id 0"),
        (lambda n: np.r_[np.arange(n - 1), np.nan], "missing ids"),
        (lambda n: np.array([*map(str, range(n - 1)), "car-9"], dtype=object), r"non-integer id \('car-9'\)"),
    ],
)
def test_bad_id_columns_are_refused_with_the_fix(tmp_path, column, match):
    frame = mpg_like(50).assign(key=lambda f: column(len(f)))
    frame.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(GGDAError, match=match) as err:
        load_file(tmp_path / "d.csv", label="mpg", id_column="key", kind="auto")
    assert "--id-column" in str(err.value) and "'key'" in str(err.value)


# -- file forms --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix", [".csv.gz", ".csv.bz2", ".csv.xz", ".csv.zip", ".tsv", ".tsv.gz", ".parquet", ".pq"]
)
def test_compressed_and_other_forms_load_identical_data(tmp_path, suffix):
    frame = mpg_like(80).assign(maker=lambda f: np.where(f.year % 2, "ford", "fiat"))
    frame.to_csv(tmp_path / "d.csv", index=False)
    path = tmp_path / f"d{suffix}"
    if suffix in (".parquet", ".pq"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False, sep="\t" if ".tsv" in suffix else ",")
    kw = {"label": "mpg", "group_column": "year", "id_column": "row_id", "kind": "auto"}
    ref, got = load_file(tmp_path / "d.csv", **kw), load_file(path, **kw)
    assert got.name == "d" and got.kind == ref.kind == "regression"
    for attr in ("X", "y", "ids", "group_column", "group_names"):
        assert np.array_equal(getattr(got, attr), getattr(ref, attr)), attr
    assert got.feature_names == ref.feature_names


def test_file_forms_are_named():
    assert file_format("a/b.CSV.GZ") == (".csv", ".gz")
    assert file_format("x.tsv") == (".tsv", None) and file_format("x.pq") == (".pq", None)
    assert file_format("x.gz") is None and file_format("x.txt") is None and file_format("x") is None
    assert data_stem("auto-mpg.csv.gz") == "auto-mpg" and data_stem("v1.2.csv") == "v1.2"


def test_unknown_suffix_names_the_accepted_ones(tmp_path):
    (tmp_path / "d.txt").write_text("a,b\n1,2\n")
    for source in (tmp_path / "d.txt", "nothing.json"):
        with pytest.raises(GGDAError, match=r"\.csv or \.tsv.*\.gz.*\.parquet.*\.npz"):
            prepare_data(DataSpec(str(source), label="b"))


def test_zip_with_two_members_and_corrupt_gz_are_refused(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "two.csv.zip", "w") as zf:
        zf.writestr("a.csv", "x,y\n1,0\n")
        zf.writestr("b.csv", "x,y\n1,0\n")
    with pytest.raises(GGDAError, match="exactly one"):
        load_file(tmp_path / "two.csv.zip", label="y")
    (tmp_path / "bad.csv.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(GGDAError, match="bad.csv.gz"):
        load_file(tmp_path / "bad.csv.gz", label="y")


# -- group names -------------------------------------------------------------------------------


def test_group_names_survive_train_and_load(tmp_path):
    frame = mpg_like()
    frame.to_csv(tmp_path / "d.csv", index=False)
    out = tmp_path / "run"
    r = invoke("train", "--data", tmp_path / "d.csv", "--label", "mpg", "--group-column", "year",
               "--id-column", "row_id", "--model", "logreg", "--epochs", 1, "--out", out, "--threads", 1)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(out / "split.npz")["group_names"], [str(y) for y in range(70, 83)])
    run = Run.load(out)
    names = getattr(run.train, "group_names", None)
    assert names is not None and names.dtype.kind == "U"
    by_id = frame.set_index("row_id")
    for part in (run.train, run.test):
        assert np.array_equal(part.group_names[part.group_column], by_id.loc[part.ids, "year"].astype(str))
    sub = run.train.subset([3, 1])
    assert np.array_equal(sub.group_names, names)
    assert sub.group_names[sub.group_column[0]] == str(by_id.loc[run.train.ids[3], "year"])


def test_group_names_of_strings_and_whole_floats(tmp_path):
    frame = mpg_like(60).assign(
        src=lambda f: np.where(f.index % 3 == 0, "lab B", "lab A"), yr=lambda f: f.year * 1.0
    )
    frame.to_csv(tmp_path / "d.csv", index=False)
    ds = load_file(tmp_path / "d.csv", label="mpg", group_column="src", kind="auto")
    assert ds.group_names.tolist() == ["lab A", "lab B"] and ds.group_names[ds.group_column[0]] == "lab B"
    assert load_file(tmp_path / "d.csv", label="mpg", group_column="yr", kind="auto").group_names[0] == "70"


def test_dataset_refuses_group_names_that_do_not_cover_the_ids():
    with pytest.raises(GGDAError, match="group_names"):
        Dataset(
            X=np.zeros((3, 1)),
            y=np.array([0, 1, 0]),
            group_column=np.array([0, 1, 2]),
            group_names=["a", "b"],
        )
    with pytest.raises(GGDAError, match="group_column"):
        Dataset(X=np.zeros((3, 1)), y=np.array([0, 1, 0]), group_names=["a"])


# -- the real Auto-MPG file --------------------------------------------------------------------


def auto_mpg(tmp_path: Path) -> Path:
    mlxtend = pytest.importorskip("mlxtend")
    raw = Path(mlxtend.__file__).parent / "data" / "data" / "autompg.csv.gz"
    cols = ["cylinders", "displacement", "horsepower", "weight", "acceleration", "model_year", "origin",
            "car_name", "mpg"]  # fmt: skip
    frame = pd.read_csv(raw, header=None, names=cols).drop(columns="car_name")
    path = tmp_path / "auto-mpg.csv"
    frame.to_csv(path, index=False)
    return path


def test_a_file_without_a_header_row_is_named_as_such(tmp_path):
    """The Auto-MPG file as mlxtend ships it has no header: its first row of numbers becomes the
    column names, and the label is then missing; the error says what is wrong with the file."""
    mlxtend = pytest.importorskip("mlxtend")
    raw = Path(mlxtend.__file__).parent / "data" / "data" / "autompg.csv.gz"
    r = invoke("train", "--data", raw, "--label", "mpg", "--out", tmp_path / "run")
    text = str(r.exception)
    assert r.exit_code != 0 and "first row looks like data" in text and "add a header row" in text
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]})
    frame.to_csv(tmp_path / "ok.csv", index=False)  # a real header: the usual message
    r = invoke("train", "--data", tmp_path / "ok.csv", "--label", "mpg", "--out", tmp_path / "run2")
    assert r.exit_code != 0 and "choose one of ['a', 'b']" in str(r.exception)


def test_auto_mpg_end_to_end_is_regression_with_a_good_fit(tmp_path):
    path = auto_mpg(tmp_path)
    out = tmp_path / "run"
    r = invoke("train", "--data", path, "--label", "mpg", "--model", "mlp-s", "--epochs", 30,
               "--group-column", "model_year", "--out", out, "--threads", 1)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "note: label 'mpg' holds 127 distinct numbers" in r.output
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    assert np.isfinite(metrics["final_train_loss"]) and metrics["final_train_loss"] < 0.5
    assert metrics["test_r2"] > 0.5 and 0 < metrics["test_mse"] < 30  # mpg² (variance ~60)
    run = Run.load(out)
    assert run.kind == "regression" and run.train.group_names.tolist() == [str(y) for y in range(70, 83)]
    with pytest.raises(GGDAError, match="non-integer"):  # the old silent 127-class run is refused
        prepare_data(DataSpec(str(path), label="mpg", kind="classification"))
