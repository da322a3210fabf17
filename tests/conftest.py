"""Shared fixtures. Tests run single-threaded: on 2 cores, parallel BLAS threads across
processes slow everything by an order of magnitude (DATA-SOURCES §5)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_split():
    from ggda.data.spec import DataSpec, prepare_data

    train, test, _ = prepare_data(DataSpec("digits"))
    return train, test


@pytest.fixture(scope="session")
def small_digits(digits_split):
    """300 training points, 40 test points: fast enough for per-example work in every test."""
    train, test = digits_split
    return train.subset(np.arange(300)), test.subset(np.arange(40))


@pytest.fixture(scope="session")
def trained_mlp(small_digits):
    from ggda.models import TrainConfig, build_model, train_model

    train, _ = small_digits
    model = build_model("mlp-s", train.n_features, train.n_outputs, seed=0)
    train_model(model, train, TrainConfig(epochs=5, lr=0.05, batch_size=32))
    return model
