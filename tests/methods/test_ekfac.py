"""EK-FAC: exact on a one-layer model with squared error; exact eigenvalue correction on any
Linear/Conv2d layer; clear errors for unsupported layers."""

import numpy as np
import pytest
import torch

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.methods import make_method
from ggda.methods.curvature import TrainingCurvature
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask


def least_squares(z, y):
    """½‖z − onehot(y)‖²: a loss whose output Hessian is I, so GN = A ⊗ I is Kronecker."""
    return 0.5 * ((z - torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)[y.long()]) ** 2).sum(-1)


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    n, d, C = 80, 6, 4
    X = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    y = rng.integers(0, C, n)
    return Dataset(X, y), ExampleLoss(X[:5], y[:5]), d, C


def test_one_layer_equals_exact_gauss_newton_inverse(blobs):
    train, prop, d, C = blobs
    torch.manual_seed(0)
    model = torch.nn.Linear(d, C).double()
    task = AttributionTask(model, loss=least_squares)
    exact = make_method("if-explicit", task, damping=1e-3, hessian="gn").cache(train)
    ekfac = make_method("ekfac", task, damping=1e-3).cache(train)
    B = prop.gradients(task)
    assert torch.allclose(ekfac.precondition(B), exact.precondition(B), rtol=1e-9, atol=1e-12)
    assert np.allclose(ekfac.attribute(prop), exact.attribute(prop), rtol=1e-9, atol=1e-12)
    wd = make_method("ekfac", task, damping=1e-3, weight_decay=0.1).cache(train)
    ref = make_method("if-explicit", task, damping=1e-3, hessian="gn", weight_decay=0.1).cache(train)
    assert np.allclose(wd.attribute(prop), ref.attribute(prop), rtol=1e-9, atol=1e-12)


def _check_eigenvalue_correction(task, train, ekfac):
    """Λ* must equal diag(Qᵀ G_l Q) with G_l the layer's exact mean Gauss–Newton block."""
    G = TrainingCurvature(task, train.X, train.y, kind="gn").dense(block_size=64)
    for layer in ekfac.layers:
        idx = torch.arange(G.shape[0])
        parts = []
        if layer.weight is not None:
            parts.append(idx[layer.weight].reshape(layer.out_features, -1))
        if layer.bias is not None:
            parts.append(idx[layer.bias][:, None])
        order = torch.cat(parts, dim=1).reshape(-1)  # (out, in_aug) row-major
        block = G[order][:, order]
        Q = torch.kron(layer.QS, layer.QA)  # vec(QSᵀ M QA) = (QS ⊗ QA)ᵀ vec(M) for row-major vec
        diag = torch.diagonal(Q.T @ block @ Q).reshape(layer.out_features, layer.in_aug)
        assert torch.allclose(layer.eigenvalues, diag, rtol=1e-8, atol=1e-12), layer.name


def test_eigenvalue_correction_is_exact_diagonal_for_mlp_cross_entropy(blobs):
    train, prop, d, C = blobs
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(d, 5), torch.nn.Tanh(), torch.nn.Linear(5, C)).double()
    task = AttributionTask(model)
    ekfac = make_method("ekfac", task, damping=1e-3, chunk_size=33).cache(train)
    _check_eigenvalue_correction(task, train, ekfac)
    assert ekfac.info["layers"] == ["0", "2"]


class TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(3 * 3 * 3, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x.reshape(-1, 1, 6, 6)))
        return self.fc(h.flatten(1))


def test_eigenvalue_correction_is_exact_for_conv2d():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 36))
    y = rng.integers(0, 3, 40)
    train = Dataset(X, y)
    torch.manual_seed(0)
    task = AttributionTask(TinyCNN().double())
    ekfac = make_method("ekfac", task, damping=1e-3).cache(train)
    _check_eigenvalue_correction(task, train, ekfac)
    # empirical Fisher variant runs and differs
    emp = make_method("ekfac", task, damping=1e-3, fisher="empirical").cache(train)
    prop = ExampleLoss(X[:3], y[:3])
    a, b = ekfac.attribute(prop), emp.attribute(prop)
    assert np.isfinite(b).all() and not np.allclose(a, b)


def test_layer_subset_and_unsupported_modules(blobs):
    train, prop, d, C = blobs
    model = torch.nn.Sequential(torch.nn.Linear(d, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, C)).double()
    # a normalisation layer is skipped with a notice (as Kronfluence does): the same scores as a
    # task restricted to the Linear layers
    with pytest.warns(RuntimeWarning, match=r"skips 1 layer\(s\) .*: 1 \(LayerNorm\) \(2 parameter tensors"):
        skipping = make_method("ekfac", AttributionTask(model), damping=1e-3).cache(train)
    restricted = AttributionTask(model, layers=["0", "2"])
    expect = make_method("ekfac", restricted, damping=1e-3).cache(train).attribute(prop)
    assert np.allclose(skipping.attribute(prop), expect, rtol=1e-10, atol=1e-12)
    with pytest.raises(GGDAError, match="if-cg"):
        make_method("ekfac", AttributionTask(model, layers=["1"]))
    task = AttributionTask(model, layers=["2"])
    ekfac = make_method("ekfac", task, damping=1e-3).cache(train)
    assert [ly.name for ly in ekfac.layers] == ["2"]
    assert np.isfinite(ekfac.attribute(prop)).all()
    with pytest.raises(GGDAError, match="fisher"):
        make_method("ekfac", task, fisher="sampled")


def test_skipped_layers_are_named_in_one_line(blobs):
    """The notice names every skipped layer with its type, on one line (issue #19)."""
    import warnings
    from collections import OrderedDict

    train, prop, d, C = blobs
    model = torch.nn.Sequential(
        OrderedDict(
            fc1=torch.nn.Linear(d, 6),
            norm=torch.nn.LayerNorm(6),
            bn=torch.nn.BatchNorm1d(6),
            fc2=torch.nn.Linear(6, C),
        )
    ).double()
    model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_method("ekfac", AttributionTask(model), damping=1e-3)
    notices = [str(w.message) for w in caught if "EK-FAC skips" in str(w.message)]
    assert len(notices) == 1
    text = notices[0]
    assert "\n" not in text
    assert "norm (LayerNorm)" in text and "bn (BatchNorm1d)" in text
    assert "skips 2 layer(s)" in text and "4 parameter tensors" in text
    assert "fc1" not in text and "fc2" not in text
