"""Tiny problems for the gold-standard tests: a logistic model and an MLP on synthetic data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ggda.data.dataset import Dataset


def make_data(n: int = 70, d: int = 5, n_test: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    X = rng.normal(size=(n + n_test, d))
    y = (X @ w + 0.7 * rng.normal(size=n + n_test) > 0).astype(np.int64)
    return X[:n], y[:n], X[n:], y[n:]


@pytest.fixture(scope="module")
def tiny():
    """(logistic model, X, y, X_test, y_test) with n = 70 (not a multiple of the batch sizes used)."""
    X, y, Xt, yt = make_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(X.shape[1], 2)).double()
    return model, X, y, Xt, yt


@pytest.fixture(scope="module")
def tiny_mlp():
    X, y, Xt, yt = make_data(n=65, d=4, seed=1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    return model, X, y, Xt, yt


def as_dataset(X, y) -> Dataset:
    return Dataset(X=X.astype(np.float32), y=y)


def reference_run(
    model,
    X,
    y,
    Xt,
    yt,
    *,
    seed,
    epochs,
    batch_size,
    lr,
    drop=(),
    mode="mask",
    eps=None,
    optimizer="sgd",
    momentum=0.0,
):
    """Further training written out by hand (torch.optim, torch.randperm): the test oracle.

    mask: drop's points get weight 0, divisor |batch|; sampler: drop deleted from the permutation;
    weight: every step's mean batch loss minus eps * sum of drop's losses.
    """
    m = copy.deepcopy(model).double()
    X, y = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y)
    Xt, yt = torch.as_tensor(Xt, dtype=torch.float64), torch.as_tensor(yt)
    if optimizer == "sgd":
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam(m.parameters(), lr=lr)
    drop_t = torch.as_tensor(list(drop), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        if mode == "sampler":
            perm = perm[~torch.isin(perm, drop_t)]
        for batch in perm.split(batch_size):
            losses = F.cross_entropy(m(X[batch]), y[batch], reduction="none")
            if mode == "mask":
                loss = losses[~torch.isin(batch, drop_t)].sum() / len(batch)
            elif mode == "sampler":
                loss = losses.mean()
            else:
                loss = losses.mean() - eps * F.cross_entropy(m(X[drop_t]), y[drop_t], reduction="sum")
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out.append(F.cross_entropy(m(Xt), yt, reduction="none").numpy())
    return np.stack(out)  # (epochs, T)
