"""Module-level job functions for the Ray tests (importable by Ray workers: they share the cwd)."""

from __future__ import annotations

import os
import uuid

import numpy as np
import torch

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError


def train_subset(train: Dataset, test: Dataset, keep: np.ndarray, seed: int) -> dict:
    """A retraining-like job: logistic regression on a subset, its parameters and test losses."""
    from ggda.models import TrainConfig, build_model, train_model

    sub = train.subset(keep)
    model = build_model("logreg", sub.n_features, sub.n_outputs, seed=seed)
    train_model(model, sub, TrainConfig(epochs=3, batch_size=32, lr=0.05, seed=seed))
    with torch.no_grad():
        out = model(torch.as_tensor(test.X))
        losses = torch.nn.functional.cross_entropy(out, torch.as_tensor(test.y), reduction="none")
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {
        "params": params.numpy(),
        "test_loss": losses.numpy(),
        "threads": np.array([torch.get_num_threads()]),
    }


def always_fails(counter_dir: str) -> dict:
    """Raises every time; leaves one file per attempt so the test can count attempts."""
    open(os.path.join(counter_dir, uuid.uuid4().hex), "w").close()
    raise RuntimeError("permanent failure")


def user_error(counter_dir: str) -> dict:
    """A GGDAError: a user mistake that no retry can fix."""
    open(os.path.join(counter_dir, uuid.uuid4().hex), "w").close()
    raise GGDAError("bad option; fix the configuration")
