"""Row-order invariance: permuting the training rows (ids travel with them) and un-permuting the
scores gives the same scores, for every registered method.

Deterministic methods may differ only by floating-point summation order (float64 here, so far
below the 1e-6 tolerance). Methods with randomness key it by what does not move with the rows:
LiSSA's mini-batches are drawn over the examples in id order, λ₀ is computed over all rows (or
an id-keyed subsample), Arnoldi's start vector and TRAK's projections are indexed by parameter.
"""

import numpy as np
import pytest
import torch

from ggda.data.dataset import Dataset
from ggda.groups import Grouping, random_grouping
from ggda.methods import METHODS, make_method
from ggda.models import TrainConfig, train_model
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask

# Options that keep each method fast here while exercising its random parts (mini-batches smaller
# than n, projections smaller than p). Methods not listed run with their defaults.
OPTIONS = {
    "if-lissa": {"batch_size": 16, "depth": 60},
    "if-arnoldi": {"rank": 10, "iterations": 30},
    "if-cg": {"tol": 1e-10, "max_iter": 300},
    "trak": {"proj_dim": 64},
}


@pytest.fixture(scope="module")
def problem(small_digits):
    train, test = small_digits
    train = train.subset(np.arange(90))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 6), torch.nn.Tanh(), torch.nn.Linear(6, 10))
    train_model(model, train, TrainConfig(epochs=8, lr=0.1, batch_size=32))
    task = AttributionTask(model.double())
    train = Dataset(train.X, train.y, ids=np.arange(len(train)) * 7 + 3, name="rows")  # ids ≠ positions
    perm = np.random.default_rng(1).permutation(len(train))
    grouping = random_grouping(len(train), 9, seed=2)
    return task, train, perm, grouping, ExampleLoss(test.X[:4], test.y[:4])


def _close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-300))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_scores_do_not_depend_on_row_order(problem, name):
    task, train, perm, grouping, prop = problem
    opts = OPTIONS.get(name, {})
    shuffled = train.subset(perm)  # ids move with their rows
    assert np.array_equal(shuffled.ids, train.ids[perm])
    # per point: column j of the shuffled run is training row perm[j]
    a = make_method(name, task, **opts).cache(train).attribute(prop)
    b = make_method(name, task, **opts).cache(shuffled).attribute(prop)
    assert _close(a[:, perm], b) < 1e-6, _close(a[:, perm], b)
    # groups: the same groups (labels travel with the rows), same column order
    g = make_method(name, task, **opts).cache(train, grouping).attribute(prop)
    h = make_method(name, task, **opts).cache(shuffled, Grouping(grouping.labels[perm])).attribute(prop)
    assert _close(g, h) < 1e-6, _close(g, h)
