"""if-cg with preconditioners: the same answer as the dense solve whatever the preconditioner,
the relative-residual stopping rule, fewer products with a preconditioner, group = sum, and
one-line errors for bad option values."""

import numpy as np
import pytest
import torch

from ggda.errors import GGDAError
from ggda.groups import random_grouping
from ggda.methods import make_method
from ggda.models import TrainConfig, train_model
from ggda.options import check_method
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask

PRECONDITIONERS = ["none", "kfac", "ekfac", "arnoldi"]
LAM = 1e-2


def _trained(small_digits, hidden: int | None):
    train, test = small_digits
    train = train.subset(np.arange(150))
    torch.manual_seed(0)
    layers = (
        [torch.nn.Linear(64, 10)]
        if hidden is None
        else [
            torch.nn.Linear(64, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, 10),
        ]
    )
    model = torch.nn.Sequential(*layers)
    train_model(model, train, TrainConfig(epochs=10, lr=0.1, batch_size=32))
    return AttributionTask(model.double()), train, ExampleLoss(test.X[:6], test.y[:6])


@pytest.fixture(scope="module")
def logreg(small_digits):
    return _trained(small_digits, None)


@pytest.fixture(scope="module")
def mlp(small_digits):
    return _trained(small_digits, 8)


def dense_solution(task, train, prop) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(H + λI)⁻¹ B inverted by hand from the dense exact mean Hessian (torch.func.hessian of the
    mean loss), the damped matrix and λ: LAM, plus 1.5 |λ_min| where H is indefinite (the MLP)."""
    theta = task.flatten(task.params())
    names = list(task.params())
    shapes = [v.shape for v in task.params().values()]
    X, y = task.to_tensor(train.X, train.y)

    def unflat(t):
        out, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            k = int(np.prod(shape))
            out[name] = t[i : i + k].reshape(shape)
            i += k
        return out

    def mean_loss(t):
        return task.loss_fn(task.forward(unflat(t), X), y).mean()

    H = torch.func.hessian(mean_loss)(theta)
    lam = LAM + 1.5 * max(0.0, -float(torch.linalg.eigvalsh(H).min()))
    B = prop.gradients(task)
    A = H + lam * torch.eye(len(theta), dtype=H.dtype)
    return torch.linalg.solve(A, B.T).T, A, lam


@pytest.mark.parametrize("which", ["logreg", "mlp"])
@pytest.mark.parametrize("preconditioner", PRECONDITIONERS)
def test_pcg_matches_the_dense_solve_and_if_explicit(request, which, preconditioner):
    task, train, prop = request.getfixturevalue(which)
    X_ref, _, lam = dense_solution(task, train, prop)
    m = make_method(
        "if-cg", task, damping=lam, hessian="exact", tol=1e-11, max_iter=2000, preconditioner=preconditioner
    ).cache(train)
    X = m.precondition(prop.gradients(task)) * len(train)
    assert torch.allclose(X, X_ref, rtol=1e-7, atol=1e-8 * float(X_ref.abs().max()))
    explicit = make_method("if-explicit", task, damping=lam, hessian="exact").cache(train).attribute(prop)
    scores = m.attribute(prop)
    assert np.allclose(scores, explicit, rtol=1e-6, atol=1e-8 * np.abs(explicit).max())
    assert m.info["preconditioner"] == preconditioner


@pytest.mark.parametrize("which", ["logreg", "mlp"])
def test_stopping_rule_and_fewer_products_with_a_preconditioner(request, which):
    task, train, prop = request.getfixturevalue(which)
    X_ref, A, lam = dense_solution(task, train, prop)
    B = prop.gradients(task)
    tol = 1e-4
    infos = {}
    for pc in PRECONDITIONERS:
        m = make_method(
            "if-cg", task, damping=lam, hessian="exact", tol=tol, max_iter=2000, preconditioner=pc
        ).cache(train)
        before = m.curvature.product_count
        X = m.precondition(B) * len(train)
        residual = (B - X @ A.T).norm(dim=1) / B.norm(dim=1)  # by hand, from the dense matrix
        assert bool((residual <= tol).all()), (pc, residual)
        assert m.info["cg_max_residual"] <= tol
        assert m.info["cg_products"] == m.curvature.product_count - before  # the count is the cost
        # the answer does not depend on the preconditioner beyond the tolerance (error ≤ κ·tol)
        cond = float(torch.linalg.cond(A))
        assert float((X - X_ref).norm() / X_ref.norm()) <= cond * tol
        infos[pc] = m.info
    iterations = {pc: info["cg_iterations"] for pc, info in infos.items()}
    # Ritz pairs of H itself remove the outlying eigenvalues CG spends its iterations on (the
    # Kronecker factors approximate a softmax Hessian too coarsely to help much here: they are
    # exact only for least squares, next test)
    assert iterations["arnoldi"] < iterations["none"], iterations


def test_ekfac_preconditioner_is_exact_for_least_squares():
    """For one Linear layer with squared error, EK-FAC *is* the Gauss–Newton matrix (= H), so
    PCG is preconditioned by the exact inverse and needs one iteration per target."""
    from ggda.data.dataset import Dataset

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 6)) * np.array([1.0, 3.0, 0.3, 1.0, 2.0, 0.5])
    train = Dataset(X, X @ rng.normal(size=6) + rng.normal(size=80), kind="regression")
    model = torch.nn.Linear(6, 1).double()
    task = AttributionTask(model, loss="regression")
    prop = ExampleLoss(X[:4], rng.normal(size=4))
    opts = {"damping": 1e-3, "tol": 1e-10, "max_iter": 500}
    plain = make_method("if-cg", task, preconditioner="none", **opts).cache(train)
    exact = make_method("if-cg", task, preconditioner="ekfac", **opts).cache(train)
    assert np.allclose(exact.attribute(prop), plain.attribute(prop), rtol=1e-8)
    assert exact.info["cg_iterations"] == 1 < plain.info["cg_iterations"]


@pytest.mark.parametrize("which", ["logreg", "mlp"])
@pytest.mark.parametrize("block", [1, 10])
def test_full_rank_arnoldi_preconditioner_is_the_exact_damped_inverse(request, which, block):
    """With all p Ritz pairs (products spanning the space, one or ``block`` vectors at a time) the
    Arnoldi preconditioner is (H + wd·I + λI)⁻¹ itself, weight decay counted once: PCG converges
    in one iteration to the dense solve. The fit makes at most p products: it stops once the
    Krylov space is invariant (softmax's null space is one eigenvalue, wd, of multiplicity ≥ 65,
    which the rest-of-spectrum floor then covers exactly)."""
    task, train, prop = request.getfixturevalue(which)
    p, wd = task.n_params, 0.05
    m = make_method(
        "if-cg",
        task,
        damping=LAM,
        weight_decay=wd,
        hessian="gn",
        tol=1e-10,
        max_iter=50,
        preconditioner="arnoldi",
        preconditioner_iterations=p,
        preconditioner_rank=p,
        preconditioner_block=block,
    ).cache(train)
    B = prop.gradients(task)
    X = m.precondition(B) * len(train)
    A = m.curvature.dense() + LAM * torch.eye(p, dtype=B.dtype)  # dense() includes wd·I
    assert torch.allclose(X, torch.linalg.solve(A, B.T).T, rtol=1e-7, atol=1e-9 * float(X.abs().max()))
    assert m.info["cg_iterations"] == 1
    assert 0 < m.info["preconditioner_products"] <= p


def test_block_arnoldi_preconditioner_counts_its_products(mlp):
    """The default fit: ``preconditioner_iterations`` products in blocks of ``preconditioner_block``,
    all counted; the CG products are one per target per iteration plus the final check."""
    task, train, prop = mlp
    m = make_method(
        "if-cg", task, damping=LAM, tol=1e-6, max_iter=500, solver="cg", preconditioner="arnoldi"
    ).cache(train)
    assert (m.preconditioner_iterations, m.preconditioner_block) == (48, 8)
    assert m.info["preconditioner_products"] == 48 == m.curvature.product_count
    m.precondition(prop.gradients(task))
    assert m.info["curvature_products"] == 48 + m.info["cg_products"]
    assert m.info["cg_products"] >= len(prop.gradients(task)) * (m.info["cg_iterations"] + 1) - 5 * 6


def test_auto_preconditioner_fits_arnoldi_only_for_enough_targets(mlp):
    """``auto`` with per-target CG: a one-target solve runs plain CG (no setup products, the same
    products as ``none``); the first solve with AUTO_MIN_TARGETS targets fits the Arnoldi
    preconditioner once (same products and answer as ``arnoldi``), and later solves reuse it."""
    from ggda.methods.influence import AUTO_MIN_TARGETS

    task, train, prop = mlp
    B = prop.gradients(task)
    assert len(B) >= AUTO_MIN_TARGETS > 1
    opts = {"damping": LAM, "tol": 1e-9, "max_iter": 2000, "solver": "cg"}
    auto = make_method("if-cg", task, **opts).cache(train)
    assert auto.preconditioner == "auto" and auto.curvature.product_count == 0
    plain = make_method("if-cg", task, preconditioner="none", **opts).cache(train)
    one = auto.precondition(B[:1])
    assert auto.info["preconditioner_used"] == "none" and auto.info["preconditioner_products"] == 0
    assert torch.equal(one, plain.precondition(B[:1]))
    assert auto.info["cg_products"] == plain.info["cg_products"]
    arnoldi = make_method("if-cg", task, preconditioner="arnoldi", **opts).cache(train)
    many = auto.precondition(B)
    assert auto.info["preconditioner_used"] == "arnoldi" and auto.info["preconditioner_products"] == 48
    assert torch.allclose(many, arnoldi.precondition(B), rtol=1e-6, atol=1e-9 * float(many.abs().max()))
    assert auto.info["cg_products"] == arnoldi.info["cg_products"]
    auto.precondition(B[:1])  # kept: no second fit, and a one-target solve now uses it too
    assert auto.info["preconditioner_used"] == "arnoldi" and auto.info["preconditioner_products"] == 48


@pytest.mark.parametrize("which", ["logreg", "mlp"])
def test_block_solver_matches_the_dense_solve_with_repeated_targets(request, which):
    """Block CG (the default for several targets) on the exact Hessian — indefinite for the MLP,
    shifted positive definite by λ — matches the dense damped inverse to ``tol`` for every target,
    also when targets repeat (a rank-deficient right-hand side block), with fewer products than
    one plain CG per target; its products are all counted and it records the solver it ran."""
    task, train, prop = request.getfixturevalue(which)
    B = prop.gradients(task)
    B = torch.cat([B, B[:2]])  # two repeated targets
    X_ref, A, lam = dense_solution(task, train, prop)
    X_ref = torch.cat([X_ref, X_ref[:2]])
    tol = 1e-8
    opts = {"damping": lam, "hessian": "exact", "tol": tol, "max_iter": 2000}
    block = make_method("if-cg", task, **opts).cache(train)
    before = block.curvature.product_count
    X = block.precondition(B) * len(train)
    assert block.info["solver_used"] == "block" and block.info["preconditioner_used"] == "none"
    residual = (B - X @ A.T).norm(dim=1) / B.norm(dim=1)  # by hand, from the dense matrix
    assert bool((residual <= 1.01 * tol).all()), residual
    cond = float(torch.linalg.cond(A))
    assert float((X - X_ref).norm() / X_ref.norm()) <= cond * tol
    assert torch.allclose(X[-2:], X[:2], rtol=1e-6, atol=1e-9 * float(X.abs().max()))
    assert block.info["cg_products"] == block.curvature.product_count - before
    # the repeated targets add no direction: at most the distinct targets per iteration
    assert block.info["cg_products"] <= (len(B) - 2) * block.info["cg_iterations"]
    cg = make_method("if-cg", task, solver="cg", preconditioner="none", **opts).cache(train)
    cg.precondition(B)
    assert block.info["cg_products"] < cg.info["cg_products"]


def test_auto_solver_is_block_from_two_targets(mlp):
    """``solver="auto"``: one target runs per-target CG (the same products as ``solver="cg"``), two
    or more run block CG (the same products and answer as ``solver="block"``)."""
    from ggda.methods.influence import AUTO_BLOCK_TARGETS

    task, train, prop = mlp
    B = prop.gradients(task)
    assert AUTO_BLOCK_TARGETS == 2 <= len(B)
    opts = {"damping": LAM, "tol": 1e-9, "max_iter": 2000, "preconditioner": "none"}
    auto = make_method("if-cg", task, **opts).cache(train)
    cg = make_method("if-cg", task, solver="cg", **opts).cache(train)
    assert torch.equal(auto.precondition(B[:1]), cg.precondition(B[:1]))
    assert auto.info["solver_used"] == "cg" and auto.info["cg_products"] == cg.info["cg_products"]
    block = make_method("if-cg", task, solver="block", **opts).cache(train)
    assert torch.equal(auto.precondition(B), block.precondition(B))
    assert auto.info["solver_used"] == "block" and auto.info["cg_products"] == block.info["cg_products"]


def test_group_score_is_the_sum_of_member_scores_with_pcg(mlp):
    task, train, prop = mlp
    grouping = random_grouping(len(train), 12, seed=0)
    opts = {"damping": LAM, "tol": 1e-11, "max_iter": 2000, "preconditioner": "ekfac"}
    point = make_method("if-cg", task, **opts).cache(train).attribute(prop)
    group = make_method("if-cg", task, **opts).cache(train, grouping).attribute(prop)
    summed = np.stack([point[:, grouping.labels == k].sum(1) for k in range(grouping.n_groups)], 1)
    assert np.allclose(group, summed, rtol=1e-8, atol=1e-10 * np.abs(summed).max())


def test_warm_start_gives_the_same_answer(mlp):
    task, train, prop = mlp
    opts = {"damping": LAM, "tol": 1e-11, "max_iter": 2000, "preconditioner": "none"}
    cold = make_method("if-cg", task, **opts).cache(train).attribute(prop)
    warm = make_method("if-cg", task, warm_start=2, **opts).cache(train)
    assert np.allclose(warm.attribute(prop), cold, rtol=1e-7, atol=1e-9 * np.abs(cold).max())
    assert warm.info["cg_max_residual"] <= 1e-11


@pytest.mark.parametrize(
    "options, words",
    [
        ({"preconditioner": "jacobi"}, ["preconditioner", "ekfac", "arnoldi"]),
        ({"solver": "gmres"}, ["solver", "block", "cg"]),
        ({"warm_start": -1}, ["warm_start", ">= 0"]),
        ({"tol": 0}, ["tol"]),
        ({"preconditioner_rank": 0}, ["preconditioner_rank"]),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_fix(logreg, options, words):
    task, _, _ = logreg
    for build in (lambda: make_method("if-cg", task, **options), lambda: check_method("if-cg", options)):
        with pytest.raises(GGDAError) as err:
            build()
        message = str(err.value)
        assert "\n" not in message and all(w in message for w in words), message
