"""LDS: exact on a case where retraining is linear in the kept set; chance level for random scores."""

from __future__ import annotations

import numpy as np
import pytest

from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.evaluate import lds, lds_from_outcomes, subset_masks
from ggda.groups import random_grouping
from ggda.methods import make_method
from ggda.models import ModelSpec, TrainConfig, build_model
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask


def test_subset_masks_keep_alpha_and_are_seeded():
    m = subset_masks(40, 12, 0.25, seed=3)
    assert m.shape == (12, 40) and (m.sum(axis=1) == 10).all()
    assert np.array_equal(m, subset_masks(40, 12, 0.25, seed=3))
    with pytest.raises(GGDAError):
        subset_masks(40, 12, 1.0)


def test_lds_of_an_exactly_additive_model_is_one():
    """If losses are exactly −Σ_{kept} τ (+ const), LDS = 1; shuffled scores give ~0; negated −1."""
    rng = np.random.default_rng(0)
    tau = rng.normal(size=(15, 30))
    masks = subset_masks(30, 40, 0.5, seed=0)
    actual = 2.0 - masks @ tau.T
    assert lds_from_outcomes(tau, masks, actual).score == pytest.approx(1.0)
    assert lds_from_outcomes(-tau, masks, actual).score == pytest.approx(-1.0)
    assert abs(lds_from_outcomes(rng.normal(size=tau.shape), masks, actual).score) < 0.2


@pytest.fixture
def one_step(small_digits, make_retrainer):
    """One full-batch SGD step from a fixed init with 0/1 weights: θ₁ = θ₀ − (η/n) Σ_kept g_i(θ₀).

    To first order the test loss is θ₀'s loss − (η/n) ∇ℓ_t · Σ_kept g_i, so Grad-Dot at θ₀ is the
    exact linear datamodel (up to O(η²)).
    """
    train, test = small_digits
    config = TrainConfig(epochs=1, batch_size=len(train), lr=0.05, momentum=0.0)
    retrainer = make_retrainer(config=config, mode="weight")
    init = build_model(ModelSpec("logreg", train.n_features, train.n_outputs), seed=0)
    task = AttributionTask(init)
    return retrainer, task, train, test.subset(np.arange(20))


def test_lds_is_one_for_grad_dot_on_one_gradient_step(one_step):
    retrainer, task, train, targets = one_step
    prop = ExampleLoss(targets.X, targets.y)
    results = {}
    for name, grouping in (
        ("points", Grouping.singleton(len(train))),
        ("groups", random_grouping(len(train), 30, 0)),
    ):
        scores = make_method("grad-dot", task).cache(train, grouping).attribute(prop)
        noise = np.random.default_rng(1).normal(size=scores.shape) * scores.std()
        results[name] = lds(
            retrainer, {"grad-dot": scores, "random": noise}, grouping, n_subsets=12, seeds=[0]
        )
    for name in ("points", "groups"):
        assert results[name]["grad-dot"].score > 0.97, name
        assert abs(results[name]["random"].score) < 0.35, name
        assert results[name]["grad-dot"].per_target.shape == (20,)


def test_lds_checks_shapes(one_step):
    retrainer, _, train, _ = one_step
    with pytest.raises(GGDAError):
        lds(retrainer, np.zeros((5, 7)), Grouping.singleton(len(train)), n_subsets=4)
