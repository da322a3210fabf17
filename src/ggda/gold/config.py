"""Settings of a further-training gold standard (FiMODA eq. 17 / eq. 13, NOTES B2).

Everything that changes the numbers lives in :class:`GoldConfig` and enters the result keys, so
a resumed run never mixes results computed under different settings. How the work is spread
(backend, workers) does not change the numbers and is not part of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ggda.errors import GGDAError
from ggda.models.training import OPTIMIZERS, TrainConfig

REMOVALS = ("mask", "sampler", "weight")
PATHS = ("auto", "vectorised", "sequential")
DTYPES = ("float32", "float64")
KERNELS = ("auto", "mlp", "vmap")

#: ``path="auto"`` trains a chunk of runs as one stacked model when
#: ``n_params × runs_per_chunk`` is at most this many numbers (each costs parameters, gradient and
#: up to two optimiser states: ≈ 4 × 8 bytes in float64, so 2e7 ≈ 640 MB); larger models fall back
#: to one run at a time, which needs memory for a single model only.
VECTORISE_LIMIT = 20_000_000


@dataclass
class GoldConfig:
    """How θ^f is further trained and how a unit is left out.

    Args:
        epochs: further-training epochs E (f is recorded after each).
        seeds: number of paired seeds S (seed values ``seed_offset .. seed_offset+S-1``); the full
            run and every left-out run of one seed see the same permutation.
        optimizer: ``sgd`` (optionally with momentum) or ``adam``; a *fresh* optimiser state, since
            only the final model is available.
        lr, momentum, weight_decay, batch_size: as in :class:`~ggda.models.training.TrainConfig`.
        removal: ``mask`` (same batches; members get weight ``1-ε`` in their batch, ε = 1: removal;
            the batch divisor is unchanged), ``sampler`` (FiMODA's tabular code: the same permutation
            with the members deleted, so later batches shift) or ``weight`` (FiMODA's SST-2 code: every
            step's objective gets ``- ε Σ_{j∈unit} ℓ_j``; ε = 1/n matches one removal per epoch in
            expectation).
        epsilon: see ``removal``; ``None`` = 1 for ``mask`` and 1/n for ``weight``.
        record_every: also record f every k optimiser steps (0: only at epoch ends).
        center: report eq. 13 (centred over the left-out set) as ``gold``; eq. 17 is kept too.
        path: ``vectorised`` (stacked parameters + vmap), ``sequential`` (torch.optim, one run at a
            time) or ``auto`` (vectorised while ``n_params × chunk ≤ VECTORISE_LIMIT``).
        chunk: units per stored job (0: automatic). The resume granularity, and in the vectorised
            path the number of runs trained at once.
        dtype: ``float64`` (default: the effect of one point is ~lr/B relative, close to float32
            resolution) or ``float32``.
        kernel: the vectorised path's gradient kernel: ``auto`` (the hand-written stacked MLP
            kernel when the model is a plain Linear/activation chain, ``vmap(grad)`` otherwise),
            ``mlp`` (insist on the former) or ``vmap`` (force the latter). Same objective either
            way; results differ at rounding level, so the kernel enters the result keys.
    """

    epochs: int = 1
    seeds: int = 1
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 128
    removal: str = "mask"
    epsilon: float | None = None
    record_every: int = 0
    center: bool = True
    seed_offset: int = 0
    path: str = "auto"
    chunk: int = 0
    dtype: str = "float64"
    kernel: str = "auto"

    def __post_init__(self) -> None:
        from ggda.options import COUNT, NONNEG, NONNEG_INT, POSITIVE, Spec, check_fields

        check_fields(
            self,
            {
                "epochs": COUNT,
                "seeds": COUNT,
                "lr": POSITIVE,
                "momentum": Spec(float, 0, 1, high_open=True),
                "weight_decay": NONNEG,
                "batch_size": COUNT,
                # mask: member weight 1 - ε (ε = 1 removes); weight: -ε ℓ per step
                "epsilon": Spec(float, 0, 1 if self.removal == "mask" else None, low_open=True, none=True),
                "record_every": NONNEG_INT,
                "seed_offset": NONNEG_INT,
                "chunk": NONNEG_INT,
            },
        )
        if self.optimizer not in OPTIMIZERS:
            raise GGDAError(f"Unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}.")
        if self.removal not in REMOVALS:
            raise GGDAError(f"Unknown removal '{self.removal}'; choose one of {', '.join(REMOVALS)}.")
        if self.removal == "sampler" and self.epsilon is not None:
            raise GGDAError("removal=sampler deletes the unit; epsilon applies to mask/weight only.")
        if self.path not in PATHS:
            raise GGDAError(f"Unknown path '{self.path}'; choose one of {', '.join(PATHS)}.")
        if self.kernel not in KERNELS:
            raise GGDAError(f"Unknown kernel '{self.kernel}'; choose one of {', '.join(KERNELS)}.")
        if self.dtype not in DTYPES:
            raise GGDAError(f"Unknown dtype '{self.dtype}'; choose one of {', '.join(DTYPES)}.")

    def train_config(self, seed: int) -> TrainConfig:
        """The :class:`TrainConfig` of one further-training run (what ``make_optimizer`` reads)."""
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=self.optimizer,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            seed=seed,
        )

    def seed_values(self) -> list[int]:
        return list(range(self.seed_offset, self.seed_offset + self.seeds))

    def resolved_epsilon(self, n: int) -> float:
        if self.removal == "mask":
            return 1.0 if self.epsilon is None else float(self.epsilon)
        if self.removal == "weight":
            return 1.0 / n if self.epsilon is None else float(self.epsilon)
        return 1.0

    def to_dict(self) -> dict:
        return asdict(self)
