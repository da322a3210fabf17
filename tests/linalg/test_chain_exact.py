"""The GEMM exact Hessian product of chain models (R-operator through backprop) against torch.func."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from ggda.data.dataset import Dataset
from ggda.linalg.chain_exact import chain_exact_product
from ggda.methods import make_method
from ggda.methods.curvature import TrainingCurvature
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "none": None}


def _chain(act: str, hidden: int, bias: bool, d: int = 6, c: int = 3, width: int = 5) -> nn.Module:
    torch.manual_seed(hidden)
    layers: list[nn.Module] = []
    d_in = d
    for _ in range(hidden):
        layers.append(nn.Linear(d_in, width, bias=bias))
        if ACTIVATIONS[act] is not None:
            layers.append(ACTIVATIONS[act]())
        d_in, width = width, width - 1
    layers.append(nn.Linear(d_in, c, bias=bias))
    return nn.Sequential(*layers).double()


def _task(model: nn.Module, loss: str, n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6))
    if loss == "mse":
        y = rng.normal(size=(n, 3))
        return AttributionTask(model, loss=lambda z, t: 0.5 * ((z - t) ** 2).sum(-1)), X, y
    return AttributionTask(model), X, rng.integers(0, 3, n)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("hidden", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss", ["classification", "mse"])
def test_chain_exact_equals_torch_func(act, hidden, bias, loss):
    task, X, y = _task(_chain(act, hidden, bias), loss)
    fast = TrainingCurvature(task, X, y, "exact", chunk_size=13)
    assert fast.products.name == "chain GEMMs" and fast.chain is not None
    reference = TrainingCurvature(task.generic(), X, y, "exact", chunk_size=13)
    assert reference.chain is None
    gen = torch.Generator().manual_seed(1)
    for T in (1, 7):
        V = torch.randn(T, task.n_params, generator=gen, dtype=torch.float64)
        ref = reference.matvec(V)
        scale = ref.abs().max()
        torch.testing.assert_close(fast.matvec(V), ref, rtol=1e-10, atol=1e-10 * scale)
        torch.testing.assert_close(fast.matvec(V), ref, rtol=1e-10, atol=1e-10 * scale)  # cached forwards
        rows = torch.arange(5, 33)  # a row subset (LiSSA's mini-batches)
        torch.testing.assert_close(
            fast.product(V, rows), reference.product(V, rows), rtol=1e-10, atol=1e-10 * scale
        )
    # not the Gauss–Newton product: the second-order terms are really there
    gn = TrainingCurvature(task, X, y, "gn", chunk_size=13).matvec(V)
    assert (gn - ref).abs().max() > 1e-6 * scale


def test_direct_call_and_float32():
    model = _chain("tanh", 2, True)
    task, X, y = _task(model, "classification")
    Xt, yt = task.to_tensor(X, y)
    V = torch.randn(3, task.n_params, dtype=torch.float64)
    fast = TrainingCurvature(task, X, y, "exact")
    direct = chain_exact_product(fast.chain, task, task.params(), task.layer_slices(), Xt, yt, V)
    torch.testing.assert_close(direct / len(X), TrainingCurvature(task.generic(), X, y, "exact").matvec(V))
    task32, X32, y32 = _task(_chain("gelu", 2, True).float(), "classification")
    V32 = torch.randn(4, task32.n_params)
    ref32 = TrainingCurvature(task32.generic(), X32, y32, "exact").matvec(V32)
    got32 = TrainingCurvature(task32, X32, y32, "exact").matvec(V32)
    assert ((got32 - ref32).norm() / ref32.norm()).item() < 1e-5


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
def test_dense_exact_hessian_is_torch_func_hessian(act):
    model = _chain(act, 2, True, width=4)
    task, X, y = _task(model, "classification", n=12)
    Xt, yt = task.to_tensor(X, y)
    curvature = TrainingCurvature(task, X, y, "exact")
    assert curvature.chain is not None
    dense = curvature.dense() * len(X)  # the mean Hessian, times n: the summed loss's
    names = list(task.param_names)
    shapes = [task.params()[k].shape for k in names]

    def summed(theta):
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = theta[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        return task.loss_fn(functional_call(model, params, (Xt,)), yt).sum()

    reference = torch.func.hessian(summed)(task.flatten(task.params()).detach())
    torch.testing.assert_close(dense, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dense, dense.T, rtol=1e-12, atol=1e-12)


def test_if_cg_exact_scores_match_generic_path():
    model = _chain("tanh", 2, True, width=6)
    task, X, y = _task(model, "classification", n=60)
    train = Dataset(X, y, np.arange(len(X)))
    prop = ExampleLoss(X[:4], y[:4])
    options = dict(hessian="exact", damping=0.5, tol=1e-12, max_iter=200)
    fast = make_method("if-cg", task, **options).cache(train).attribute(prop)
    slow = make_method("if-cg", task.generic(), **options).cache(train).attribute(prop)
    assert np.allclose(fast, slow, rtol=1e-8, atol=1e-10 * np.abs(slow).max())
