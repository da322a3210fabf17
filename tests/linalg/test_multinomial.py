"""The reduced-basis inverse of softmax regression's Hessian against torch.func's dense Hessian."""

import pytest
import torch
from torch import nn

from ggda.linalg.multinomial import MultinomialInverse, null_complement_basis
from ggda.methods import make_method
from ggda.methods.curvature import TrainingCurvature
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask


def _problem(n=60, d=5, C=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    W = torch.randn(C, d, generator=gen, dtype=torch.float64)
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=gen)
    return X, W, b, y


def _dense_hessian(X, W, b, y):
    C, d = W.shape

    def loss(theta):
        Wt = theta[: C * d].view(C, d)
        bt = theta[C * d :] if b is not None else None
        return nn.functional.cross_entropy(nn.functional.linear(X, Wt, bt), y, reduction="mean")

    theta = torch.cat([W.reshape(-1), b]) if b is not None else W.reshape(-1)
    return torch.func.hessian(loss)(theta)


def test_basis_is_orthonormal_and_orthogonal_to_ones():
    Q = null_complement_basis(7)
    torch.testing.assert_close(Q.T @ Q, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(Q.sum(0), torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size,tile", [(2048, 128), (16, 2), (60, 3)])
def test_solve_equals_dense_damped_inverse(bias, chunk_size, tile):
    X, W, b, y = _problem()
    b = b if bias else None
    H = _dense_hessian(X, W, b, y)
    p, mu = H.shape[0], 0.05
    B = torch.randn(3, p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = torch.linalg.solve(H + mu * torch.eye(p, dtype=torch.float64), B.T).T
    C, d = W.shape
    inv = MultinomialInverse(
        X,
        W,
        b,
        1.0 / len(X),
        mu,
        slice(0, C * d),
        slice(C * d, C * d + C) if bias else None,
        chunk_size,
        tile,
    )
    assert inv.positive_definite
    torch.testing.assert_close(inv.solve(B), reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inv.solve(B[1]), reference[1], rtol=1e-10, atol=1e-10)


def test_explicit_if_takes_the_reduced_path_with_identical_scores():
    X, W, b, y = _problem(n=80, d=6, C=5)
    model = nn.Linear(6, 5).double()
    with torch.no_grad():
        model.weight[:] = W[:, :6]
        model.bias[:] = b
    task = AttributionTask(model)
    Xn, yn = X.numpy(), y.numpy()
    curvature = TrainingCurvature(task, Xn, yn, "exact", weight_decay=0.01)
    assert isinstance(curvature.inverse(0.1), MultinomialInverse)
    from ggda.data.dataset import Dataset

    train = Dataset(Xn, yn, n_classes=5)
    prop = ExampleLoss(Xn[:7], yn[:7])
    fast = make_method("if-explicit", task, damping=0.1, weight_decay=0.01).cache(train).attribute(prop)
    generic = task.generic()  # the generic dense Hessian from HVPs, Cholesky-factorised
    assert TrainingCurvature(generic, Xn, yn, "exact").chain is None
    dense = make_method("if-explicit", generic, damping=0.1, weight_decay=0.01).cache(train).attribute(prop)
    torch.testing.assert_close(torch.as_tensor(fast), torch.as_tensor(dense), rtol=1e-9, atol=1e-12)
