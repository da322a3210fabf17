"""A deterministic training loop that records checkpoints (TracInCP needs them).

Determinism: the initialisation seed and the shuffling seed are fixed, shuffling uses its own
``torch.Generator``, and CPU kernels are deterministic for these layers, so training twice with
the same seed yields bit-identical parameters on CPU.

``sample_weight`` lets evaluation and further-training code remove (weight 0) or re-weight
points while keeping every other point's batches exactly as in the reference run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ggda.data.batches import ExampleInputs, InputView
from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.models.calling import call_model
from ggda.models.checkpoint import Checkpoint, save_model
from ggda.models.losses import PerExampleLoss, loss_for
from ggda.progress import progress as progress_bar

OPTIMIZERS = ("sgd", "adam")


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 0  # epochs between saved checkpoints; 0 = about 5 checkpoints per run

    def __post_init__(self) -> None:
        from ggda.options import COUNT, NONNEG, NONNEG_INT, POSITIVE, Spec, check_fields

        if self.optimizer not in OPTIMIZERS:
            raise GGDAError(f"Unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}.")
        check_fields(
            self,
            {
                "epochs": COUNT,
                "batch_size": COUNT,
                "lr": POSITIVE,
                "momentum": Spec(float, 0, 1, high_open=True),
                "weight_decay": NONNEG,
                "seed": NONNEG_INT,
                "checkpoint_every": NONNEG_INT,
            },
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    model: nn.Module
    checkpoints: list[Checkpoint] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``; a clear error when CUDA is asked for but absent."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise GGDAError(f"Unknown device '{device}'; use cpu, cuda, cuda:N or auto.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GGDAError(f"Device '{device}' requested but CUDA is not available here; use --device cpu.")
    if dev.type not in ("cpu", "cuda"):
        raise GGDAError(f"Unsupported device '{device}'; use cpu, cuda, cuda:N or auto.")
    return dev


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's mini-batches of positions: a seeded permutation cut into chunks."""
    perm = torch.randperm(n, generator=generator)
    return list(perm.split(batch_size))


