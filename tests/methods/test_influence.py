"""Influence functions: closed forms, agreement between solvers, actual leave-one-out retraining,
group linearity and chunk-size invariance."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.gradients import per_example_gradients
from ggda.groups import random_grouping
from ggda.methods import METHODS, make_method
from ggda.methods.curvature import TrainingCurvature
from ggda.methods.influence import DEFAULT_DAMPING_REL, base_damping, relative_damping
from ggda.models import TrainConfig, train_model
from ggda.properties import ExampleLoss, MeanLoss
from ggda.task import AttributionTask

IF_METHODS = ["if-explicit", "if-cg", "if-lissa", "if-arnoldi", "ekfac"]
EXACT_OPTIONS = {
    "if-explicit": {},
    "if-cg": {"tol": 1e-12, "max_iter": 100},
    "if-lissa": {"batch_size": None, "depth": 600},
    "if-arnoldi": {"rank": 100, "iterations": 100},
    "ekfac": {},
}


# -- linear regression: closed form ------------------------------------------------------------
@pytest.fixture(scope="module")
def linreg():
    rng = np.random.default_rng(0)
    n, d = 60, 5
    X = rng.normal(size=(n, d)) * np.array([1.0, 1.5, 0.7, 1.0, 1.2])
    y = X @ rng.normal(size=d) + 0.3 * rng.normal(size=n)
    train = Dataset(X, y, kind="regression")
    Xb = np.c_[train.X.astype(np.float64), np.ones(n)]
    sol = np.linalg.lstsq(Xb, train.y.astype(np.float64), rcond=None)[0]
    model = torch.nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight[:] = torch.as_tensor(sol[:d])
        model.bias[:] = torch.as_tensor(sol[d:])
    Xt = rng.normal(size=(4, d))
    yt = Xt @ sol[:d] + sol[d] + rng.normal(size=4)
    return train, Xb, sol, model, Xt, yt


def closed_form(Xb, resid, xt, rt, damping):
    """Per-point IF for squared error ½(xᵀw − y)²: g_i = r_i x_i, H = XᵀX/n."""
    n = len(Xb)
    H = Xb.T @ Xb / n
    G = Xb * resid[:, None]
    Gt = xt * rt[:, None]
    return Gt @ np.linalg.solve(H + damping * np.eye(H.shape[0]), G.T) / n


@pytest.mark.parametrize("method", IF_METHODS)
@pytest.mark.parametrize("hessian", ["exact", "gn"])
def test_linear_regression_closed_form(linreg, method, hessian):
    train, Xb, sol, model, Xt, yt = linreg
    task = AttributionTask(model, loss="regression")
    assert task.dtype == torch.float64
    damping = 1e-3
    resid = Xb @ sol - train.y.astype(np.float64)
    Xtb = np.c_[Xt, np.ones(len(Xt))]
    ref = closed_form(Xb, resid, Xtb, Xtb @ sol - yt, damping)
    if method == "ekfac" and hessian == "exact":
        with pytest.raises(GGDAError, match="Gauss-Newton"):
            make_method(method, task, hessian=hessian)
        return
    options = dict(EXACT_OPTIONS[method])
    if method == "if-lissa":  # scale just above λ_max so 600 steps converge to ~1e-12
        options["scale"] = 1.05 * (np.linalg.eigvalsh(Xb.T @ Xb / len(Xb)).max() + damping)
    attributor = make_method(method, task, damping=damping, hessian=hessian, **options)
    scores = attributor.cache(train).attribute(ExampleLoss(Xt, yt))
    assert scores.dtype == np.float64
    assert np.allclose(scores, ref, rtol=1e-7, atol=1e-10 * np.abs(ref).max())


def test_solvers_agree_with_each_other_on_a_damped_mlp(small_mlp):
    """On a non-linear model every solver approximates the same (G + λI)⁻¹ (G = GN)."""
    task, train, prop = small_mlp
    lam = 0.05
    ref = make_method("if-explicit", task, damping=lam).cache(train).attribute(prop)
    cg = make_method("if-cg", task, damping=lam, tol=1e-10, max_iter=300).cache(train).attribute(prop)
    assert np.allclose(cg, ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())
    p = task.n_params
    arn = make_method("if-arnoldi", task, damping=lam, rank=p, iterations=p).cache(train).attribute(prop)
    assert np.allclose(arn, ref, rtol=1e-5, atol=1e-7 * np.abs(ref).max())
    lissa = (
        make_method("if-lissa", task, damping=lam, batch_size=None, depth=300).cache(train).attribute(prop)
    )
    assert np.corrcoef(lissa.ravel(), ref.ravel())[0, 1] > 0.999


# -- L2-regularised logistic regression vs actual leave-one-out retraining ----------------------
def _bce(z, y):
    return F.binary_cross_entropy_with_logits(z[:, 0], y.to(z.dtype), reduction="none")


def _fit_logreg(X, y, wd, weights, theta0=None):
    """argmin (1/n) Σ w_i ℓ_i(θ) + (wd/2)‖θ‖² by Newton's method to machine precision (convex)."""
    n, d = X.shape
    Xb = np.c_[X, np.ones(n)]
    theta = np.zeros(d + 1) if theta0 is None else theta0.copy()
    for _ in range(100):
        p = 1 / (1 + np.exp(-Xb @ theta))
        grad = Xb.T @ (weights * (p - y)) / n + wd * theta
        H = (Xb * (weights * p * (1 - p))[:, None]).T @ Xb / n + wd * np.eye(d + 1)
        step = np.linalg.solve(H, grad)
        theta -= step
        if np.abs(step).max() < 1e-15:
            break
    return theta


