"""Removal modes as a per-step plan shared by the sequential and vectorised paths.

One seed fixes one permutation per epoch (:func:`ggda.models.training.epoch_batches`, the same
generator use as :func:`~ggda.models.training.train_model`, so the full run *is* ``train_model``
with ``seed=s``). Every run of a seed — the full run and each left-out run — reads its batches from
that permutation (paired seeds, NOTES gotcha 4). How a unit is left out:

- ``mask``: the full run's batches, members weighted ``1-ε`` (ε = 1: removed); the batch objective
  keeps its divisor ``|batch|`` (``Σ w ℓ / |B|``, as ``train_model(sample_weight=...)``). Every
  other point sees exactly the same batches: the clean counterfactual.
- ``sampler``: the permutation with the members deleted (FiMODA's ``RandomSamplerLOO``), cut into
  batches again, so later batches shift; the divisor is the actual batch size. A run whose epoch
  has fewer batches idles (no update, no optimiser step) for the full schedule's extra steps.
- ``weight``: the full run's batches unchanged, plus ``- ε Σ_{j∈unit} ℓ_j`` in *every* step's
  objective (FiMODA's SST-2 "leave out every batch"; ε = 1/n ≈ one removal per epoch).

A plan step carries the inputs for all runs of a chunk at once: shared batch indices (mask,
weight) or per-run ones (sampler), per-example weights, divisors and which runs are active.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ggda.gold.config import GoldConfig
from ggda.models.training import epoch_batches


@dataclass
class Step:
    """Inputs of one optimiser step for R runs.

    Attributes:
        idx: (B,) training positions shared by every run, or (R, B) per run (sampler).
        weight: (R, B) per-example weights (0 = left out or padding).
        divisor: (R,) the batch objective's divisor.
        active: (R,) bool, or ``None`` when every run steps.
        epoch: 1-based epoch; ``step``: 1-based global step of the full schedule.
        record: record f after this step.
    """

    idx: torch.Tensor
    weight: torch.Tensor
    divisor: torch.Tensor
    active: torch.Tensor | None
    epoch: int
    step: int
    record: bool

    @property
    def shared(self) -> bool:
        return self.idx.ndim == 1


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def record_steps(n: int, config: GoldConfig) -> np.ndarray:
    """Global steps after which f is recorded: every ``record_every`` steps and every epoch end."""
    nb = steps_per_epoch(n, config.batch_size)
    total = nb * config.epochs
    marks = set(range(nb, total + 1, nb))
    if config.record_every:
        marks |= set(range(config.record_every, total + 1, config.record_every))
    return np.array(sorted(marks), dtype=np.int64)


def epoch_permutations(n: int, config: GoldConfig, seed: int) -> list[torch.Tensor]:
    """The permutation of every epoch for ``seed`` (shared by all runs of the seed)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.cat(epoch_batches(n, config.batch_size, generator)) for _ in range(config.epochs)]


def removal_weights(n: int, runs: Sequence[np.ndarray | None], config: GoldConfig, dtype) -> torch.Tensor:
    """(R, n) per-point weights of ``mask`` mode: ``1-ε`` on each run's members, 1 elsewhere."""
    W = torch.ones(len(runs), n, dtype=dtype)
    eps = config.resolved_epsilon(n)
    for r, members in enumerate(runs):
        if members is not None:
            W[r, torch.as_tensor(members)] = 1.0 - eps
    return W


def plan(
    n: int, runs: Sequence[np.ndarray | None], config: GoldConfig, seed: int, dtype=torch.float64
) -> Iterator[Step]:
    """The steps of further training for R runs (``None`` = the full run, else a unit's members).

    Tensors are on the CPU; the engines move them to the task's device.
    """
    R, B = len(runs), config.batch_size
    nb = steps_per_epoch(n, B)
    marks = set(record_steps(n, config).tolist())
    if config.removal in ("mask", "weight"):
        W = removal_weights(n, runs, config, dtype) if config.removal == "mask" else None
    else:
        keep = torch.ones(R, n, dtype=torch.bool)
        for r, members in enumerate(runs):
            if members is not None:
                keep[r, torch.as_tensor(members)] = False
        counts = keep.sum(1)
        width = nb * B
    g = 0
    for epoch, perm in enumerate(epoch_permutations(n, config, seed), start=1):
        if config.removal == "sampler":
            kept = keep[:, perm]  # (R, n): is the point at this permutation slot kept in run r
            order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)  # kept first, in order
            idx_all = torch.zeros(R, width, dtype=torch.long)
            idx_all[:, :n] = perm[order]
            valid_all = torch.arange(width)[None, :] < counts[:, None]
        for j in range(nb):
            g += 1
            if config.removal == "sampler":
                sl = slice(j * B, (j + 1) * B)
                valid = valid_all[:, sl]
                count = valid.sum(1)
                active = count > 0
                step = Step(
                    idx=idx_all[:, sl],
                    weight=valid.to(dtype),
                    divisor=count.clamp_min(1).to(dtype),
                    active=None if bool(active.all()) else active,
                    epoch=epoch,
                    step=g,
                    record=g in marks,
                )
            else:
                batch = perm[j * B : (j + 1) * B]
                weight = W[:, batch] if W is not None else torch.ones(R, len(batch), dtype=dtype)
                step = Step(
                    idx=batch,
                    weight=weight,
                    divisor=torch.full((R,), float(len(batch)), dtype=dtype),
                    active=None,
                    epoch=epoch,
                    step=g,
                    record=g in marks,
                )
            yield step


def fork_steps(n: int, runs: Sequence[np.ndarray | None], config: GoldConfig, seed: int) -> list[int]:
    """First global step (1-based) at which each run can differ from the full run of its seed.

    In ``mask`` and ``sampler`` mode a run sees exactly the full run's batches until the first
    batch of epoch 1 that holds one of its members, so up to that step its parameters *are* the
    full run's. The vectorised path starts the run there from a copy of the full run (same math,
    about half of epoch 1's work saved). ``weight`` mode differs from step 1; so does the full run
    (``None``), which is the source.
    """
    if config.removal == "weight":
        return [1] * len(runs)
    perm = epoch_permutations(n, GoldConfig(**{**config.to_dict(), "epochs": 1}), seed)[0]
    position = torch.empty(n, dtype=torch.long)
    position[perm] = torch.arange(n)
    out = []
    for members in runs:
        if members is None or len(members) == 0:
            out.append(1)
        else:
            out.append(int(position[torch.as_tensor(members)].min()) // config.batch_size + 1)
    return out


def extra_terms(
    runs: Sequence[np.ndarray | None], config: GoldConfig, n: int, dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``weight`` mode: (R, m) member positions (padded) and (R, m) coefficients ε (0 = padding)."""
    if config.removal != "weight":
        return None
    m = max([len(r) for r in runs if r is not None] + [1])
    idx = torch.zeros(len(runs), m, dtype=torch.long)
    coef = torch.zeros(len(runs), m, dtype=dtype)
    eps = config.resolved_epsilon(n)
    for r, members in enumerate(runs):
        if members is not None:
            idx[r, : len(members)] = torch.as_tensor(members)
            coef[r, : len(members)] = eps
    return idx, coef
