"""make_grouping: every method, per-class, K/size handling, empty clusters, given groups, errors."""

import numpy as np
import pytest

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.groups import (
    Grouping,
    allocate_groups,
    given_grouping,
    make_grouping,
    resolve_n_groups,
)
from ggda.groups.clustering import fix_empty_clusters, kmeans_labels
from ggda.task import AttributionTask

CLUSTERED = ("kmeans", "repr-kmeans", "grad-kmeans")


@pytest.fixture(scope="module")
def task(trained_mlp):
    return AttributionTask(trained_mlp)


@pytest.mark.parametrize("method", ["random", *CLUSTERED])
def test_every_method_valid_seeded_and_timed(method, small_digits, task):
    train, _ = small_digits
    g = make_grouping(method, train, n_groups=15, task=task, seed=3)
    assert g.method == method and g.n_groups == 15 and len(g) == len(train)
    assert g.sizes.min() >= 1 and g.seconds > 0
    # K-Means methods are per-class by default on classification data; random is a plain split
    assert 0 < g.meta["purity"] <= 1 and g.meta["per_class"] is (method != "random")
    again = make_grouping(method, train, n_groups=15, task=task, seed=3)
    assert np.array_equal(g.labels, again.labels)  # reproducible
    if method != "random":
        assert g.meta["feature_dim"] == {"kmeans": 64, "repr-kmeans": 128, "grad-kmeans": 1290}[method]
        assert g.meta["empty_clusters"] == 0 and "cluster_seconds" in g.meta


@pytest.mark.parametrize("method", ["random", *CLUSTERED])
def test_per_class_groups_are_pure_and_proportional(method, small_digits, task):
    train, _ = small_digits
    g = make_grouping(method, train, n_groups=23, task=task, per_class=True)
    assert g.n_groups == 23 and g.purity(train.y) == 1.0 and g.pure_fraction(train.y) == 1.0
    assert g.meta["per_class"] is True and g.summary(train.y)["purity"] == 1.0
    counts = np.bincount(train.y)
    per_class = np.array([len(np.unique(g.labels[train.y == c])) for c in range(10)])
    assert np.array_equal(per_class, allocate_groups(counts, 23))
    # with a target size every class gets round(n_c / s) groups
    gs = make_grouping(method, train, group_size=10, task=task, per_class=True)
    per_class = np.array([len(np.unique(gs.labels[train.y == c])) for c in range(10)])
    assert np.array_equal(per_class, np.maximum(1, np.round(counts / 10)).astype(int))


def test_allocation_largest_remainder():
    k = allocate_groups(np.array([50, 30, 20]), 10)
    assert k.tolist() == [5, 3, 2]
    k = allocate_groups(np.array([97, 2, 1]), 5)  # every class gets >= 1, never more than its size
    assert k.sum() == 5 and k.min() >= 1 and k.tolist() == [3, 1, 1]
    k = allocate_groups(np.array([3, 1, 1]), 5)
    assert k.tolist() == [3, 1, 1]
    with pytest.raises(GGDAError, match="at least one group per class"):
        allocate_groups(np.array([5, 5, 5]), 2)


def test_group_size_and_bad_k(small_digits):
    train, _ = small_digits
    assert resolve_n_groups(300, group_size=20) == 15
    assert make_grouping("random", train, group_size=7).n_groups == round(300 / 7)
    assert make_grouping("kmeans", train, n_groups=300).is_singleton
    assert make_grouping("kmeans", train, n_groups=1).n_groups == 1
    for kwargs, msg in [
        ({"n_groups": 0}, "between 1 and n=300"),
        ({"n_groups": 301}, "between 1 and n=300"),
        ({"group_size": 301}, "Group size 301"),
        ({"group_size": 0}, "Group size 0"),
        ({}, "exactly one of"),
        ({"n_groups": 5, "group_size": 5}, "exactly one of"),
    ]:
        with pytest.raises(GGDAError, match=msg):
            make_grouping("kmeans", train, **kwargs)


def test_model_methods_need_a_model_and_bad_options(small_digits, trained_mlp):
    train, _ = small_digits
    for method in ("repr-kmeans", "grad-kmeans"):
        with pytest.raises(GGDAError, match="needs the trained model"):
            make_grouping(method, train, n_groups=5)
    # an nn.Module is accepted and wrapped
    assert make_grouping("grad-kmeans", train, n_groups=5, task=trained_mlp).n_groups == 5
    with pytest.raises(GGDAError, match="Unknown grouping method"):
        make_grouping("gradkmeans", train, n_groups=5)
    with pytest.raises(GGDAError, match="Unknown option"):
        make_grouping("kmeans", train, n_groups=5, layer="1")
    with pytest.raises(GGDAError, match="Unknown gradient features"):
        make_grouping("grad-kmeans", train, n_groups=5, task=trained_mlp, features="hessian")
    reg = Dataset(X=train.X, y=train.y.astype(np.float32), kind="regression")
    with pytest.raises(GGDAError, match="per_class needs class labels"):
        make_grouping("random", reg, n_groups=5, per_class=True)
    assert "purity" not in make_grouping("kmeans", reg, n_groups=5).meta