def _test_losses(theta, Xt, yt):
    z = np.c_[Xt, np.ones(len(Xt))] @ theta
    return np.logaddexp(0, z) - yt * z


def test_explicit_if_matches_actual_leave_one_out_retraining():
    rng = np.random.default_rng(3)
    n, d, wd = 50, 3, 0.01
    X = rng.normal(size=(n, d))
    y = (X @ np.array([1.5, -2.0, 0.5]) + 0.8 * rng.normal(size=n) > 0).astype(np.int64)
    Xt = rng.normal(size=(6, d))
    yt = (Xt @ np.array([1.5, -2.0, 0.5]) > 0).astype(np.int64)
    train = Dataset(X, y)
    Xf = train.X.astype(np.float64)
    theta = _fit_logreg(Xf, y, wd, np.ones(n))
    base = _test_losses(theta, Xt, yt)
    actual = np.zeros((len(Xt), n))
    for i in range(n):
        w = np.ones(n)
        w[i] = 0.0  # same objective without point i: (1/n) Σ_{j≠i} ℓ_j + (wd/2)‖θ‖²
        actual[:, i] = _test_losses(_fit_logreg(Xf, y, wd, w, theta), Xt, yt) - base
    model = torch.nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight[:] = torch.as_tensor(theta[:d])
        model.bias[:] = torch.as_tensor(theta[d:])
    task = AttributionTask(model, loss=_bce)
    scores = make_method("if-explicit", task, damping=0.0, weight_decay=wd, hessian="exact")
    scores = scores.cache(train).attribute(ExampleLoss(Xt, yt))
    for t in range(len(Xt)):
        r = np.corrcoef(scores[t], actual[t])[0, 1]
        assert r >= 0.95, (t, r)
    # same scale, not only correlated: IF estimates f(θ_{-i}) − f(θ) itself
    assert np.linalg.norm(scores - actual) < 0.3 * np.linalg.norm(actual), np.linalg.norm(
        scores - actual
    ) / np.linalg.norm(actual)
    # and leave-group-out: the group IF of a group is the sum of its members' IFs
    grouping = random_grouping(n, 10, seed=0)
    grouped = make_method("if-explicit", task, damping=0.0, weight_decay=wd, hessian="exact")
    gscores = grouped.cache(train, grouping).attribute(ExampleLoss(Xt, yt))
    lgo = np.zeros_like(gscores)
    for j in range(grouping.n_groups):
        w = np.ones(n)
        w[grouping.members(j)] = 0.0
        lgo[:, j] = _test_losses(_fit_logreg(Xf, y, wd, w, theta), Xt, yt) - base
    assert np.mean([np.corrcoef(gscores[t], lgo[t])[0, 1] for t in range(len(Xt))]) > 0.9


