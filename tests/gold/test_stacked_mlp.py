"""The hand-written stacked-MLP kernel = vmap(grad(objective)) = the sequential torch.optim path.

Gradients are compared against ``vmap(grad(objective))`` for every supported activation, with and
without biases, shared and per-run batches, weight mode's extra term and every block split; whole
further-training runs are compared across the three engines for every removal mode and optimiser.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import grad, vmap

from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.gold import GoldConfig, select_units
from ggda.gold.objective import objective
from ggda.gold.problem import make_problem
from ggda.gold.sequential import train_sequential
from ggda.gold.stacked_mlp import StackedMLP, ineligible_reason
from ggda.gold.vectorised import resolve_kernel, train_vectorised
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask
from tests.gold.conftest import make_data

ACTIVATIONS = [
    nn.ReLU(),
    nn.Tanh(),
    nn.Sigmoid(),
    nn.GELU(),
    nn.GELU(approximate="tanh"),
    nn.SiLU(),
    nn.LeakyReLU(0.1),
    nn.ELU(0.7),
    nn.Softplus(beta=2.0, threshold=1.0),
]


def chain(act: nn.Module, d: int = 4, h: int = 5, out: int = 3, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(d, h), act, nn.Linear(h, h, bias=bias), nn.Identity(), act, nn.Linear(h, out)
    ).double()


def stacked(task: AttributionTask, R: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """R different parameter sets around the model's (so runs really differ)."""
    g = torch.Generator().manual_seed(1)
    return {
        k: (v.unsqueeze(0) + scale * torch.randn(R, *v.shape, generator=g, dtype=v.dtype)).contiguous()
        for k, v in task.params().items()
    }


def vmap_grads(task, params, X, y, w, d, Xe=None, ye=None, coef=None):
    def f(p, X, y, w, d, *extra):
        return objective(task, p, X, y, w, d, *extra)

    xd = None if X.ndim == 2 else 0
    extra = () if Xe is None else (Xe, ye, coef)
    fn = vmap(grad(f), in_dims=(0, xd, xd, 0, 0, *([0] * len(extra))))
    return fn(params, X, y, w, d, *extra), vmap(f, in_dims=(0, xd, xd, 0, 0, *([0] * len(extra))))(
        params, X, y, w, d, *extra
    )


def check(task, params, block, *args):
    kernel = StackedMLP(task, block=block)
    for _ in range(2):  # the second call reuses buffers and cached views
        grads, obj = kernel(params, *args)
        ref, ref_obj = vmap_grads(task, params, *args)
        for k in ref:
            torch.testing.assert_close(grads[k], ref[k], rtol=0, atol=1e-12)
        torch.testing.assert_close(obj, ref_obj, rtol=0, atol=1e-12)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda m: repr(m))
def test_kernel_gradients_equal_vmap_every_activation(act):
    task = AttributionTask(chain(act))
    R, B = 5, 7
    params = stacked(task, R)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(B, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (B,), generator=g)
    w = torch.rand(R, B, generator=g, dtype=torch.float64)
    w[1, 3] = 0.0  # a removed point
    d = torch.full((R,), float(B), dtype=torch.float64)
    check(task, params, 2, X, y, w, d)  # shared batch, blocks of 2 + a partial block


@pytest.mark.parametrize("block", [1, 3, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_per_run_batches_and_extra_term(block, bias):
    """Sampler-style (R, B, d) batches and weight mode's ``- Σ c_j ℓ_j`` with per-run points."""
    task = AttributionTask(chain(nn.ReLU(), bias=bias))
    R, B, m = 4, 6, 2
    params = stacked(task, R)
    g = torch.Generator().manual_seed(3)
    Xr = torch.randn(R, B, 4, generator=g, dtype=torch.float64)
    yr = torch.randint(0, 3, (R, B), generator=g)
    w = (torch.rand(R, B, generator=g) > 0.2).double()
    d = w.sum(1).clamp_min(1)
    Xe = torch.randn(R, m, 4, generator=g, dtype=torch.float64)
    ye = torch.randint(0, 3, (R, m), generator=g)
    coef = torch.full((R, m), 0.05, dtype=torch.float64)
    coef[0, 1] = 0.0  # padding
    check(task, params, block, Xr, yr, w, d)
    Xs, ys = Xr[0], yr[0]
    check(task, params, block, Xs, ys, w, d, Xe, ye, coef)  # shared batch + per-run extra term


def test_kernel_regression_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    task = AttributionTask(model, loss="regression")
    R, B = 3, 5
    params = stacked(task, R)
    X = torch.randn(B, 3, dtype=torch.float64)
    y = torch.randn(B, dtype=torch.float64)
    w = torch.ones(R, B, dtype=torch.float64)
    d = torch.full((R,), float(B), dtype=torch.float64)
    check(task, params, 2, X, y, w, d)


# -- whole further-training runs: mlp kernel = vmap kernel = sequential ----------------------------


def problem_of(model, removal, **cfg):
    X, y, Xt, yt = make_data(n=65, d=4, seed=1)
    grouping = Grouping(np.arange(len(y)) % 13)
    units = select_units(grouping, ids=[0, 4, 12])
    config = GoldConfig(epochs=2, batch_size=16, removal=removal, record_every=3, **cfg)
    task = AttributionTask(model)
    return make_problem(task, X, y, ExampleLoss(Xt, yt), units, config, "vectorised", 3), units


@pytest.mark.parametrize("removal", ["mask", "sampler", "weight"])
@pytest.mark.parametrize(
    "opt",
    [
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
        {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.01},
    ],
    ids=["sgd-momentum-wd", "adam-wd"],
)
def test_training_equals_vmap_and_sequential(removal, opt):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 2)).double()
    eps = {"epsilon": 0.05} if removal == "weight" else {}
    problem, units = problem_of(model, removal, **opt, **eps)
    assert resolve_kernel(problem) == "mlp"
    runs, labels = list(units.members), ["a", "b", "c"]
    fast = train_vectorised(problem, 0, runs, labels, kernel="mlp")
    generic = train_vectorised(problem, 0, runs, labels, kernel="vmap")
    seq = train_sequential(problem, 0, runs, labels)
    assert fast.shape == seq.shape and fast.shape[0] > 2
    np.testing.assert_allclose(fast, generic, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fast, seq, rtol=0, atol=1e-10)
    full = train_vectorised(problem, 0, [None], ["full"], kernel="mlp")
    assert np.abs(fast - full).max() > 1e-6  # removal had an effect
    nofork = train_vectorised(problem, 0, runs, labels, kernel="mlp", fork=False)
    np.testing.assert_allclose(nofork, fast, rtol=0, atol=1e-10)