def test_grad_kmeans_feature_options(small_digits, task):
    train, _ = small_digits
    for opts, dim in [
        ({"features": "logits"}, 10),
        ({"features": "projected", "projection_dim": 64}, 64),
        ({"projection_dim": 32}, 32),
        ({"layer": "0"}, 128 * 65),
    ]:
        g = make_grouping("grad-kmeans", train, n_groups=10, task=task, **opts)
        assert g.n_groups == 10 and g.meta["feature_dim"] == dim


def test_empty_clusters_are_reseeded_or_merged():
    # 6 distinct points, K = 9: sklearn leaves clusters empty; they must never reach the user
    F = np.repeat(np.arange(6, dtype=np.float32)[:, None], 5, axis=0)
    labels, meta = kmeans_labels(F, 9, seed=0)
    assert np.bincount(labels).min() >= 1 and labels.max() == 8 and meta["empty_clusters"] >= 3
    labels, meta = kmeans_labels(F, 9, seed=0, empty="merge")
    assert labels.max() + 1 == 9 - meta["empty_clusters"] and np.bincount(labels).min() >= 1
    # the re-seed splits the largest cluster along its structure (2-means), not arbitrarily
    F = np.r_[np.zeros((4, 2)), np.ones((4, 2)), np.full((2, 2), 9.0)]
    fixed, count = fix_empty_clusters(F, np.array([0] * 8 + [1] * 2), 3)
    assert count == 1 and len(set(fixed[:4])) == 1 and len(set(fixed[4:8])) == 1 and fixed[0] != fixed[4]
    # all-identical members still split
    fixed, _ = fix_empty_clusters(np.zeros((6, 2)), np.zeros(6, dtype=int), 3)
    assert np.bincount(fixed).tolist() == [1, 3, 2]
    # and through make_grouping the record lands in meta
    dup = Dataset(X=np.repeat(np.eye(4, dtype=np.float32), 10, axis=0), y=np.arange(40) % 2)
    g = make_grouping("kmeans", dup, n_groups=8, per_class=False)
    assert g.n_groups == 8 and g.meta["empty_clusters"] >= 4 and g.meta["empty_policy"] == "reseed"
    g = make_grouping("kmeans", dup, n_groups=12, per_class=True)  # 4 distinct points, 6 groups per class
    assert g.n_groups == 12 and g.purity(dup.y) == 1.0 and g.meta["empty_clusters"] >= 4
    assert g.meta["algorithm"] == "kmeans" and g.meta["empty_policy"] == "reseed"


def test_minibatch_path(small_digits):
    train, _ = small_digits
    g = make_grouping("kmeans", train, n_groups=12, algorithm="minibatch", seed=1)
    assert g.meta["algorithm"] == "minibatch" and g.n_groups == 12
    assert np.array_equal(
        g.labels, make_grouping("kmeans", train, n_groups=12, algorithm="minibatch", seed=1).labels
    )


def test_given_and_singleton(small_digits, tmp_path):
    train, _ = small_digits
    n = len(train)
    ids = np.arange(n) % 7
    g = make_grouping("given", train, values=ids)
    assert np.array_equal(g.labels, ids) and g.method == "given"
    names = np.array(["src-" + str(i % 3) for i in range(n)])
    assert make_grouping("given", train, values=names).meta["names"] == ["src-0", "src-1", "src-2"]
    np.save(tmp_path / "g.npy", ids)
    assert np.array_equal(make_grouping("given", train, values=str(tmp_path / "g.npy")).labels, ids)
    import dataclasses

    with_col = dataclasses.replace(train, group_column=names)
    assert make_grouping("given", with_col).n_groups == 3
    for values, msg in [
        (ids[:-1], "has 299 entries"),
        (ids + 0.5, "non-integer"),
        (ids - 1, "negative"),
        (np.where(ids == 3, 4, ids), "no empty group"),
        (ids > 3, "booleans"),
    ]:
        with pytest.raises(GGDAError, match=msg):
            make_grouping("given", train, values=values)
    with pytest.raises(GGDAError, match="no group column"):
        given_grouping(train)
    with pytest.raises(GGDAError, match="fix K themselves"):
        make_grouping("given", train, n_groups=3, values=ids)
    with pytest.raises(GGDAError, match="per_class does not apply"):
        make_grouping("given", train, values=ids, per_class=True)
    s = make_grouping("singleton", train)
    assert s.is_singleton and s.meta["purity"] == 1.0


def test_summary_purity_and_parquet_ids(tmp_path):
    g = Grouping(np.array([0, 0, 1, 1, 1, 2]))
    y = np.array([3, 3, 1, 1, 2, 5])
    s = g.summary(y)
    assert s["purity"] == pytest.approx(5 / 6) and s["pure_groups"] == pytest.approx(2 / 3)
    assert "purity" not in g.summary()
    path = g.save(tmp_path / "g.parquet", ids=np.array([10, 11, 12, 13, 14, 15]))
    import pandas as pd

    frame = pd.read_parquet(path)
    assert frame.columns.tolist() == ["position", "id", "group"]
    assert np.array_equal(Grouping.load(path).labels, g.labels)
    assert np.array_equal(Grouping.load(g.save(tmp_path / "g.csv")).labels, g.labels)
    assert g.save(tmp_path / "plain").name == "plain.npy"
