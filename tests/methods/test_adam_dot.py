"""grad-dot-adam: Grad-Dot under the diagonal preconditioner of a fresh Adam state."""

from itertools import combinations

import numpy as np
import pytest
import torch
from torch import nn

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.groups import Grouping, random_grouping
from ggda.methods import make_method
from ggda.methods.adam_dot import GradDotAdam, adam_second_moment
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer MLP with badly scaled inputs (so Adam's preconditioner is far from identity)."""
    g = torch.Generator().manual_seed(0)
    n, d = 7, 3
    X = torch.randn(n + 4, d, generator=g, dtype=torch.float64) * torch.tensor([10.0, 1.0, 0.1])
    y = torch.randint(0, 2, (n + 4,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(d, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    train = Dataset(X=X[:n].numpy(), y=y[:n].numpy())
    prop = ExampleLoss(X[n:].numpy(), y[n:].numpy())
    return AttributionTask(model), model, train, prop, X, y, n


def _grad(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Flat gradient of the mean cross-entropy of (X, y), by plain autograd."""
    model.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


def test_second_moment_is_the_mean_over_every_batch(tiny):
    """Closed form = the average of ḡ_B² over all C(n, B) batches (what a permutation's batches
    are drawn from), computed by autograd on each batch's mean loss."""
    task, model, train, _, X, y, n = tiny
    for B in (1, 3, 7, 50):
        m = GradDotAdam(task, batch_size=B).cache(train)
        Bc = min(B, n)
        sq = [_grad(model, X[list(c)], y[list(c)]) ** 2 for c in combinations(range(n), Bc)]
        brute = torch.stack(sq).mean(0)
        torch.testing.assert_close(
            m.second_moment.double(), brute, rtol=1e-6, atol=1e-9 * float(brute.max())
        )  # data held as float32


def test_closed_form_limits():
    mean = torch.tensor([1.0, -2.0, 0.0])
    mean_sq = torch.tensor([3.0, 5.0, 4.0])
    torch.testing.assert_close(adam_second_moment(mean, mean_sq, 10, 1), mean_sq)  # B = 1: Fisher
    torch.testing.assert_close(adam_second_moment(mean, mean_sq, 10, 10), mean * mean)  # full batch
    torch.testing.assert_close(adam_second_moment(mean, mean_sq, 10, 99), mean * mean)


def test_singleton_matches_brute_force(tiny):
    task, model, train, prop, X, y, n = tiny
    m = GradDotAdam(task, batch_size=3, eps=1e-8).cache(train)
    G = torch.stack([_grad(model, X[i : i + 1], y[i : i + 1]) for i in range(n)])
    Gt = torch.stack([_grad(model, X[n + t : n + t + 1], y[n + t : n + t + 1]) for t in range(4)])
    mean, mean_sq = G.mean(0), (G * G).mean(0)
    v = mean**2 + (n - 3) / (3 * (n - 1)) * (mean_sq - mean**2)
    ref = (Gt / (v.sqrt() + 1e-8)) @ G.T
    np.testing.assert_allclose(
        m.attribute(prop), ref.numpy(), rtol=1e-5, atol=1e-8 * np.abs(ref.numpy()).max()
    )
    # the preconditioner matters here: the ranking differs from plain Grad-Dot's
    plain = make_method("grad-dot", task).cache(train).attribute(prop)
    assert not np.allclose(plain / np.abs(plain).max(), ref.numpy() / np.abs(ref.numpy()).max(), atol=1e-2)


def test_group_score_is_sum_of_members(tiny):
    task, _, train, prop, *_ = tiny
    grouping = random_grouping(len(train), 3, seed=0)
    per_point = make_method("grad-dot-adam", task).cache(train).attribute(prop)
    grouped = make_method("grad-dot-adam", task).cache(train, grouping).attribute(prop)
    summed = np.zeros_like(grouped)
    np.add.at(summed.T, grouping.labels, per_point.T)
    np.testing.assert_allclose(grouped, summed, rtol=1e-6, atol=1e-9 * np.abs(summed).max())
    mean = make_method("grad-dot-adam", task, aggregate="mean").cache(train, grouping).attribute(prop)
    np.testing.assert_allclose(
        mean, summed / grouping.sizes[None, :], rtol=1e-6, atol=1e-9 * np.abs(summed).max()
    )


def test_options_are_checked(tiny):
    task, _, train, *_ = tiny
    with pytest.raises(GGDAError):
        make_method("grad-dot-adam", task, batch_size=0)
    with pytest.raises(GGDAError):
        make_method("grad-dot-adam", task, eps=-1.0)
    with pytest.raises(GGDAError):
        make_method("grad-dot-adam", task, damping=1.0)  # not an option of this method
    assert Grouping.singleton(len(train)).n_groups == len(train)