# -- small MLP on digits: group linearity, singleton = per point, invariances ------------------
@pytest.fixture(scope="module")
def small_mlp(small_digits):
    train, test = small_digits
    train = train.subset(np.arange(120))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
    train_model(model, train, TrainConfig(epochs=10, lr=0.1, batch_size=32))
    model = model.double()
    return AttributionTask(model), train, ExampleLoss(test.X[:5], test.y[:5])


FAST_OPTIONS = {
    "if-explicit": {},
    "if-cg": {"tol": 1e-9, "max_iter": 200},
    "if-lissa": {"batch_size": None, "depth": 100},
    "if-arnoldi": {"rank": 40, "iterations": 80},
    "ekfac": {},
    "datainf": {},
}


@pytest.mark.parametrize("method", list(FAST_OPTIONS))
def test_singleton_is_per_point_and_group_is_sum(small_mlp, method):
    task, train, prop = small_mlp
    opts = {k: v for k, v in FAST_OPTIONS[method].items()}
    if method != "datainf":
        opts["damping"] = 1e-2
    single = make_method(method, task, **opts)
    per_point = single.cache(train).attribute(prop)
    assert per_point.shape == (5, len(train))
    grouping = random_grouping(len(train), 13, seed=1)
    grouped = make_method(method, task, **opts).cache(train, grouping).attribute(prop)
    summed = np.zeros_like(grouped)
    np.add.at(summed.T, grouping.labels, per_point.T)
    assert np.allclose(grouped, summed, rtol=1e-8, atol=1e-9 * np.abs(summed).max())
    if method in ("if-explicit", "ekfac", "datainf"):  # singleton = per-point brute force
        G = per_example_gradients(task, train.X, train.y)
        pre = single.precondition(prop.gradients(task))
        assert np.allclose(per_point, (pre @ G.T).numpy(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["if-explicit", "if-cg", "ekfac", "datainf"])
def test_scores_do_not_depend_on_chunk_sizes(small_mlp, method):
    task, train, prop = small_mlp
    opts = dict(FAST_OPTIONS[method])
    if method != "datainf":
        opts["damping"] = 5e-2
    grouping = random_grouping(len(train), 30, seed=2)
    a = make_method(method, task, **opts).cache(train, grouping).attribute(prop)
    small = {"chunk_size": 7, "max_batch": 8, "memory_mb": 1e-3}
    if method == "if-explicit":
        small["block_size"] = 100
    b = make_method(method, task, **opts, **small).cache(train, grouping).attribute(prop)
    assert np.allclose(a, b, rtol=1e-7, atol=1e-9 * np.abs(a).max())


def test_default_damping_floors_the_spectrum(small_mlp):
    """Default λ = max(0, 0.01·λ_max(H + wd·I) − wd): weight decay counts towards the floor."""
    task, train, prop = small_mlp
    H = TrainingCurvature(task, train.X, train.y, "gn", 0.0).dense()
    top = float(torch.linalg.eigvalsh(H)[-1])
    for wd in (0.0, 1e-4, 1.0):
        m = make_method("if-cg", task, weight_decay=wd).cache(train)
        assert m.info["lambda_max"] == pytest.approx(top + wd, rel=1e-3)  # power iteration
        assert m.lambda_ == pytest.approx(relative_damping(m.info["lambda_max"], wd), rel=1e-12)
        assert m.lambda_ == pytest.approx(
            max(0.0, DEFAULT_DAMPING_REL * (top + wd) - wd), rel=1e-3, abs=1e-15
        )
    # the other solvers read λ_max from their own work: Ritz values, EK-FAC's eigenvalues
    p = task.n_params
    arn = make_method("if-arnoldi", task, rank=p, iterations=p).cache(train)
    assert arn.info["lambda_max"] == pytest.approx(top, rel=1e-8)
    assert make_method("ekfac", task).cache(train).lambda_ > 0
    lissa = make_method("if-lissa", task).cache(train)
    assert lissa.scale_ == pytest.approx(2 * lissa.info["lambda_max"] + lissa.lambda_)


def test_damping_scale_is_the_mean_squared_gradient_rule(small_mlp):
    task, train, prop = small_mlp
    G = per_example_gradients(task, train.X, train.y)
    lam0 = float((G**2).mean())
    assert np.isclose(base_damping(task, train.X, train.y), lam0, rtol=1e-10)  # from layer factors
    # from materialised per-example gradients
    assert np.isclose(base_damping(task.generic(), train.X, train.y), lam0, rtol=1e-10)
    m = make_method("if-cg", task, damping_scale=100.0).cache(train)
    assert np.isclose(m.lambda_, 100.0 * lam0, rtol=1e-10)
    m2 = make_method("if-cg", task, damping_scale=3.0, damping_samples=50).cache(train)
    assert 0.2 * 3 * lam0 < m2.lambda_ < 5 * 3 * lam0 and m2.info["lambda0"] != lam0
    # the subsample is chosen by id: the same examples however the rows are ordered
    perm = np.random.default_rng(0).permutation(len(train))
    m3 = make_method("if-cg", task, damping_scale=3.0, damping_samples=50).cache(train.subset(perm))
    assert m3.info["lambda0"] == pytest.approx(m2.info["lambda0"], rel=1e-12)


def test_mean_aggregate_and_model_level_property(small_mlp):
    task, train, prop = small_mlp
    grouping = random_grouping(len(train), 10, seed=3)
    total = make_method("if-explicit", task, damping=1e-2).cache(train, grouping)
    mean = make_method("if-explicit", task, damping=1e-2, aggregate="mean").cache(train, grouping)
    assert np.allclose(mean.attribute(prop), total.attribute(prop) / grouping.sizes)
    ml = MeanLoss(prop.X, prop.y)
    assert np.allclose(total.attribute(ml)[0], total.attribute(prop).mean(0))


def test_explicit_refuses_large_models(trained_mlp):
    task = AttributionTask(trained_mlp)
    with pytest.raises(GGDAError, match="if-cg") as err:
        make_method("if-explicit", task, max_params=1000)
    assert "\n" not in str(err.value)


def test_lissa_with_too_small_scale_raises(small_mlp):
    task, train, prop = small_mlp
    m = make_method("if-lissa", task, damping=1e-3, scale=1e-3, depth=200, batch_size=None).cache(train)
    with pytest.raises(GGDAError, match="scale"):
        m.attribute(prop)


def test_cg_warns_when_not_converged_and_rejects_bad_options(small_mlp):
    task, train, prop = small_mlp
    m = make_method("if-cg", task, damping=1e-6, max_iter=2).cache(train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.attribute(prop)
    assert any("max_iter" in str(w.message) for w in caught)
    with pytest.raises(GGDAError, match="hessian"):
        make_method("if-cg", task, hessian="fisher")
    with pytest.raises(GGDAError, match="damping"):
        make_method("if-cg", task, damping=-1.0)


def test_registered_names():
    import ggda.methods  # noqa: F401

    for name in ["if-explicit", "if-cg", "if-lissa", "if-arnoldi", "ekfac", "datainf"]:
        assert name in METHODS
