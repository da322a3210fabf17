"""Groupings that are groups: size-bounded K-Means, unit-normalised gradient features, per-class
by default. Digits (the issue's setting): a model that fits its training set has near-zero
gradients for most points, and plain Grad-K-Means put them all in one group."""

import numpy as np
import pytest

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.groups import make_grouping, parse_grouping_spec
from ggda.groups.clustering import bounded_kmeans_labels, kmeans_labels, size_bounds
from ggda.task import AttributionTask


@pytest.fixture(scope="module")
def fitted(digits_split):
    """mlp-s fitted to the whole digits training split (n = 1,438, 100 % train accuracy)."""
    from ggda.models import TrainConfig, build_model, train_model

    train, _ = digits_split
    model = build_model("mlp-s", train.n_features, train.n_outputs, seed=0)
    train_model(model, train, TrainConfig(epochs=10, lr=0.05, batch_size=32, seed=0))
    return train, AttributionTask(model)


@pytest.mark.parametrize("K", [50, 144])
def test_default_grad_kmeans_groups_are_comparable_in_size_and_pure(fitted, K):
    train, task = fitted
    n, m = len(train), len(train) / K
    g = make_grouping("grad-kmeans", train, n_groups=K, task=task, seed=0)
    assert g.n_groups == K and m / 3 <= g.sizes.min() and g.sizes.max() <= 3 * m
    assert g.meta["per_class"] is True and g.purity(train.y) == 1.0 and g.pure_fraction(train.y) == 1.0
    assert g.meta["sizes"] == {
        "min": int(g.sizes.min()),
        "median": float(np.median(g.sizes)),
        "max": int(g.sizes.max()),
    }
    assert g.meta["balance"] == "bounded" and g.meta["normalize"] == "unit" and n == len(g)
    # the variance-minimising variant is kept as an option, and is what the bounds repair
    plain = make_grouping(
        "grad-kmeans", train, n_groups=K, task=task, seed=0, per_class=False, balance="none", normalize="none"
    )
    assert plain.meta["balance"] == "none" and plain.sizes.max() > 0.5 * n  # the well-fit points' group


def test_deterministic_by_seed(fitted):
    train, task = fitted
    a = make_grouping("grad-kmeans", train, n_groups=50, task=task, seed=3)
    b = make_grouping("grad-kmeans", train, n_groups=50, task=task, seed=3)
    c = make_grouping("grad-kmeans", train, n_groups=50, task=task, seed=4)
    assert np.array_equal(a.labels, b.labels) and not np.array_equal(a.labels, c.labels)


def test_bounded_kmeans_splits_a_dominant_cluster_and_fills_tiny_ones():
    rng = np.random.default_rng(0)
    # 900 points near the origin (the "well-fit" mass) and 100 spread-out outliers
    F = np.r_[rng.normal(scale=1e-3, size=(900, 4)), rng.normal(scale=5.0, size=(100, 4))]
    plain, _ = kmeans_labels(F, 20, seed=0)
    assert np.bincount(plain).max() > 800  # one cluster takes the mass
    labels, meta = bounded_kmeans_labels(F, 20, seed=0)
    lo, hi = size_bounds(1000, 20)
    sizes = np.bincount(labels, minlength=20)
    assert (lo, hi) == (25, 100) and meta["size_bounds"] == [25, 100]
    assert len(sizes) == 20 and sizes.min() >= lo and sizes.max() <= hi and meta["balance_rounds"] >= 1

    # still a clustering: far below the within-group sum of squares of a random equal split
    def inertia(lab):
        return sum(((F[lab == j] - F[lab == j].mean(0)) ** 2).sum() for j in np.unique(lab))

    assert inertia(labels) < 0.75 * inertia(np.random.default_rng(1).permutation(1000) % 20)
    assert meta["inertia"] == pytest.approx(inertia(labels), rel=1e-6)
    again, _ = bounded_kmeans_labels(F, 20, seed=0)
    assert np.array_equal(labels, again)
    # ratio 1: equal sizes (up to one point)
    equal, _ = bounded_kmeans_labels(F, 7, seed=0, size_ratio=1.0)
    assert np.ptp(np.bincount(equal)) <= 1
    with pytest.raises(GGDAError, match="size_ratio"):
        size_bounds(10, 2, 0.5)


def test_size_bounds_are_always_feasible():
    for n in (7, 10, 99, 1000, 1438):
        for K in (1, 2, 3, n // 3 or 1, n // 2 or 1, n):
            for r in (1.0, 1.5, 2.0, 3.0):
                lo, hi = size_bounds(n, K, r)
                assert 1 <= lo <= n / K <= hi and K * lo <= n <= K * hi


def test_options_and_per_class_default(small_digits, trained_mlp):
    train, _ = small_digits
    task = AttributionTask(trained_mlp)
    g = make_grouping("kmeans", train, n_groups=30, balance="none")
    assert g.meta["balance"] == "none" and g.meta["per_class"] is True
    raw = make_grouping("grad-kmeans", train, n_groups=30, task=task, normalize="none")
    assert raw.meta["normalize"] == "none"
    assert (
        make_grouping("repr-kmeans", train, n_groups=30, task=task, normalize="unit").meta["normalize"]
        == "unit"
    )
    for bad, msg in (({"normalize": "l1"}, "normalize"), ({"balance": "equal"}, "balance")):
        with pytest.raises(GGDAError, match=msg):
            make_grouping("grad-kmeans", train, n_groups=30, task=task, **bad)
    # per-class by default only where it can be: not for random, not for K < classes, not regression
    assert make_grouping("random", train, n_groups=30).meta["per_class"] is False
    assert make_grouping("kmeans", train, n_groups=5).meta["per_class"] is False
    assert make_grouping("kmeans", train, group_size=100).meta["per_class"] is True
    reg = Dataset(X=train.X, y=train.y.astype(np.float32), kind="regression")
    assert make_grouping("kmeans", reg, n_groups=30).meta["per_class"] is False
    assert parse_grouping_spec("grad-kmeans:30:no-per-class")[1]["per_class"] is False
