"""Noisy-label detection: metric edge cases, self-influence closed forms, flipped digits labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ggda.data import flip_labels
from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.evaluate import (
    GroupLoss,
    detect_noisy_labels,
    self_influence,
    suspicion_from_self_influence,
    suspicion_from_test_scores,
)
from ggda.gradients.group import group_gradients
from ggda.groups import random_grouping
from ggda.methods import make_method
from ggda.models import TrainConfig, build_model, train_model
from ggda.properties import MeanLoss
from ggda.task import AttributionTask


def test_perfect_and_reversed_rankings():
    noisy = np.zeros(100, dtype=bool)
    noisy[[3, 17, 42, 77, 90]] = True
    perfect = noisy.astype(float) + np.linspace(0, 0.1, 100)
    best = detect_noisy_labels(perfect, noisy)
    assert best.auc == 1.0 and best.found[0.05] == 1.0
    worst = detect_noisy_labels(-perfect, noisy)
    assert worst.auc == 0.0 and worst.found[0.2] == 0.0
    assert best.recall[-1] == 1.0 and best.inspected[-1] == 1.0
    with pytest.raises(GGDAError):
        detect_noisy_labels(perfect, np.zeros(100, dtype=bool))


def test_group_loss_property_is_group_gradient(small_digits, trained_mlp):
    train, _ = small_digits
    sub = train.subset(np.arange(40))
    g = random_grouping(40, 7, seed=0)
    task = AttributionTask(trained_mlp)
    prop = GroupLoss(sub.X, sub.y, g)
    assert torch.allclose(prop.gradients(task), group_gradients(task, sub.X, sub.y, g), atol=1e-6)
    losses = task.losses(task.params(), *task.to_tensor(sub.X, sub.y)).detach().numpy()
    assert np.allclose(prop.values(task).numpy(), np.bincount(g.labels, weights=losses), atol=1e-5)


@pytest.mark.parametrize("grouping", [None, 9])
def test_grad_dot_self_influence_is_squared_group_gradient_norm(small_digits, trained_mlp, grouping):
    train, _ = small_digits
    sub = train.subset(np.arange(60))
    g = Grouping.singleton(60) if grouping is None else random_grouping(60, grouping, seed=2)
    task = AttributionTask(trained_mlp)
    att = make_method("grad-dot", task).cache(sub, g)
    expected = (group_gradients(task, sub.X, sub.y, g) ** 2).sum(1).numpy()
    assert np.allclose(self_influence(att, block=4), expected, rtol=1e-4)


def test_self_influence_finds_flipped_digits_labels(small_digits):
    """Logistic regression on 300 digits with 10% flipped labels: self-influence AUC well above 0.5."""
    train, test = small_digits
    noisy = flip_labels(train, 0.1, seed=0)
    model = build_model("logreg", noisy.n_features, noisy.n_outputs, seed=0)
    train_model(model, noisy, TrainConfig(epochs=15, lr=0.05, batch_size=32))
    task = AttributionTask(model)
    att = make_method("grad-dot", task).cache(noisy)
    det = detect_noisy_labels(suspicion_from_self_influence(self_influence(att), att.grouping), noisy.noisy)
    assert det.auc > 0.9
    assert det.found[0.2] > 0.8
    harm = suspicion_from_test_scores(att.attribute(MeanLoss(test.X, test.y)), att.grouping)
    assert detect_noisy_labels(harm, noisy.noisy).auc > 0.6
    # Label-pure groups keep a useful signal after dividing by group size.
    grouped = make_method("grad-dot", task).cache(noisy, Grouping.from_ids(noisy.y * 10 + np.arange(300) % 3))
    det_g = detect_noisy_labels(
        suspicion_from_self_influence(self_influence(grouped), grouped.grouping), noisy.noisy
    )
    assert det_g.auc > 0.5


def test_methods_without_a_usable_self_influence_give_nan_with_the_reason(small_digits, trained_mlp):
    """Grad-Cos self-influence is cos(g, g) = 1 (an AUC would rank rounding errors) and RepSim has
    none: both give a NaN row with a note instead of a number or an abort; Grad-Dot gives a score."""
    from ggda.evaluate.noisy_labels import DetectionResult, constant_scores, detect_by_self_influence

    train, _ = small_digits
    noisy = flip_labels(train.subset(np.arange(80)), 0.2, seed=0)
    task = AttributionTask(trained_mlp)
    cos = make_method("grad-cos", task).cache(noisy)
    si = self_influence(cos)
    assert np.allclose(si, 1.0, atol=1e-5) and constant_scores(si)
    for name, cause in (("grad-cos", "cos(g, g) = 1"), ("repsim", "sees neither labels nor the loss")):
        det = detect_by_self_influence(make_method(name, task).cache(noisy), noisy.noisy)
        assert np.isnan(det.auc) and all(np.isnan(v) for v in det.found.values())
        assert cause in det.note and det.row()["note"] == det.note
    det = detect_by_self_influence(make_method("grad-dot", task).cache(noisy), noisy.noisy)
    assert 0.0 <= det.auc <= 1.0 and det.note is None and "note" not in det.row()
    assert not constant_scores(np.array([1.0, 1.1])) and constant_scores(np.full(4, 2.0))
    assert np.isnan(DetectionResult.undefined("why").auc)
