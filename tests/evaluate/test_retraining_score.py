"""Retraining score: removal sets, the class oracle, a real attribution, resumability."""

from __future__ import annotations

import numpy as np
import pytest

from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.evaluate import (
    random_removal,
    rank_units,
    removal_pairs,
    removal_set,
    retraining_score,
)
from ggda.evaluate.pruning import pruning_curves
from ggda.execution import SerialExecutor
from ggda.groups import random_grouping
from tests.evaluate.conftest import class_scores


def test_rank_units_orders_and_breaks_ties_randomly():
    s = np.array([0.0, 3.0, -1.0, 0.0, 0.0, 2.0])
    order = rank_units(s, "helpful", seed=0)
    assert order[:2].tolist() == [1, 5] and order[-1] == 2
    assert rank_units(s, "harmful")[0] == 2
    ties = {tuple(rank_units(s, "helpful", seed=k)[2:5]) for k in range(20)}
    assert len(ties) > 1  # zero scores are not ordered by position


def test_removal_set_takes_whole_groups_in_rank_order():
    g = Grouping(np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3]))
    scores = np.array([1.0, 5.0, 3.0, -2.0])  # rank: group 1, group 2, group 0, group 3
    assert removal_set(scores, g, 0.2).tolist() == [3, 4]  # exactly group 1
    exact = removal_set(scores, g, 0.4, fill="exact")  # group 1 + 2 of group 2's 4 members
    assert len(exact) == 4 and {3, 4} <= set(exact.tolist()) and set(exact.tolist()) <= {3, 4, 5, 6, 7, 8}
    cover = removal_set(scores, g, 0.4, fill="cover")
    assert cover.tolist() == [3, 4, 5, 6, 7, 8]  # whole groups until >= 4 points
    assert removal_set(scores, g, 0.0).size == 0
    harmful = removal_set(scores, g, 0.1, order="harmful")
    assert harmful.tolist() == [9]
    with pytest.raises(GGDAError):
        removal_set(scores[:3], g, 0.2)


def test_random_removal_is_seeded_and_sized():
    a, b = random_removal(300, 0.1, 0), random_removal(300, 0.1, 1)
    assert len(a) == 30 and len(np.unique(a)) == 30
    assert np.array_equal(a, random_removal(300, 0.1, 0)) and not np.array_equal(a, b)


def test_class_oracle_collapses_that_class(make_retrainer, small_digits):
    """Removing exactly one class: its test accuracy goes to ~0, overall drops below random removal."""
    train, test = small_digits
    cls = 3
    fraction = (train.y == cls).sum() / len(train)
    retrainer = make_retrainer()
    result = retraining_score(
        retrainer,
        {"oracle": (class_scores(train.y, cls), Grouping.singleton(len(train)))},
        fractions=[fraction],
        seeds=[0, 1],
        keep_correct=True,
    )
    oracle, rnd = result.curves["oracle"], result.random
    assert oracle.n_removed[0] == (train.y == cls).sum()
    assert oracle.class_accuracy(test.y, cls).max() == 0.0
    assert rnd.class_accuracy(test.y, cls).mean() > 0.6
    assert oracle.acc_mean[0] < rnd.acc_mean[0] - 0.05
    assert result.none_accuracy.mean() > 0.85
    table = result.table()
    assert set(table["label"]) == {"oracle", "random"} and (table["drop"] > -1).all()


def test_grouped_oracle_matches_pointwise(make_retrainer, small_digits):
    """Label-pure groups summing the oracle scores remove the same class: identical outcomes."""
    train, _ = small_digits
    cls = 5
    fraction = (train.y == cls).sum() / len(train)
    grouping = Grouping.from_ids(train.y * 10 + np.arange(len(train)) % 3)  # 3 groups per class
    group_scores = np.bincount(grouping.labels, weights=class_scores(train.y, cls))
    retrainer = make_retrainer()
    result = retraining_score(
        retrainer,
        {
            "point": (class_scores(train.y, cls), Grouping.singleton(len(train))),
            "group": (group_scores, grouping),
        },
        fractions=[fraction],
        seeds=[0],
    )
    assert np.array_equal(result.curves["point"].accuracy, result.curves["group"].accuracy)


class Interrupted(RuntimeError):
    pass


