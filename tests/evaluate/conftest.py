"""Fixtures for evaluation tests: small logistic-regression retrainers over array data."""

from __future__ import annotations

import numpy as np
import pytest

from ggda.evaluate import Retrainer, RetrainSpec
from ggda.execution import SerialExecutor
from ggda.models import ModelSpec, TrainConfig


@pytest.fixture
def make_retrainer(small_digits, tmp_path):
    """Factory: a serial retrainer on the 300-point digits subset (arrays travel with the jobs)."""
    train, test = small_digits

    def make(model="logreg", config=None, mode="subset", store=None, executor=None, data=None):
        tr, te = data or (train, test)
        spec = RetrainSpec(
            ModelSpec(model, tr.n_features, tr.n_outputs, tr.input_shape),
            config or TrainConfig(epochs=10, lr=0.05, batch_size=32),
            mode=mode,
        )
        return Retrainer(spec, store or tmp_path / "store", executor or SerialExecutor(), tr, te)

    return make


def class_scores(y: np.ndarray, cls: int) -> np.ndarray:
    """An oracle ranking: every point of class ``cls`` maximally helpful, everything else zero."""
    return (np.asarray(y) == cls).astype(np.float64)
