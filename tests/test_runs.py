"""One way from a run to work: ``Run`` writes and reads a run directory and builds every method,
so the same method on the same run gives the same scores under every command.

A run trained with weight decay and checkpoints is attributed with ``if-cg`` (whose curvature
must include wd·I) and ``tracin`` (which must see the checkpoints) through the code paths of
``ggda attribute`` (the CLI), ``ggda evaluate`` (``_rankings``), ``ggda compare``
(``method_scores``) and ``ggda experiment`` (``attribute_all``); the scores must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ggda.cli.main import app
from ggda.runs import Run

TARGETS = 6
WD = 0.05


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "run"
    invoke(
        "train", "--data", "digits", "--model", "mlp-s", "--out", path, "--epochs", 2, "--max-train", 120,
        "--weight-decay", WD, "--checkpoint-every", 1, "--threads", 1,
    )  # fmt: skip
    return path


def test_save_and_load_round_trip(run_dir):
    r = Run.load(run_dir)
    assert r.weight_decay == WD and r.train_config.weight_decay == WD
    assert len(r.train) == 120 and [c.epoch for c in r.checkpoints] == [1, 2]
    train, test = r.data()
    assert train is r.train and test is r.test
    again = Run.load(run_dir)
    for a, b in zip(r.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    first = r.model_at(r.checkpoints[0].path)
    assert not torch.equal(next(first.parameters()), next(r.model.parameters()))


def test_run_options_are_offered_once(run_dir):
    r = Run.load(run_dir)
    assert r.method_options("if-cg")["weight_decay"] == WD
    assert "checkpoints" not in r.method_options("if-cg")
    assert r.method_options("tracin")["checkpoints"] == r.checkpoints
    assert r.method_options("trak")["checkpoints"] == r.checkpoints  # used by ensemble=checkpoints
    assert r.method_options("grad-dot") == {}
    assert r.method_options("if-cg", weight_decay=0.0)["weight_decay"] == 0.0  # overrides win
    assert r.method_options("tracin", checkpoints=None)["checkpoints"] is None
    # offered extras reach only the methods that accept them
    assert r.method_options("tracin", offer={"use_lr": False})["use_lr"] is False
    assert "use_lr" not in r.method_options("grad-dot", offer={"use_lr": False})
    assert r.method("if-cg").weight_decay == WD


@pytest.mark.parametrize("method", ["if-cg", "tracin"])
def test_same_scores_under_every_command(run_dir, tmp_path, method):
    from ggda.applications.evaluation import rankings
    from ggda.applications.experiment import ExperimentConfig, attribute_all
    from ggda.data.grouping import Grouping
    from ggda.execution import ResultStore
    from ggda.gold.compare import method_scores
    from ggda.properties import ExampleLoss

    r = Run.load(run_dir)
    n = len(r.train)
    singleton = Grouping.singleton(n)
    prop = ExampleLoss(r.test.X[:TARGETS], r.test.y[:TARGETS])

    # ggda attribute
    out = tmp_path / "attribute"
    invoke("attribute", "--run", run_dir, "--method", method, "--targets", TARGETS, "--out", out)
    attribute = np.load(out / "scores.npy")
    assert attribute.shape == (TARGETS, n)

    # ggda evaluate (--method computes the attribution in the command)
    evaluate = rankings(r, [], [method], singleton, "singleton", {}, "cpu", per_target=TARGETS)[
        f"{method}-singleton"
    ].scores

    # ggda compare (the method path of compare_methods)
    compare = method_scores(method, r.task(), r.train, singleton, prop, np.arange(n), run=r)

    # ggda experiment (per-target scores, as used for the LDS)
    config = ExperimentConfig(methods=[method])
    rows, scores, failures, _ = attribute_all(
        config, r, r.task(), {"singleton": singleton}, ResultStore(tmp_path / "store"), {}, lambda _: None,
        lds_targets=TARGETS,
    )  # fmt: skip
    assert not failures, failures
    experiment = scores[f"{method}|singleton"]["example"]

    assert attribute.dtype == np.float32  # the one saved dtype (ggda.results)
    for name, other in (("evaluate", evaluate), ("compare", compare), ("experiment", experiment)):
        np.testing.assert_array_equal(np.asarray(other).astype(np.float32), attribute, err_msg=name)

    # the run's options matter: without them the scores differ
    without = "weight_decay" if method == "if-cg" else "checkpoints"
    plain = r.method(method, **{without: 0.0 if without == "weight_decay" else None})
    bare = plain.cache(r.train, singleton).attribute(prop)
    assert not np.allclose(bare, attribute, rtol=1e-3)