class StopAfter(SerialExecutor):
    """Runs ``limit`` jobs then dies, like a killed evaluation."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def run(self, jobs, store, progress=False):
        todo = self.pending(jobs, store)
        super().run(todo[: self.limit], store)
        if len(todo) > self.limit:
            raise Interrupted
        return len(todo)


def test_interrupted_evaluation_resumes_with_identical_numbers(make_retrainer, small_digits, tmp_path):
    train, _ = small_digits
    rng = np.random.default_rng(0)
    rankings = {
        "a": (rng.normal(size=len(train)), Grouping.singleton(len(train))),
        "b": (rng.normal(size=20), random_grouping(len(train), 20, seed=1)),
    }
    args = dict(fractions=[0.05, 0.2], seeds=[0, 1])
    total = len({make_retrainer().job(r, s).key for r, s in removal_pairs(rankings, len(train), **args)})
    first = make_retrainer(store=tmp_path / "ref")
    reference = retraining_score(first, rankings, **args).table()
    assert (first.executed, first.reused) == (total, 0)  # "N retrainings run now, 0 reused"

    with pytest.raises(Interrupted):
        retraining_score(make_retrainer(store=tmp_path / "resume", executor=StopAfter(5)), rankings, **args)
    resumed = make_retrainer(store=tmp_path / "resume")
    again = retraining_score(resumed, rankings, **args).table()
    assert resumed.executed == total - 5 and resumed.reused == 5
    assert again.equals(reference)
    rerun = make_retrainer(store=tmp_path / "resume")
    retraining_score(rerun, rankings, **args)
    assert rerun.executed == 0 and rerun.reused == total


def test_pruning_removes_harmful_first(make_retrainer, small_digits):
    """Pruning with the class oracle drops the zero-score classes first, keeping class 3 intact."""
    train, test = small_digits
    scores = class_scores(train.y, 3)
    retrainer = make_retrainer()
    result = pruning_curves(retrainer, {"oracle": (scores, Grouping.singleton(len(train)))}, [0.3], seeds=[0])
    removed = removal_set(scores, Grouping.singleton(len(train)), 0.3, order="harmful")
    assert not np.isin(removed, np.flatnonzero(train.y == 3)).any()
    assert result.order == "harmful" and result.curves["oracle"].n_removed[0] == 90


@pytest.mark.slow
def test_per_point_grad_dot_beats_random_removal(make_retrainer, small_digits, trained_mlp):
    """A real attribution (Grad-Dot on the mean test loss) removes what the MLP needs."""
    from ggda.methods import make_method
    from ggda.models import TrainConfig
    from ggda.properties import MeanLoss
    from ggda.task import AttributionTask

    train, test = small_digits
    scores = (
        make_method("grad-dot", AttributionTask(trained_mlp)).cache(train).attribute(MeanLoss(test.X, test.y))
    )
    retrainer = make_retrainer(model="mlp-s", config=TrainConfig(epochs=5, lr=0.05, batch_size=32))
    result = retraining_score(
        retrainer, {"grad-dot": (scores, Grouping.singleton(len(train)))}, [0.2], seeds=[0, 1, 2]
    )
    assert result.curves["grad-dot"].acc_mean[0] < result.random.acc_mean[0] - 0.03


def test_jobs_pickle_and_rebuild_data_from_the_spec(tmp_path):
    """Jobs travel to spawned workers/other hosts: pickled, they rebuild the data from the DataSpec."""
    import pickle

    from ggda.data.spec import DataSpec, prepare_data
    from ggda.evaluate import Retrainer, RetrainSpec
    from ggda.evaluate import retraining as retraining_module
    from ggda.models import ModelSpec, TrainConfig

    spec_data = DataSpec("digits", max_train=150)
    train, test, _ = prepare_data(spec_data)
    spec = RetrainSpec(
        ModelSpec("logreg", train.n_features, train.n_outputs), TrainConfig(epochs=2), spec_data
    )
    retrainer = Retrainer(spec, tmp_path / "store", SerialExecutor())
    job = retrainer.job(np.arange(10), 0)
    assert job.kwargs["arrays"] is None  # data are rebuilt, not shipped
    fn, kwargs = pickle.loads(pickle.dumps((job.fn, job.kwargs)))
    retraining_module._DATA_CACHE.clear()
    shipped = fn(**kwargs)
    local = retrainer.run([np.arange(10)], [0])
    assert np.array_equal(shipped["losses"], local.losses[0, 0])
    assert retrainer.job(np.arange(10)[::-1], 0).key == job.key  # order-free removal sets
