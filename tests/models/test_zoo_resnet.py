"""The zoo's residual CNN (``resnet``): BatchNorm trains on batch statistics, attributes on the
stored running statistics, and every gradient path agrees with plain autograd."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ggda.errors import GGDAError
from ggda.gradients import group_gradients, per_example_gradients
from ggda.groups import make_grouping, random_grouping
from ggda.methods import make_method
from ggda.models import TrainConfig, build_model, load_model, save_model, train_model
from ggda.models.training import accuracy
from ggda.properties import MeanLoss
from ggda.task import AttributionTask


@pytest.fixture(scope="module")
def trained_resnet(small_digits):
    train, _ = small_digits
    model = build_model("resnet", train.n_features, 10, input_shape=train.input_shape, seed=0)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    train_model(model, train, TrainConfig(epochs=4, lr=0.05, batch_size=32))
    return model, fresh


def test_resnet_is_residual_with_batchnorm_and_learns(trained_resnet, small_digits):
    model, fresh = trained_resnet
    _, test = small_digits
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert accuracy(model, test) > 0.6
    assert not model.training  # training leaves the model in eval mode
    # train mode updated the running statistics (they start at mean 0, var 1)
    assert not torch.allclose(model.layer1.bn1.running_mean, fresh["layer1.bn1.running_mean"])
    assert not torch.allclose(model.layer1.bn1.running_var, fresh["layer1.bn1.running_var"])


def test_resnet_refuses_tabular_data():
    with pytest.raises(GGDAError, match="image data"):
        build_model("resnet", 30, 2)


def test_running_statistics_saved_and_loaded(trained_resnet, small_digits, tmp_path):
    model, _ = trained_resnet
    train, _ = small_digits
    save_model(tmp_path / "m.pt", model)
    loaded = load_model(tmp_path / "m.pt").eval()
    X = torch.as_tensor(train.X[:20])
    assert torch.equal(loaded.layer2.bn2.running_var, model.layer2.bn2.running_var)
    assert torch.allclose(loaded(X), model.eval()(X), atol=1e-6)


def test_per_example_gradients_use_running_statistics(trained_resnet, small_digits):
    """Each per-example gradient equals one example's backward in eval mode: a function of that
    example alone (batch statistics would mix the batch into it)."""
    model, _ = trained_resnet
    train, _ = small_digits
    task = AttributionTask(model)
    assert not task.model.training
    X, y = train.X[:12], train.y[:12]
    G = per_example_gradients(task, X, y)
    params = [p for p in model.parameters() if p.requires_grad]
    for i in (0, 7):
        model.zero_grad()
        loss = F.cross_entropy(model.eval()(torch.as_tensor(X[i : i + 1])), torch.as_tensor(y[i : i + 1]))
        ref = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        assert torch.allclose(G[i], ref, atol=1e-5, rtol=1e-4)
    alone = per_example_gradients(task, X[7:8], y[7:8])
    assert torch.allclose(alone[0], G[7], atol=1e-5, rtol=1e-4)
    grouping = random_grouping(12, 3, seed=0)
    GG = group_gradients(task, X, y, grouping)
    summed = torch.zeros_like(GG).index_add_(0, torch.as_tensor(grouping.labels), G)
    assert torch.allclose(GG, summed, atol=1e-4, rtol=1e-4)


def test_attribution_and_grad_kmeans_on_resnet(trained_resnet, small_digits):
    """Group Grad-Dot is the sum of its members' per-point scores (linearity), and the default
    Grad-K-Means, TracIn, EK-FAC and TRAK run on the BatchNorm model with finite scores."""
    model, _ = trained_resnet
    train, test = small_digits
    sub = train.subset(np.arange(60))
    task = AttributionTask(model)
    prop = MeanLoss(test.X, test.y)
    grouping = make_grouping("grad-kmeans", sub, n_groups=6, task=task)
    assert grouping.n_groups == 6 and len(grouping.labels) == 60
    point = make_method("grad-dot", task).cache(sub, None).attribute(prop)
    group = make_method("grad-dot", task).cache(sub, grouping).attribute(prop)
    per_group = np.bincount(grouping.labels, weights=np.asarray(point, dtype=np.float64).ravel(), minlength=6)
    np.testing.assert_allclose(np.asarray(group, dtype=np.float64).ravel(), per_group, rtol=1e-3, atol=1e-6)
    for name in ("tracin", "ekfac", "trak"):
        scores = make_method(name, task).cache(sub, grouping).attribute(prop)
        assert np.isfinite(np.asarray(scores)).all() and np.asarray(scores).size == 6
