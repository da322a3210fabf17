"""if-group-fisher: the batched empirical Fisher F̂ = (1/n) Σ_j g_S g_Sᵀ/|S| inverted by Woodbury
equals dense brute force (singletons = exact empirical Fisher, groups = F̂ from group gradients,
duplicated points = per-point Fisher), and scores do not depend on chunk or memory settings."""

import numpy as np
import pytest
import torch

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.gradients import per_example_gradients
from ggda.groups import Grouping, random_grouping
from ggda.methods import make_method
from ggda.methods.influence import DEFAULT_DAMPING_REL, base_damping
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    n, d, c = 40, 6, 3
    X = rng.normal(size=(n, d))
    y = rng.integers(0, c, size=n)
    train = Dataset(X, y, kind="classification", n_classes=c)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(d, 5), torch.nn.Tanh(), torch.nn.Linear(5, c)).double()
    task = AttributionTask(model)
    assert task.dtype == torch.float64
    Xt, yt = rng.normal(size=(4, d)), rng.integers(0, c, size=4)
    G = per_example_gradients(task, train.X, train.y).double().numpy()  # (n, p)
    Gt = ExampleLoss(Xt, yt).gradients(task).double().numpy()  # (T, p)
    return train, task, Xt, yt, G, Gt


def dense_scores(Gt, Gs, F, lam, n):
    return Gt @ np.linalg.solve(F + lam * np.eye(F.shape[0]), Gs.T) / n


def test_singleton_equals_dense_empirical_fisher(setup):
    train, task, Xt, yt, G, Gt = setup
    n, lam = len(G), 1e-3
    F = G.T @ G / n  # exact empirical Fisher from per-example gradients
    m = make_method("if-group-fisher", task, damping=lam).cache(train)
    scores = m.attribute(ExampleLoss(Xt, yt))
    ref = dense_scores(Gt, G, F, lam, n)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
    # the p-space Woodbury apply equals the dense inverse too
    V = torch.as_tensor(Gt)
    np.testing.assert_allclose(
        m.solve(V).numpy(), np.linalg.solve(F + lam * np.eye(len(F)), Gt.T).T, rtol=1e-8
    )


def test_groups_equal_dense_batched_fisher(setup):
    train, task, Xt, yt, G, Gt = setup
    n, lam = len(G), 1e-3
    grouping = random_grouping(n, 7, seed=1)
    Gs = np.stack([G[grouping.labels == j].sum(0) for j in range(7)])
    F_hat = (Gs.T / (n * grouping.sizes)) @ Gs
    m = make_method("if-group-fisher", task, damping=lam).cache(train, grouping)
    scores = m.attribute(ExampleLoss(Xt, yt))
    ref = dense_scores(Gt, Gs, F_hat, lam, n)
    np.testing.assert_allclose(scores, ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
    inv = np.linalg.solve(F_hat + lam * np.eye(len(F_hat)), Gt.T).T
    np.testing.assert_allclose(m.solve(torch.as_tensor(Gt)).numpy(), inv, rtol=1e-8)
    streamed = make_method("if-group-fisher", task, damping=lam, memory_mb=1e-4, max_batch=5).cache(
        train, grouping
    )
    np.testing.assert_allclose(streamed.solve(torch.as_tensor(Gt)).numpy(), inv, rtol=1e-8)
    # F̂ drops within-group directions: it differs from the per-point Fisher here
    assert not np.allclose(F_hat, G.T @ G / n, rtol=1e-3)
    mean = make_method("if-group-fisher", task, damping=lam, aggregate="mean").cache(train, grouping)
    np.testing.assert_allclose(mean.attribute(ExampleLoss(Xt, yt)), scores / grouping.sizes, rtol=1e-12)


def test_duplicate_groups_equal_per_point_fisher(setup):
    """Groups of exact copies of one point: F̂ = per-point Fisher, group score = sum of members."""
    train, task, Xt, yt, G, Gt = setup
    base = np.arange(12)
    reps = np.array([1, 2, 3, 1, 4, 2, 1, 1, 3, 2, 5, 1])
    idx = np.repeat(base, reps)
    dup = Dataset(train.X[idx], train.y[idx], kind="classification", n_classes=train.n_classes)
    n, lam = len(idx), 1e-3
    Gd = G[idx]
    F_point = Gd.T @ Gd / n
    grouping = Grouping(np.repeat(np.arange(len(base)), reps))
    Gs = np.stack([Gd[grouping.labels == j].sum(0) for j in range(len(base))])
    np.testing.assert_allclose((Gs.T / (n * grouping.sizes)) @ Gs, F_point, rtol=1e-10, atol=1e-14)
    group = (
        make_method("if-group-fisher", task, damping=lam).cache(dup, grouping).attribute(ExampleLoss(Xt, yt))
    )
    point = make_method("if-group-fisher", task, damping=lam).cache(dup).attribute(ExampleLoss(Xt, yt))
    summed = np.stack([point[:, grouping.labels == j].sum(1) for j in range(len(base))], axis=1)
    np.testing.assert_allclose(group, summed, rtol=1e-8, atol=1e-10 * np.abs(group).max())
    np.testing.assert_allclose(group, dense_scores(Gt, Gs, F_point, lam, n), rtol=1e-8)


@pytest.mark.parametrize("K", [40, 9])
def test_chunk_and_memory_invariance(setup, K):
    train, task, Xt, yt, G, Gt = setup
    grouping = random_grouping(len(G), K, seed=2)
    prop = ExampleLoss(Xt, yt)
    ref = make_method("if-group-fisher", task, damping=1e-2).cache(train, grouping).attribute(prop)
    for opts in ({"max_batch": 3}, {"memory_mb": 1e-4, "max_batch": 7}, {"memory_mb": 1e-4, "max_batch": 1}):
        m = make_method("if-group-fisher", task, damping=1e-2, **opts).cache(train, grouping)
        if opts.get("memory_mb"):
            assert m.side.G is None  # streamed Gram path
        np.testing.assert_allclose(m.attribute(prop), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


def test_default_damping_and_errors(setup):
    train, task, Xt, yt, G, Gt = setup
    m = make_method("if-group-fisher", task, weight_decay=0.01).cache(train)
    # default: the spectrum of F + wd·I + λI floored at 1 % of its top (F = per-point Fisher here)
    top = float(np.linalg.eigvalsh(G.T @ G / len(G))[-1]) + 0.01
    assert m.info["lambda_max"] == pytest.approx(top, rel=1e-9)
    assert m.lambda_ == pytest.approx(max(DEFAULT_DAMPING_REL * top, 0.01))
    lam0 = base_damping(task, train.X, train.y)
    np.testing.assert_allclose(lam0, (G**2).mean(), rtol=1e-10)
    m = make_method("if-group-fisher", task, weight_decay=0.01, damping_scale=100).cache(train)
    assert m.lambda_ == pytest.approx(100 * lam0 + 0.01)
    with pytest.raises(GGDAError, match="max_groups"):
        make_method("if-group-fisher", task, max_groups=10).cache(train)
    with pytest.raises(GGDAError, match="damping"):
        make_method("if-group-fisher", task, damping=-1.0)
