"""Feature spaces: closed-form last-layer gradients equal autograd, hooks find the right layer."""

import numpy as np
import pytest
import torch
from torch import nn

from ggda.errors import GGDAError
from ggda.gradients import per_example_gradients
from ggda.groups.features import (
    GaussianProjector,
    find_output_layer,
    input_features,
    last_layer_gradients,
    logit_gradients,
    projected_gradients,
    representation_features,
)
from ggda.models import build_model
from ggda.task import AttributionTask


def _autograd_layer(model, X, y, layer, loss="classification"):
    return per_example_gradients(AttributionTask(model, loss=loss, layers=[layer]), X, y).numpy()


def test_last_layer_closed_form_equals_autograd(small_digits, trained_mlp):
    train, _ = small_digits
    task = AttributionTask(trained_mlp)
    X, y = train.X[:80], train.y[:80]
    F = last_layer_gradients(task, X, y, chunk_size=32)  # chunking must not matter
    assert F.shape == (80, 10 * (128 + 1))
    np.testing.assert_allclose(F, _autograd_layer(trained_mlp, X, y, "2"), rtol=1e-5, atol=1e-6)
    # the bias part is δ = p − onehot(y): rows sum to zero and the true class entry is p_y − 1
    delta = F[:, -10:]
    np.testing.assert_allclose(delta.sum(1), 0.0, atol=1e-6)
    probs = torch.softmax(trained_mlp(torch.as_tensor(X)), 1).detach().numpy()
    np.testing.assert_allclose(delta[np.arange(80), y], probs[np.arange(80), y] - 1, atol=1e-6)
    np.testing.assert_allclose(logit_gradients(task, X, y), delta, atol=1e-6)


def test_last_layer_regression_cnn_and_custom_loss(small_digits):
    train, _ = small_digits
    X = train.X[:40]
    # regression (squared error, closed form) on an MLP
    reg = build_model("mlp-s", train.n_features, 1, seed=1)
    t = np.linspace(-1, 1, 40).astype(np.float32)
    F = last_layer_gradients(AttributionTask(reg, loss="regression"), X, t)
    np.testing.assert_allclose(F, _autograd_layer(reg, X, t, "2", "regression"), rtol=1e-5, atol=1e-6)
    # the CNN: its output layer is fc2 (found by execution order)
    cnn = build_model("cnn", train.n_features, 10, input_shape=(1, 8, 8), seed=0)
    task = AttributionTask(cnn)
    assert find_output_layer(task, X).name == "fc2"
    np.testing.assert_allclose(
        last_layer_gradients(task, X, train.y[:40]),
        _autograd_layer(cnn, X, train.y[:40], "fc2"),
        rtol=1e-5,
        atol=1e-6,
    )

    # a custom loss goes through one backward to the layer outputs instead of the closed form
    def smooth_ce(out, yy):
        return torch.nn.functional.cross_entropy(out, yy, reduction="none", label_smoothing=0.1)

    mlp = build_model("mlp-s", train.n_features, 10, seed=2)
    got = last_layer_gradients(AttributionTask(mlp, loss=smooth_ce), X, train.y[:40])
    want = per_example_gradients(AttributionTask(mlp, loss=smooth_ce, layers=["2"]), X, train.y[:40])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_non_output_and_indirect_layers(small_digits):
    train, _ = small_digits
    X, y = train.X[:30], train.y[:30]
    torch.manual_seed(0)
    # output layer followed by a non-linearity: not "direct", δ comes from autograd at its outputs
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10), nn.Tanh())
    task = AttributionTask(model)
    assert not find_output_layer(task, X).direct
    np.testing.assert_allclose(
        last_layer_gradients(task, X, y), _autograd_layer(model, X, y, "2"), rtol=1e-5, atol=1e-6
    )
    # a hidden layer, chosen by name; a layer without bias
    np.testing.assert_allclose(
        last_layer_gradients(task, X, y, layer="0"), _autograd_layer(model, X, y, "0"), rtol=1e-5, atol=1e-6
    )
    nobias = nn.Sequential(nn.Linear(64, 10, bias=False))
    assert last_layer_gradients(AttributionTask(nobias), X, y).shape == (30, 640)
    with pytest.raises(GGDAError, match="not an nn.Linear"):
        last_layer_gradients(task, X, y, layer="1")
    with pytest.raises(GGDAError, match="not in the model"):
        last_layer_gradients(task, X, y, layer="fc9")


def test_representation_is_input_of_output_layer(small_digits, trained_mlp):
    train, _ = small_digits
    X = train.X[:50]
    H = representation_features(AttributionTask(trained_mlp), X, chunk_size=16)
    want = trained_mlp[1](trained_mlp[0](torch.as_tensor(X))).detach().numpy()
    np.testing.assert_allclose(H, want, atol=1e-6)
    first = representation_features(AttributionTask(trained_mlp), X, layer="0")
    np.testing.assert_allclose(first, trained_mlp[0](torch.as_tensor(X)).detach().numpy(), atol=1e-6)


def test_input_features_standardised():
    X = np.c_[np.arange(10.0), np.full(10, 3.0), np.linspace(0, 100, 10)]
    F = input_features(X)
    np.testing.assert_allclose(F.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(F.std(0), [1, 0, 1], atol=1e-5)  # constant column -> 0, not NaN


def test_projection_blocks_and_projected_gradients(small_digits, trained_mlp):
    train, _ = small_digits
    task = AttributionTask(trained_mlp)
    G = torch.randn(7, 20000, generator=torch.Generator().manual_seed(0))
    kept = GaussianProjector(20000, 16, seed=3, task=task)
    streamed = GaussianProjector(20000, 16, seed=3, task=task, memory_mb=0.01)  # regenerates blocks
    assert kept.full is not None and streamed.full is None
    np.testing.assert_allclose(kept(G).numpy(), streamed(G).numpy(), rtol=1e-4, atol=1e-4)
    # projected per-example gradients equal projecting the exact per-example gradients
    X, y = train.X[:25], train.y[:25]
    P = projected_gradients(task, X, y, projection_dim=32, seed=1, memory_mb=0.1)  # tiny chunks
    full = per_example_gradients(task, X, y)
    want = GaussianProjector(task.n_params, 32, seed=1, task=task)(full).numpy()
    np.testing.assert_allclose(P, want, rtol=1e-4, atol=1e-5)
    # distances are roughly preserved (JL): the pairwise-distance correlation is high
    P512 = projected_gradients(task, X, y, projection_dim=512, seed=0)
    d_full = torch.cdist(full, full).numpy().ravel()
    d_proj = np.linalg.norm(P512[:, None] - P512[None], axis=-1).ravel()
    assert np.corrcoef(d_full, d_proj)[0, 1] > 0.95
