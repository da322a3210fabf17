"""Reference path: one further-training run at a time with ``torch.optim`` (``make_optimizer``).

Used for models too large to stack (see :data:`ggda.gold.config.VECTORISE_LIMIT`) and as the
reference the vectorised path is tested against. Memory: one model copy and its optimiser state.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ggda.gold.objective import diverged, objective
from ggda.gold.problem import GoldProblem
from ggda.gold.removal import extra_terms, plan
from ggda.models.training import make_optimizer


def train_one(problem: GoldProblem, seed: int, members: np.ndarray | None, label: str) -> np.ndarray:
    """f after every recorded step of one run: (n_records, T). ``members=None``: the full run."""
    task, config = problem.task, problem.config
    dev = task.device
    model = copy.deepcopy(task.model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in task.param_names)
    named = dict(model.named_parameters())
    params = {n: named[n] for n in task.param_names}
    optimizer = make_optimizer(model, config.train_config(seed))
    extra = extra_terms([members], config, problem.n, task.dtype)
    Xe = ye = coef = None
    if extra is not None:
        Xe, ye, coef = problem.X[extra[0][0].to(dev)], problem.y[extra[0][0].to(dev)], extra[1][0].to(dev)
    records = []
    for step in plan(problem.n, [members], config, seed, task.dtype):
        if step.active is None or bool(step.active[0]):
            idx = (step.idx if step.shared else step.idx[0]).to(dev)
            obj = objective(
                task,
                params,
                problem.X[idx],
                problem.y[idx],
                step.weight[0].to(dev),
                step.divisor[0].to(dev),
                Xe,
                ye,
                coef,
            )
            if not torch.isfinite(obj):
                raise diverged(label, seed, step.epoch, float(obj.detach()), config.lr)
            optimizer.zero_grad(set_to_none=True)
            obj.backward()
            optimizer.step()
        if step.record:
            values = problem.prop.values(task, {n: p.detach() for n, p in params.items()})
            if not torch.isfinite(values).all():
                raise diverged(label, seed, step.epoch, float("nan"), config.lr)
            records.append(values.to(torch.float64).cpu())
    return torch.stack(records).numpy()


def train_sequential(
    problem: GoldProblem, seed: int, runs: list[np.ndarray | None], labels: list[str]
) -> np.ndarray:
    """(n_records, T, R) for R runs trained one after another."""
    return np.stack([train_one(problem, seed, m, lab) for m, lab in zip(runs, labels, strict=True)], axis=-1)