def test_float32_close_to_sequential():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    problem, units = problem_of(model, "mask", lr=0.1, dtype="float32")
    fast = train_vectorised(problem, 0, list(units.members), ["a", "b", "c"], kernel="mlp")
    seq = train_sequential(problem, 0, list(units.members), ["a", "b", "c"])
    np.testing.assert_allclose(fast, seq, rtol=1e-4, atol=1e-5)


# -- eligibility and fallback ----------------------------------------------------------------------


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


def custom_loss(out, y):
    return torch.nn.functional.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize(
    "make,why",
    [
        (lambda: AttributionTask(Custom().double()), "not an nn.Sequential"),
        (lambda: AttributionTask(nn.Sequential(nn.Linear(4, 3), nn.Hardtanh(), nn.Linear(3, 2))), "Hardtanh"),
        (
            lambda: AttributionTask(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))),
            "buffers",
        ),
        (lambda: AttributionTask(nn.Sequential(nn.ReLU(), nn.Linear(4, 2))), "first module"),
        (
            lambda: AttributionTask(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), layers=["2"]),
            "attributed",
        ),
        (lambda: AttributionTask(nn.Sequential(nn.Linear(4, 2)), loss=custom_loss), "loss"),
    ],
)
def test_ineligible_models_fall_back_to_vmap(make, why, monkeypatch):
    task = make()
    reason = ineligible_reason(task)
    assert reason is not None and why in reason
    X, y, Xt, yt = make_data(n=40, d=4, seed=2)
    units = select_units(Grouping.singleton(len(y)), ids=[3, 9])
    config = GoldConfig(epochs=1, batch_size=16, lr=0.05, dtype="float32")
    problem = make_problem(task, X, y, ExampleLoss(Xt, yt), units, config, "vectorised", 2)
    assert resolve_kernel(problem) == "vmap"
    with pytest.raises(GGDAError, match="cannot run this model"):
        resolve_kernel(problem, "mlp")
    vec = train_vectorised(problem, 0, list(units.members), ["a", "b"])  # runs on the fallback
    seq = train_sequential(problem, 0, list(units.members), ["a", "b"])
    np.testing.assert_allclose(vec, seq, rtol=1e-4, atol=1e-5)


def test_shared_linear_layers_are_ineligible():
    """A Linear used twice accumulates its gradient over both uses; the kernel does not."""
    shared = nn.Linear(4, 4)
    task = AttributionTask(nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 2)))
    assert "shared" in ineligible_reason(task)


def test_kernel_choice_from_config_and_errors():
    problem, _ = problem_of(nn.Sequential(nn.Linear(4, 2)).double(), "mask", lr=0.1)
    assert resolve_kernel(problem) == "mlp"
    forced, _ = problem_of(nn.Sequential(nn.Linear(4, 2)).double(), "mask", lr=0.1, kernel="vmap")
    assert resolve_kernel(forced) == "vmap"
    assert resolve_kernel(forced, "mlp") == "mlp"  # an explicit argument wins
    assert forced.fingerprint != problem.fingerprint  # the kernel enters the result keys
    with pytest.raises(GGDAError, match="Unknown kernel"):
        GoldConfig(kernel="fast")
    with pytest.raises(GGDAError, match="Unknown gold kernel"):
        resolve_kernel(problem, "fast")