def train_model(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    loss_fn: PerExampleLoss | None = None,
    device: str | torch.device | None = "cpu",
    checkpoint_dir: str | Path | None = None,
    sample_weight: np.ndarray | None = None,
    progress: bool = False,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` and return it with its checkpoints.

    The objective per batch is ``sum_i w_i * loss_i / |batch|`` (w = 1 by default), so a point
    with weight 0 is removed without shifting anyone else's batch.
    """
    dev = resolve_device(device)
    loss_fn = loss_fn or loss_for(data.kind)
    model.to(dev)
    dtype = next(model.parameters()).dtype
    X = device_inputs(data.X, dev, dtype)
    y = torch.as_tensor(data.y, device=dev)
    w = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=dtype, device=dev)
    if w is not None and len(w) != len(data):
        raise GGDAError(f"sample_weight has {len(w)} entries for {len(data)} points; pass one per point.")
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    every = config.checkpoint_every or max(1, math.ceil(config.epochs / 5))
    result = TrainResult(model=model)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    step = 0
    epochs = progress_bar(range(1, config.epochs + 1), desc="train", disable=not progress, leave=False)
    for epoch in epochs:
        model.train()
        total, seen = 0.0, 0
        for batch in epoch_batches(len(data), config.batch_size, generator):
            batch = batch.to(dev)
            losses = loss_fn(call_model(model, X[batch]), y[batch])
            loss = (losses * w[batch]).sum() / len(batch) if w is not None else losses.mean()
            if not torch.isfinite(loss):
                raise GGDAError(
                    f"Training loss became {loss.item()} at epoch {epoch}, step {step}; "
                    + divergence_advice(data, config)
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total += float(losses.detach().sum())
            seen += len(batch)
        result.losses.append(total / max(seen, 1))
        if ckpt_dir is not None and (epoch % every == 0 or epoch == config.epochs):
            path = save_model(
                ckpt_dir / f"epoch_{epoch:04d}.pt",
                model,
                epoch=epoch,
                step=step,
                lr=float(optimizer.param_groups[0]["lr"]),
            )
            result.checkpoints.append(Checkpoint(path, epoch, step, float(optimizer.param_groups[0]["lr"])))
        epochs.set_postfix(
            loss=f"{result.losses[-1]:.4f}", refresh=False
        )  # drawn with the bar: not a log line per epoch
        if on_epoch is not None:  # e.g. the gold standard records its property here
            on_epoch(epoch, model)
            model.train()
    model.eval()
    return result


def divergence_advice(data: Dataset, config: TrainConfig) -> str:
    """What to change after a diverging loss: a lower learning rate always, standardising the
    features or the target only when they are not standardised already (advice to standardise
    what already is would send the user to the wrong knob)."""
    advice = [f"lower the learning rate (now {config.lr})"]
    if not data.lazy and len(data):
        X = np.asarray(data.X, dtype=np.float64)
        if np.abs(X.mean(axis=0)).max(initial=0.0) > 0.5 or X.std(axis=0).max(initial=0.0) > 5.0:
            advice.append("standardise the features")
    if data.kind == "regression" and len(data):
        y = np.asarray(data.y, dtype=np.float64)
        if abs(y.mean()) > 5.0 or y.std() > 5.0:
            advice.append("standardise the target (ggda train does it for you)")
    if len(advice) == 1 and config.optimizer == "sgd" and config.momentum > 0:
        advice.append(f"lower the momentum (now {config.momentum})")
    return " or ".join(advice) + "."


def device_inputs(X, device: torch.device, dtype: torch.dtype):
    """Training inputs on ``device``: the whole matrix for arrays, a batch-fetching view for lazy
    inputs (``X[rows]`` is a batch either way)."""
    if isinstance(X, ExampleInputs):
        return InputView(X, device, dtype)
    return torch.as_tensor(X, dtype=dtype, device=device)


@torch.no_grad()
def predict(
    model: nn.Module, X: np.ndarray, device: str | torch.device = "cpu", batch_size: int = 4096
) -> np.ndarray:
    """Model outputs for ``X`` (arrays or lazy inputs) in chunks (eval mode)."""
    dev = resolve_device(device)
    model.eval().to(dev)
    dtype = next(model.parameters()).dtype
    Xd = device_inputs(X, dev, dtype)
    outs = [call_model(model, Xd[i : i + batch_size]).cpu() for i in range(0, len(X), batch_size)]
    return torch.cat(outs).numpy() if outs else np.zeros((0,))


def accuracy(model: nn.Module, data: Dataset, device: str | torch.device = "cpu") -> float:
    out = predict(model, data.X, device)
    return float((out.argmax(1) == data.y).mean())


def regression_metrics(
    model: nn.Module, data: Dataset, device: str | torch.device = "cpu", mean: float = 0.0, scale: float = 1.0
) -> dict[str, float]:
    """Mean squared error and R² of a regression model on ``data``, in the original units.

    ``data.y`` and the model's outputs are on the standardised scale the model was trained on;
    ``mean``/``scale`` (the target scaler's) bring both back (y = y' · scale + mean) before the
    error is taken, so ``mse`` is in squared original units. R² = 1 − SSE/SST is scale-free.
    """
    out = np.asarray(predict(model, data.X, device), dtype=np.float64).reshape(len(data), -1)
    if out.shape[1] != 1:
        raise GGDAError(f"A regression model must output one value per example; it outputs {out.shape[1]}.")
    pred = out[:, 0] * scale + mean
    y = np.asarray(data.y, dtype=np.float64) * scale + mean
    sse = float(((pred - y) ** 2).sum())
    sst = float(((y - y.mean()) ** 2).sum())
    return {"mse": sse / max(len(y), 1), "r2": 1.0 - sse / sst if sst > 0 else float("nan")}
