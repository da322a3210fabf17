"""The GEMM-only Gauss–Newton product of chain models against torch.func, and preconditioned CG."""

import numpy as np
import pytest
import torch
from torch import nn

from ggda.linalg.chain_gn import chain_gn_product
from ggda.methods.curvature import TrainingCurvature
from ggda.models.chain import linear_chain
from ggda.task import AttributionTask


def _data(n=40, d=6, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=gen)
    return X.numpy(), y.numpy()


def _model(*layers):
    torch.manual_seed(0)
    return nn.Sequential(*layers).double()


CHAINS = {
    "logreg": lambda: _model(nn.Linear(6, 3)),
    "relu-mlp": lambda: _model(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)),
    "tanh-no-bias": lambda: _model(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)),
    "linear-linear": lambda: _model(nn.Linear(6, 5), nn.Linear(5, 3)),
}


def test_chain_detection():
    for make in CHAINS.values():
        assert linear_chain(AttributionTask(make())) is not None
    not_chains = [
        _model(nn.ReLU(), nn.Linear(6, 3)),  # activation first
        _model(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)),  # not elementwise
        _model(nn.Linear(6, 5), nn.ReLU()),  # outputs are not a Linear layer's
        _model(nn.Linear(6, 5), nn.ReLU(), nn.Tanh(), nn.Linear(5, 3)),  # two activations
    ]
    for model in not_chains:
        assert linear_chain(AttributionTask(model)) is None
    model = CHAINS["relu-mlp"]()
    assert linear_chain(AttributionTask(model, layers=["4"])) is None  # frozen earlier layers: not handled
    shared = nn.Linear(5, 5)  # used twice: the product would need both uses' contributions
    assert (
        linear_chain(AttributionTask(_model(nn.Linear(6, 5), nn.ReLU(), shared, nn.Tanh(), shared))) is None
    )
    skipped = linear_chain(
        AttributionTask(_model(nn.Linear(6, 5), nn.Identity(), nn.ReLU(), nn.Linear(5, 3)))
    )
    assert skipped is not None and skipped.depth == 2  # Identity (and eval-mode Dropout) are skipped


@pytest.mark.parametrize("name", list(CHAINS))
@pytest.mark.parametrize("loss", ["classification", "mse"])
def test_chain_gn_equals_torch_func(name, loss):
    model = CHAINS[name]()
    X, y = _data()
    if loss == "mse":
        y = np.random.default_rng(0).normal(size=(len(X), 3))
        task = AttributionTask(model, loss=lambda z, t: ((z - t) ** 2).sum(-1))
    else:
        task = AttributionTask(model)
    V = torch.randn(7, task.n_params, dtype=torch.float64)
    reference = TrainingCurvature(task.generic(), X, y, "gn", chunk_size=13).matvec(V)
    fast = TrainingCurvature(task, X, y, "gn", chunk_size=13)
    assert fast.chain is not None
    torch.testing.assert_close(fast.matvec(V), reference, rtol=1e-10, atol=1e-10)
    assert fast._forwards is not None and len(fast._forwards) == -(-len(X) // 13)  # forwards kept ...
    torch.testing.assert_close(fast.matvec(V), reference, rtol=1e-10, atol=1e-10)  # ... and reused
    rows = torch.arange(5, 40)  # a row subset (LiSSA's mini-batches) is never served from the cache
    sub = TrainingCurvature(task.generic(), X, y, "gn", chunk_size=13).product(V, rows)
    torch.testing.assert_close(fast.product(V, rows), sub, rtol=1e-10, atol=1e-10)
    Xt, yt = task.to_tensor(X, y)
    direct = chain_gn_product(fast.chain, task, task.params(), task.layer_slices(), Xt, yt, V) / len(X)
    torch.testing.assert_close(direct, reference, rtol=1e-10, atol=1e-10)


def test_exact_hessian_uses_chain_products():
    X, y = _data()
    task = AttributionTask(CHAINS["logreg"]())
    V = torch.randn(4, task.n_params, dtype=torch.float64)
    curvature = TrainingCurvature(task, X, y, "exact")
    assert curvature.chain is not None  # logistic regression: Hessian = Gauss–Newton
    exact = TrainingCurvature(task.generic(), X, y, "exact").matvec(V)
    torch.testing.assert_close(curvature.matvec(V), exact, rtol=1e-10, atol=1e-10)
    deep = AttributionTask(CHAINS["relu-mlp"]())  # second-order terms: ggda.linalg.chain_exact
    assert TrainingCurvature(deep, X, y, "exact").chain is not None
    assert TrainingCurvature(deep.generic(), X, y, "exact").chain is None


@pytest.mark.parametrize("bias", [True, False])
def test_linear_model_hessian_is_the_dense_hessian(bias):
    X, y = _data(n=30)
    task = AttributionTask(_model(nn.Linear(6, 3, bias=bias)))
    curvature = TrainingCurvature(task, X, y, "exact", weight_decay=0.1)
    reference = TrainingCurvature(task.generic(), X, y, "exact", weight_decay=0.1).dense()
    torch.testing.assert_close(curvature.dense(), reference, rtol=1e-10, atol=1e-10)
