"""Recipe path: further training by the user's own training function (any module, any loop).

Each run starts from a copy of θ^f, trains with the recipe on the kept examples (all of them for
the full run) for ``config.epochs`` epochs under the paired seed, and records the property after
every epoch through the recipe's ``on_epoch`` hook. The model is put in eval mode while the
property is read and handed back in train mode.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ggda.errors import GGDAError
from ggda.gold.objective import diverged
from ggda.gold.problem import GoldProblem


def train_one(problem: GoldProblem, seed: int, members: np.ndarray | None, label: str) -> np.ndarray:
    """(epochs, T) property values after every epoch of one run."""
    task, config, data = problem.task, problem.config, problem.data
    model = copy.deepcopy(task.model)
    if members is None:
        kept = data
    else:
        keep = np.ones(len(data), dtype=bool)
        keep[members] = False
        kept = data.subset(np.flatnonzero(keep))
    records: list[torch.Tensor] = []

    def on_epoch(epoch: int, trained: nn.Module) -> None:
        view = copy.copy(task)
        view.model = trained
        was_training = trained.training
        trained.eval()
        with torch.no_grad():
            values = problem.prop.values(view, view.params())
        trained.train(was_training)
        if not torch.isfinite(values).all():
            raise diverged(label, seed, epoch, float("nan"), config.lr)
        records.append(values.to(torch.float64).cpu())

    problem.recipe.fit(
        model, kept, int(seed), device=str(task.device), epochs=config.epochs, on_epoch=on_epoch
    )
    if len(records) != config.epochs:
        raise GGDAError(
            f"The training function called on_epoch {len(records)} times for epochs={config.epochs}; "
            "call on_epoch(epoch, model) after every epoch and train for the given epochs."
        )
    return torch.stack(records).numpy()


def train_with_recipe(
    problem: GoldProblem, seed: int, runs: list[np.ndarray | None], labels: list[str]
) -> np.ndarray:
    """(epochs, T, R) for R runs, one after another."""
    return np.stack([train_one(problem, seed, m, lab) for m, lab in zip(runs, labels, strict=True)], axis=-1)
