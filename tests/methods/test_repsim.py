import numpy as np
import pytest
import torch

from ggda.errors import GGDAError
from ggda.groups import random_grouping
from ggda.methods import make_method
from ggda.methods.repsim import RepSim, last_layer_name
from ggda.models import build_model
from ggda.properties import CallableProperty, ExampleLoss, MeanLoss
from ggda.task import AttributionTask


@pytest.fixture(scope="module")
def setup(small_digits, trained_mlp):
    train, test = small_digits
    task = AttributionTask(trained_mlp)
    with torch.no_grad():  # mlp-s = Linear, ReLU, Linear: the last layer's input is the ReLU output
        H = trained_mlp[:2](torch.as_tensor(train.X)).double().numpy()
        Ht = trained_mlp[:2](torch.as_tensor(test.X[:9])).double().numpy()
    return task, train, ExampleLoss(test.X[:9], test.y[:9]), H, Ht


def cos(A, B):
    return (A / np.linalg.norm(A, axis=1, keepdims=True)) @ (B / np.linalg.norm(B, axis=1, keepdims=True)).T


def test_per_point_cosine_matches_brute_force(setup):
    task, train, prop, H, Ht = setup
    scores = RepSim(task).cache(train).attribute(prop)
    assert scores.shape == (9, len(train))
    assert np.allclose(scores, cos(Ht, H), atol=1e-6)
    # layer options: the ReLU's output is the same representation; the first layer's input is x
    relu_out = RepSim(task, layer="1", hook="output").cache(train).attribute(prop)
    assert np.allclose(relu_out, scores, atol=1e-12)
    raw = RepSim(task, layer="0", batch_size=7).cache(train).attribute(prop)
    assert np.allclose(raw, cos(prop.X.astype(np.float64), train.X.astype(np.float64)), atol=1e-6)


def test_group_scores(setup):
    task, train, prop, H, Ht = setup
    grouping = random_grouping(len(train), 25, seed=4)
    onehot = np.eye(25)[grouping.labels]
    # dot: additive, group = sum of members; aggregate=mean = dot with the centroid
    dot_pp = RepSim(task, similarity="dot").cache(train).attribute(prop)
    dot_g = RepSim(task, similarity="dot").cache(train, grouping).attribute(prop)
    assert np.allclose(dot_g, dot_pp @ onehot, rtol=1e-10)
    mean_g = RepSim(task, similarity="dot", aggregate="mean").cache(train, grouping).attribute(prop)
    assert np.allclose(mean_g, Ht @ (onehot.T @ H / grouping.sizes[:, None]).T, rtol=1e-6)
    # member-cosine: additive sum of member cosines
    mc = RepSim(task, similarity="member-cosine").cache(train, grouping).attribute(prop)
    assert np.allclose(mc, cos(Ht, H) @ onehot, atol=1e-6)
    # cosine: cosine with the summed (equivalently mean) representation — not additive
    cg = RepSim(task).cache(train, grouping).attribute(prop)
    assert np.allclose(cg, cos(Ht, onehot.T @ H), atol=1e-6)
    assert not np.allclose(cg, mc, atol=1e-2)


def test_mean_property_and_batch_independence(setup):
    task, train, prop, H, Ht = setup
    grouping = random_grouping(len(train), 10, seed=0)
    rows = RepSim(task).cache(train, grouping).attribute(prop)
    mean = RepSim(task, batch_size=13).cache(train, grouping).attribute(MeanLoss(prop.X, prop.y))
    assert mean.shape == (1, 10) and np.allclose(mean[0], rows.mean(0), atol=1e-10)


def test_cnn_default_layer_and_errors(setup, small_digits):
    task, train, prop, _, _ = setup
    cnn = build_model("cnn", train.n_features, 10, input_shape=train.input_shape, seed=0)
    assert last_layer_name(cnn) == "fc2"
    scores = make_method("repsim", AttributionTask(cnn)).cache(train.subset(np.arange(20))).attribute(prop)
    assert scores.shape == (9, 20) and np.all(np.abs(scores) <= 1 + 1e-9)
    with pytest.raises(GGDAError, match="no module"):
        RepSim(task, layer="fc9")
    with pytest.raises(GGDAError, match="similarity"):
        RepSim(task, similarity="euclid")
    with pytest.raises(GGDAError, match="target examples"):
        RepSim(task).cache(train).attribute(CallableProperty(lambda fwd: fwd(prop.X).sum(1)))


def test_bare_linear_model_uses_its_input():
    """A bare nn.Linear is its own (only) parametrised layer: RepSim hooks the model itself, so
    the representation is the raw input."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 5)).astype(np.float32), rng.integers(0, 3, 30)
    task = AttributionTask(torch.nn.Linear(5, 3))
    assert last_layer_name(task.model) == ""
    scores = RepSim(task).cache((X, y)).attribute(ExampleLoss(X[:4], y[:4]))
    assert np.allclose(scores, cos(X[:4].astype(np.float64), X.astype(np.float64)), atol=1e-6)
    with pytest.raises(GGDAError, match="has no module"):
        RepSim(task, layer="")
