import numpy as np
import pytest
import torch

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.gradients import per_example_gradients
from ggda.groups import Grouping, random_grouping
from ggda.methods import make_method
from ggda.methods.trak import RIDGE_REL, TRAK, margin_output
from ggda.models import TrainConfig, build_model, train_model
from ggda.properties import CallableProperty, ExampleLoss, Margin, MeanLoss
from ggda.task import AttributionTask


@pytest.fixture(scope="module")
def logreg(small_digits):
    train, test = small_digits
    model = build_model("logreg", train.n_features, train.n_outputs, seed=0)
    train_model(model, train, TrainConfig(epochs=10, lr=0.05, batch_size=32))
    return AttributionTask(model), train.subset(np.arange(120)), test.subset(np.arange(6))


def loop_margin_grads(model: torch.nn.Module, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example margin gradients by plain autograd, one example at a time (independent of torch.func)."""
    rows = []
    for x, label in zip(X, y, strict=True):
        model.zero_grad()
        out = model(torch.as_tensor(x[None]))[0]
        others = torch.cat([out[:label], out[label + 1 :]])
        (out[label] - torch.logsumexp(others, 0)).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy())
    return np.stack(rows)


def correct_prob(model, X, y) -> np.ndarray:
    with torch.no_grad():
        p = torch.softmax(model(torch.as_tensor(X)).double(), 1)
    return p[np.arange(len(y)), y].numpy()


def closed_form(psi, Phi, q, ridge):
    A = Phi.T @ Phi + ridge * np.eye(Phi.shape[1])
    return psi @ np.linalg.solve(A, Phi.T) * q[None, :]


@pytest.mark.parametrize(("residual", "solver"), [("sum", "primal"), ("mean", "dual")])
def test_identity_trak_equals_closed_form_on_logistic_regression(logreg, residual, solver):
    """P = I: τ = ψ(z)ᵀ(ΦᵀΦ + λI)⁻¹ φ_j q_j, with Φ, q and ψ computed by hand — per point and for groups."""
    task, train, test = logreg
    G = loop_margin_grads(task.model, train.X, train.y)
    psi = loop_margin_grads(task.model, test.X, test.y)
    q = 1 - correct_prob(task.model, train.X, train.y)
    ridge = 0.05
    prop = ExampleLoss(test.X, test.y)
    trak = TRAK(task, projection="identity", ridge=ridge, solver=solver).cache(train)
    assert trak.members[0].dual == (solver == "dual")
    scores = trak.attribute(prop)
    ref = closed_form(psi, G, q, ridge)
    assert scores.shape == (len(test), len(train))
    assert np.abs(scores - ref).max() < 1e-4 * np.abs(ref).max()

    grouping = random_grouping(len(train), 13, seed=1)
    onehot = np.eye(grouping.n_groups)[grouping.labels]  # (n, K)
    Phi = onehot.T @ G
    qg = onehot.T @ q
    if residual == "mean":
        qg = qg / grouping.sizes
    grouped = TRAK(task, projection="identity", ridge=ridge, residual=residual, solver=solver)
    grouped.cache(train, grouping)
    ref = closed_form(psi, Phi, qg, ridge)
    assert np.abs(grouped.attribute(prop) - ref).max() < 1e-4 * np.abs(ref).max()


def test_random_projection_trak_matches_definition(setup_mlp):
    """Gaussian P with chunked projection inside TRAK == the definition with the materialised P."""
    task, train, prop = setup_mlp
    grouping = random_grouping(len(train), 40, seed=3)
    trak = TRAK(task, proj_dim=128, seed=7).cache(train, grouping)
    P = trak.members[0].projector.matrix().double().numpy()
    G = per_example_gradients(task, train.X, train.y, fn=margin_output).double().numpy()
    onehot = np.eye(grouping.n_groups)[grouping.labels]
    Phi = onehot.T @ G @ P
    q = onehot.T @ (1 - correct_prob(task.model, train.X, train.y))
    psi = per_example_gradients(task, prop.X, prop.y, fn=margin_output).double().numpy() @ P
    ridge = RIDGE_REL * np.trace(Phi.T @ Phi) / 40  # / min(K, k): K = 40 groups < k = 128
    assert np.isclose(trak.members[0].ridge, ridge, rtol=1e-4)
    ref = closed_form(psi, Phi, q, ridge)
    assert np.abs(trak.attribute(prop) - ref).max() < 1e-3 * np.abs(ref).max()


@pytest.fixture(scope="module")
def setup_mlp(small_digits, trained_mlp):
    train, test = small_digits
    return AttributionTask(trained_mlp), train, ExampleLoss(test.X[:8], test.y[:8])


def test_primal_and_dual_solvers_agree(setup_mlp):
    """(ΦᵀΦ + λI)⁻¹Φᵀ = Φᵀ(ΦΦᵀ + λI)⁻¹: both forms, with K < k and K > k."""
    task, train, prop = setup_mlp
    for K, k in ((40, 256), (300, 64)):
        grouping = random_grouping(len(train), K, seed=1)
        out = {}
        for solver in ("primal", "dual"):
            out[solver] = TRAK(task, proj_dim=k, solver=solver).cache(train, grouping).attribute(prop)
        auto = TRAK(task, proj_dim=k).cache(train, grouping)
        assert auto.members[0].dual == (K < k)
        ref = out["primal"]
        assert np.allclose(out["dual"], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_singleton_groups_equal_per_point(setup_mlp):
    task, train, prop = setup_mlp
    per_point = TRAK(task, proj_dim=256).cache(train).attribute(prop)
    perm = np.random.default_rng(0).permutation(len(train))
    shuffled = TRAK(task, proj_dim=256).cache(train, Grouping(perm)).attribute(prop)
    assert np.allclose(shuffled[:, perm], per_point, rtol=1e-4, atol=1e-5 * np.abs(per_point).max())


def test_scores_do_not_depend_on_batch_or_chunk_sizes(setup_mlp):
    task, train, prop = setup_mlp
    labels = np.r_[np.arange(200) % 50, np.full(100, 50)]  # 50 groups of 4 and one of 100 points
    grouping = Grouping(labels)
    ref = TRAK(task, proj_dim=256, per_layer=True).cache(train, grouping).attribute(prop)
    small = TRAK(task, proj_dim=256, per_layer=True, max_batch=16, memory_mb=0.2, cache_mb=0)
    out = small.cache(train, grouping).attribute(prop)
    assert np.allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_scores_do_not_depend_on_how_the_rademacher_projection_is_kept(setup_mlp):
    """The dense Rademacher P kept whole, kept as its random words only (cache_mb between p·k/8
    and p·k·4 bytes) or regenerated on every pass: the same P, so the same scores (float32
    summation order aside), per point and for groups."""
    task, train, prop = setup_mlp
    p, k = task.n_params, 256
    words_mb = 2 * p * k / 8 / 2**20  # twice the words, far below P itself
    for grouping in (Grouping.singleton(len(train)), random_grouping(len(train), 20, seed=0)):
        runs = {}
        for name, cache_mb in (("whole", 512.0), ("words", words_mb), ("none", 0.0)):
            trak = TRAK(task, proj_dim=k, projection="rademacher", cache_mb=cache_mb, agreement=False)
            runs[name] = trak.cache(train, grouping).attribute(prop)
            proj = trak.members[0].projector
            assert proj._cacheable == (name == "whole") and proj._words_cacheable == (name == "words")
        ref = runs["whole"]
        for name in ("words", "none"):
            assert np.allclose(runs[name], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max()), name


def test_ensemble_is_mean_of_single_model_scores(setup_mlp, small_digits, tmp_path):
    task, train, prop = setup_mlp
    other = build_model("mlp-s", train.n_features, train.n_outputs, seed=1)
    res = train_model(
        other, train, TrainConfig(epochs=3, lr=0.05, seed=1, checkpoint_every=1), checkpoint_dir=tmp_path
    )
    models = [task.model, other]
    both = TRAK(task, proj_dim=128, models=models).cache(train).attribute(prop)
    singles = [TRAK(task, proj_dim=128, models=[m]).cache(train).attribute(prop) for m in models]
    assert np.allclose(both, np.mean(singles, axis=0), rtol=1e-5, atol=1e-7)
    # member_seeds: member m has its own P (seed + m), as in the TRAK paper's Algorithm 1
    own = TRAK(task, proj_dim=128, models=models, member_seeds=True).cache(train).attribute(prop)
    singles = [
        TRAK(task, proj_dim=128, models=[m], seed=i).cache(train).attribute(prop)
        for i, m in enumerate(models)
    ]
    assert np.allclose(own, np.mean(singles, axis=0), rtol=1e-5, atol=1e-7)
    # TRAK paper's averaging: mean un-weighted scores times mean residual weights
    trak = TRAK(task, proj_dim=128, models=models, average="trak").cache(train)
    U = [trak.unweighted_scores(m, prop).numpy() for m in trak.members]
    q = np.mean([m.residual for m in trak.members], axis=0)
    assert np.allclose(trak.attribute(prop), np.mean(U, axis=0) * q, rtol=1e-6)
    # checkpoints: Checkpoint objects (CLI) == model files; the last N only; "final" ignores them
    ck = TRAK(task, proj_dim=64, checkpoints=res.checkpoints, ensemble="checkpoints").cache(train)
    files = TRAK(task, proj_dim=64, models=[c.path for c in res.checkpoints]).cache(train)
    assert len(ck.members) == 3 and np.allclose(ck.attribute(prop), files.attribute(prop), rtol=1e-6)
    last = TRAK(task, proj_dim=64, checkpoints=res.checkpoints, ensemble="checkpoints", n_checkpoints=1)
    final_other = TRAK(task, proj_dim=64, models=[other]).cache(train).attribute(prop)
    assert np.allclose(last.cache(train).attribute(prop), final_other, rtol=1e-5)
    final = TRAK(task, proj_dim=64, checkpoints=res.checkpoints, ensemble="final").cache(train)
    assert len(final.members) == 1 and final.members[0].task is task


# -- ensembles: one shared projection, one interleaved pass ------------------------------------


@pytest.fixture(scope="module")
def three_models(small_digits, trained_mlp):
    """The trained MLP and two more of the same architecture (other seeds, a few epochs)."""
    train, _ = small_digits
    models = [trained_mlp]
    for seed in (1, 2):
        m = build_model("mlp-s", train.n_features, train.n_outputs, seed=seed)
        train_model(m, train, TrainConfig(epochs=3, lr=0.05, seed=seed))
        models.append(m.eval())
    return models


def test_ensemble_of_identical_models_equals_the_single_model(setup_mlp):
    """One shared P: M copies of one model give M identical members, so the mean is that model's
    score (with per-member seeds it would not be: each copy would see another projection)."""
    task, train, prop = setup_mlp
    grouping = random_grouping(len(train), 40, seed=3)
    single = TRAK(task, proj_dim=96, ensemble="final").cache(train, grouping)
    copies = TRAK(task, proj_dim=96, models=[task.model] * 4, ensemble="models").cache(train, grouping)
    np.testing.assert_allclose(copies.attribute(prop), single.attribute(prop), rtol=1e-5, atol=1e-9)
    assert len({id(m.projector) for m in copies.members}) == 1  # one P, generated once
    assert copies.info["proj_seeds"] == [0, 0, 0, 0]
    own = TRAK(task, proj_dim=96, models=[task.model] * 4, ensemble="models", member_seeds=True)
    own.cache(train, grouping)
    assert own.info["proj_seeds"] == [0, 1, 2, 3]
    assert not np.allclose(own.attribute(prop), single.attribute(prop), rtol=1e-3)


@pytest.mark.parametrize(
    "member_seeds, units, path",
    [(False, "groups", None), (True, "groups", None), (True, "points", None), (False, "points", "0.weight")],
)
def test_ensemble_equals_mean_of_separate_single_model_runs(
    setup_mlp, three_models, member_seeds, units, path
):
    """The ensemble's features equal each model's own run with the same projection seed, for
    groups and points and both averages: the interleaved one-pass features (many stage flushes:
    tiny memory budget, a group taller than the stage) and, per point with a shared P, the shared
    input-layer projection (x_iᵀP_o once for all members; ``info["shared_input_layer"]``)."""
    task, train, prop = setup_mlp
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 60, len(train))
    labels[:90] = 60  # one large group
    grouping = Grouping(labels) if units == "groups" else None
    opts = dict(proj_dim=64, memory_mb=0.5, max_batch=64, member_seeds=member_seeds)
    ens = TRAK(task, models=three_models, ensemble="models", **opts).cache(train, grouping)
    assert ens.info["shared_input_layer"] == path
    singles = [
        TRAK(task, models=[m], ensemble="models", seed=i if member_seeds else 0, **opts).cache(
            train, grouping
        )
        for i, m in enumerate(three_models)
    ]
    for member, single in zip(ens.members, singles, strict=True):
        ref = single.members[0].features  # float32, summed in other blocks: relative tolerance
        torch.testing.assert_close(member.features, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
        np.testing.assert_allclose(member.residual, single.members[0].residual, rtol=1e-5)
    mean = np.mean([s.attribute(prop) for s in singles], axis=0)
    np.testing.assert_allclose(ens.attribute(prop), mean, rtol=1e-3, atol=1e-4 * np.abs(mean).max())
    ens_trak = TRAK(task, models=three_models, ensemble="models", average="trak", **opts).cache(
        train, grouping
    )
    U = np.mean([s.unweighted_scores(s.members[0], prop).numpy() for s in singles], axis=0)
    q = np.mean([s.members[0].residual for s in singles], axis=0)
    np.testing.assert_allclose(ens_trak.attribute(prop), U * q, rtol=1e-3, atol=1e-4 * np.abs(U * q).max())


def test_ensemble_group_features_are_sums_of_member_point_features(setup_mlp, three_models):
    """Per member, the shared P is linear: φ_S(θ_m) = Σ_{i∈S} φ_i(θ_m), for every member of the
    one-pass ensemble (features of a grouping vs the per-point features of the same ensemble)."""
    task, train, _ = setup_mlp
    grouping = random_grouping(len(train), 25, seed=5)
    opts = dict(proj_dim=48, models=three_models, ensemble="models", memory_mb=1.0)
    groups = TRAK(task, **opts).cache(train, grouping)
    points = TRAK(task, **opts).cache(train)
    onehot = torch.zeros(grouping.n_groups, len(train), dtype=torch.float64)
    onehot[torch.as_tensor(grouping.labels), torch.arange(len(train))] = 1.0
    for g, pt in zip(groups.members, points.members, strict=True):
        summed = onehot @ pt.features.double()
        torch.testing.assert_close(
            g.features.double(), summed, rtol=1e-4, atol=1e-5 * float(summed.abs().max())
        )


def test_shared_projection_needs_members_of_one_size(setup_mlp, small_digits):
    """A shared P maps one parameter count: members of another size are refused in one line that
    names member_seeds; with member_seeds each gets its own P and the ensemble runs."""
    task, train, prop = setup_mlp
    wider = build_model("mlp-m", train.n_features, train.n_outputs, seed=0)
    with pytest.raises(GGDAError, match="member_seeds") as err:
        TRAK(task, proj_dim=32, models=[task.model, wider]).cache(train)
    assert "\n" not in str(err.value)
    mixed = TRAK(task, proj_dim=32, models=[task.model, wider], member_seeds=True).cache(train)
    alone = TRAK(task, proj_dim=32, models=[wider], seed=1).cache(train)
    np.testing.assert_allclose(
        mixed.members[1].features.numpy(), alone.members[0].features.numpy(), rtol=1e-5
    )
    assert mixed.attribute(prop).shape == (8, len(train))
    with pytest.raises(GGDAError, match="member_seeds"):
        make_method("trak", task, member_seeds="maybe")


def test_target_modes(setup_mlp):
    """CE = softplus(−margin) exactly, so the property-gradient target is the margin target scaled
    by (1 − p_z) per test point; MeanLoss is the mean of per-example property-mode rows."""
    task, train, prop = setup_mlp
    grouping = random_grouping(len(train), 30, seed=0)
    trak = TRAK(task, proj_dim=256).cache(train, grouping)
    assert trak.target_mode(prop) == "output" and trak.target_mode(MeanLoss(prop.X, prop.y)) == "property"
    out = trak.attribute(prop)
    assert np.allclose(trak.attribute(Margin(prop.X, prop.y)), out)
    trak.target = "property"
    via_property = trak.attribute(prop)
    w = 1 - correct_prob(task.model, prop.X, prop.y)
    assert np.allclose(via_property, out * w[:, None], rtol=1e-4, atol=1e-6 * np.abs(out).max())
    trak.target = "auto"
    mean = trak.attribute(MeanLoss(prop.X, prop.y))
    assert mean.shape == (1, 30)
    assert np.allclose(mean[0], via_property.mean(0), rtol=1e-4, atol=1e-6 * np.abs(mean).max())
    custom = CallableProperty(
        lambda fwd: torch.nn.functional.cross_entropy(fwd(prop.X), torch.as_tensor(prop.y), reduction="none")
    )
    assert np.allclose(trak.attribute(custom), via_property, rtol=1e-4, atol=1e-6 * np.abs(out).max())


def test_regression_trak_tracks_exact_leave_one_out():
    """Linear least squares, P = I, λ ≈ 0: TRAK is the Newton LOO estimate without the leverage
    factor; against exact refits its per-point changes of the test loss agree in sign and scale."""
    rng = np.random.default_rng(0)
    n, d = 60, 4
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (X @ rng.normal(size=d) + 0.5 * rng.normal(size=n)).astype(np.float32)
    x_t, y_t = rng.normal(size=(1, d)).astype(np.float32), np.array([0.3], dtype=np.float32)

    def fit(rows):
        A = np.c_[X[rows], np.ones(len(rows))].astype(np.float64)
        return np.linalg.lstsq(A, y[rows].astype(np.float64), rcond=None)[0]

    def test_loss(w):
        return 0.5 * (x_t[0] @ w[:d] + w[d] - y_t[0]) ** 2

    w = fit(np.arange(n))
    model = torch.nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(w[:d])[None])
        model.bias.fill_(w[d])
    task = AttributionTask(model, loss="regression")
    train = Dataset(X, y, kind="regression")
    scores = TRAK(task, projection="identity", ridge=1e-10).cache(train).attribute(ExampleLoss(x_t, y_t))[0]
    exact = np.array([test_loss(fit(np.delete(np.arange(n), i))) for i in range(n)]) - test_loss(w)
    assert np.corrcoef(scores, exact)[0, 1] > 0.95
    assert np.mean(np.sign(scores) == np.sign(exact)) > 0.9
    assert 0.5 < np.median(np.abs(scores) / np.abs(exact)) < 1.5


def test_errors(setup_mlp, small_digits):
    task, train, prop = setup_mlp
    with pytest.raises(GGDAError, match="projection"):
        TRAK(task, projection="sparse")
    with pytest.raises(GGDAError, match="checkpoints"):
        TRAK(task, ensemble="checkpoints")
    with pytest.raises(GGDAError, match="max_dim"):
        TRAK(task, projection="identity", solver="primal").cache(train)
    with pytest.raises(GGDAError, match="max_dim"):
        TRAK(task, proj_dim=64, solver="dual", max_dim=100).cache(train)
    with pytest.raises(GGDAError, match="output"):
        TRAK(AttributionTask(task.model, loss=lambda out, y: (out**2).sum(1)))
    with pytest.raises(GGDAError, match="cache"):
        TRAK(task).attribute(prop)
    assert isinstance(make_method("trak", task, proj_dim=32), TRAK)


@pytest.mark.slow
def test_trak_correlates_with_leave_group_out_retraining(small_digits, trained_mlp):
    """Ground truth by retraining: remove each of 30 groups (class × random third), retrain with
    the same seed and batches (weight 0), measure each test loss. TRAK (M = 1 and a checkpoint
    ensemble) correlates positively per target; measured ≈ 0.36 / 0.56 mean Pearson (Grad-Dot 0.40)."""
    train, test = small_digits
    config = TrainConfig(epochs=5, lr=0.05, batch_size=32, checkpoint_every=1)
    rng = np.random.default_rng(0)
    grouping = Grouping.from_ids(train.y * 3 + rng.integers(0, 3, len(train)))
    prop = ExampleLoss(test.X, test.y)

    def fit(weights=None, checkpoint_dir=None):
        model = build_model("mlp-s", train.n_features, train.n_outputs, seed=0)
        res = train_model(model, train, config, sample_weight=weights, checkpoint_dir=checkpoint_dir)
        return model, res.checkpoints

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model, checkpoints = fit(checkpoint_dir=tmp)
        task = AttributionTask(model)
        base = prop.values(task).numpy()
        lgo = np.zeros((len(test), grouping.n_groups))
        for j in range(grouping.n_groups):
            w = np.ones(len(train))
            w[grouping.members(j)] = 0
            lgo[:, j] = prop.values(AttributionTask(fit(w)[0])).numpy() - base
        single = TRAK(task).cache(train, grouping).attribute(prop)
        ens = (
            TRAK(task, checkpoints=checkpoints, ensemble="checkpoints").cache(train, grouping).attribute(prop)
        )

    def mean_pearson(s):
        return np.mean([np.corrcoef(s[t], lgo[t])[0, 1] for t in range(len(test))])

    assert mean_pearson(single) > 0.2
    assert mean_pearson(ens) > 0.3


# -- projection="kronecker" (LoGra-style per-layer sketch from layer factors) -----------------------


def test_kronecker_group_features_are_sums_of_member_features(setup_mlp):
    """Linearity: φ_S = Σ_{i∈S} φ_i for the same seed (one big group spans several row chunks)."""
    task, train, _ = setup_mlp
    labels = np.r_[np.arange(200) % 50, np.full(100, 50)]
    grouping = Grouping(labels)
    point = TRAK(task, proj_dim=200, projection="kronecker", seed=2).cache(train).members[0].features
    group = TRAK(task, proj_dim=200, projection="kronecker", seed=2, max_batch=32).cache(train, grouping)
    Phi = group.members[0].features.double()
    onehot = torch.as_tensor(np.eye(grouping.n_groups)[labels].T)
    ref = onehot @ point.double()
    assert Phi.shape == ref.shape and 100 <= Phi.shape[1] <= 400
    assert torch.allclose(Phi, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # the target side uses the same P: projecting materialised gradients reproduces Φ for singletons
    G = per_example_gradients(task, train.X[:20], train.y[:20], fn=margin_output)
    direct = group.members[0].projector.project(G).double()
    assert torch.allclose(direct, point[:20].double(), rtol=1e-4, atol=1e-5 * float(direct.abs().max()))


def test_kronecker_singletons_equal_per_point(setup_mlp):
    task, train, prop = setup_mlp
    per_point = TRAK(task, proj_dim=256, projection="kronecker").cache(train).attribute(prop)
    perm = np.random.default_rng(0).permutation(len(train))
    shuffled = TRAK(task, proj_dim=256, projection="kronecker").cache(train, Grouping(perm)).attribute(prop)
    assert np.allclose(shuffled[:, perm], per_point, rtol=1e-4, atol=1e-5 * np.abs(per_point).max())


def test_kronecker_features_preserve_inner_products_in_expectation(setup_mlp):
    """E over seeds of ⟨φ_a, φ_b⟩ = ⟨∇m_a, ∇m_b⟩ (unbiased sketch); 200 seeds (the Kronecker sketch has a heavier-tailed variance than a dense one), generous tolerance."""
    task, train, _ = setup_mlp
    sub = train.subset(np.arange(12))
    G = per_example_gradients(task, sub.X, sub.y, fn=margin_output).double()
    exact = G @ G.T
    est = torch.zeros_like(exact)
    seeds = 200
    for seed in range(seeds):
        Phi = TRAK(task, proj_dim=256, projection="kronecker", seed=seed).cache(sub).members[0].features
        est += Phi.double() @ Phi.double().T / seeds
    norms = exact.diagonal().sqrt()
    rel = (est - exact) / (norms[:, None] * norms[None, :])
    assert rel.abs().max() < 0.15
    assert abs(float((est.diagonal() / exact.diagonal()).mean()) - 1) < 0.08


def test_kronecker_scores_do_not_depend_on_chunk_sizes(setup_mlp):
    task, train, prop = setup_mlp
    grouping = Grouping(np.r_[np.arange(200) % 50, np.full(100, 50)])
    ref = TRAK(task, proj_dim=256, projection="kronecker").cache(train, grouping).attribute(prop)
    small = TRAK(task, proj_dim=256, projection="kronecker", max_batch=16, memory_mb=0.2)
    out = small.cache(train, grouping).attribute(prop)
    assert np.allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    mean = TRAK(task, proj_dim=256, projection="kronecker", target="property").cache(train, grouping)
    assert mean.attribute(MeanLoss(prop.X, prop.y)).shape == (1, grouping.n_groups)


def test_kronecker_refuses_unsupported_layers(small_digits):
    train, _ = small_digits
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 10))
    with pytest.raises(GGDAError, match="projection=gaussian"):
        TRAK(AttributionTask(model), proj_dim=64, projection="kronecker").cache(train.subset(np.arange(20)))


def test_residuals_read_from_the_gradient_pass_equal_a_separate_forward(small_digits, trained_mlp):
    train, _ = small_digits
    task = AttributionTask(trained_mlp)
    grouping = random_grouping(len(train), 30, seed=1)
    method = make_method("trak", task, proj_dim=64).cache(train, grouping)
    separate = method._group_residuals(method.point_residuals(task))
    np.testing.assert_allclose(method.members[0].residual, separate, rtol=1e-5)
    # generic path: values not recorded, falls back to the forward
    generic = make_method("trak", task.generic(), proj_dim=64).cache(train, grouping)
    np.testing.assert_allclose(generic.members[0].residual, separate, rtol=1e-5)


def test_staged_projection_equals_projecting_each_group_alone(small_digits, trained_mlp):
    """Blocks are gathered in a stage buffer (several flushes here, groups of mixed sizes, one
    group taller than the stage): the features must be each group's own Pᵀ g_S."""
    from ggda.gradients import group_gradients

    train, _ = small_digits
    task = AttributionTask(trained_mlp)
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.arange(300), rng.integers(0, 300, len(train) - 300)])
    labels[rng.permutation(len(train))[:200]] = 300  # one large group
    grouping = Grouping(np.unique(labels[rng.permutation(len(train))], return_inverse=True)[1])
    method = make_method("trak", task, proj_dim=32, memory_mb=0.5, max_batch=128).cache(train, grouping)
    member = method.members[0]
    G = group_gradients(task, train.X, train.y, grouping, fn=method.output_fn)
    expected = member.projector.project(G)
    torch.testing.assert_close(member.features, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


# -- defaults: projection size rule, auto ensembles, seed agreement ------------------------------


def test_default_projection_size_rule():
    from ggda.methods.trak import PROJ_DIM, PROJ_MIN, default_proj_dim

    assert default_proj_dim(1438, 9610) == PROJ_DIM == 2048
    assert default_proj_dim(1438, 1000) == 1000  # p <= k: exact features
    assert default_proj_dim(100_000, 10**6, members=1) == 1024  # 100k x k x 4 B within 512 MB
    assert default_proj_dim(100_000, 10**6, members=6) == PROJ_MIN  # never below PROJ_MIN
    assert default_proj_dim(50, 10**6, members=11) == PROJ_DIM


def test_auto_ensemble_uses_checkpoints_and_skips_the_final_duplicate(small_digits, tmp_path):
    train, test = small_digits
    prop = ExampleLoss(test.X[:5], test.y[:5])
    model = build_model("mlp-s", train.n_features, train.n_outputs, seed=2)
    res = train_model(
        model, train, TrainConfig(epochs=3, lr=0.05, seed=2, checkpoint_every=1), checkpoint_dir=tmp_path
    )
    task = AttributionTask(model)
    auto = TRAK(task, proj_dim=64, checkpoints=res.checkpoints).cache(train)
    # the final model, then epochs 1 and 2; epoch 3's checkpoint is the final model: skipped
    assert len(auto.members) == 3 and auto.members[0].task is task
    assert auto.info["duplicates_skipped"] == 1 and auto.info["ensemble"] == "auto"
    explicit = TRAK(task, proj_dim=64, checkpoints=res.checkpoints[:2], ensemble="checkpoints")
    both = TRAK(
        task, proj_dim=64, models=[task.model, *[c.path for c in res.checkpoints[:2]]], ensemble="models"
    )
    assert np.allclose(auto.attribute(prop), both.cache(train).attribute(prop), rtol=1e-6)
    assert len(explicit.cache(train).members) == 2
    assert (
        len(TRAK(task, proj_dim=64, checkpoints=res.checkpoints, n_checkpoints=1).cache(train).members) == 1
    )
    # no checkpoints, no models: the final model alone
    assert len(TRAK(task, proj_dim=64).cache(train).members) == 1


def test_info_reports_projection_ridge_and_seed_agreement(setup_mlp, logreg):
    task, train, prop = setup_mlp
    trak = TRAK(task).cache(train, random_grouping(len(train), 60, seed=0))
    trak.attribute(prop)
    info = trak.info
    assert info["proj_dim"] == 2048 and info["proj_dim_rule"] == "auto" and not info["exact_features"]
    assert info["members"] == 1 and info["ridge_rel"] == RIDGE_REL and len(info["ridge"]) == 1
    assert -1.0 <= info["seed_agreement_min"] <= info["seed_agreement"] <= 1.0
    assert info["seed_agreement_dim"] == 1024
    assert TRAK(task, agreement=False).cache(train).attribute(prop).shape == (8, len(train))
    # exact features: p <= default k (logistic regression on 64 inputs: p = 650)
    lr_task, lr_train, lr_test = logreg
    exact = TRAK(lr_task).cache(lr_train)
    exact.attribute(ExampleLoss(lr_test.X, lr_test.y))
    assert exact.info["exact_features"] and exact.info["proj_dim"] == lr_task.n_params
    assert exact.info["seed_agreement"] == 1.0
    kron = TRAK(task, proj_dim=64, projection="kronecker").cache(train)
    kron.attribute(prop)
    assert "seed_agreement" not in kron.info and "kronecker" in kron.info["seed_agreement_note"]


def test_relative_ridge_is_relative_to_the_mean_nonzero_eigenvalue(setup_mlp):
    """λ = ridge_rel · tr(kernel) / min(K, k): the same λ whichever of primal/dual is factored."""
    task, train, _ = setup_mlp
    grouping = random_grouping(len(train), 20, seed=1)
    trak = TRAK(task, proj_dim=128, ridge_rel=0.5).cache(train, grouping)
    Phi = trak.members[0].features.double().numpy()
    assert np.isclose(trak.members[0].ridge, 0.5 * np.trace(Phi.T @ Phi) / 20, rtol=1e-6)
