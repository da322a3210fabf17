"""Training recipes: how every evaluation that retrains, and the gold standard, get a trained model.

Why: counterfactual evaluations (retraining score, LDS, pruning) retrain "the same way, without
these points" hundreds of times, and the further-training gold standard continues training the
final model with and without a unit. With only ggda's zoo, a user's own model (a CNN with batch
norm, a Hugging Face classifier) or own training loop could not be evaluated. A
:class:`TrainingRecipe` is that contract: ``build(seed)`` a fresh model, ``fit(model, data,
seed, ...)`` it, and ``evaluate(model, test)`` it. :class:`ZooRecipe` is ggda's own
implementation (zoo model + :func:`~ggda.models.training.train_model`); :class:`UserRecipe`
wraps a user's model factory and plain PyTorch training function.

A user training function has the signature::

    def train(model, data, seed, epochs=None, on_epoch=None):
        # data: a map-style torch Dataset in the user's own item format (the kept examples)
        # seed: seeds shuffling (and anything else random) so paired runs are comparable
        # epochs: None = the recipe's own length; an int when the gold standard further-trains
        # on_epoch(epoch, model): call after every epoch when given (the gold standard records
        #   the property there)
        ...

Recipes are pickled to worker processes (local pool, Ray): factories and training functions must
be module-level functions (or picklable callables), not lambdas.
"""

from __future__ import annotations

import hashlib
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.models.calling import call_model
from ggda.models.losses import PerExampleLoss, loss_for
from ggda.models.training import TrainConfig, device_inputs, resolve_device, train_model
from ggda.models.zoo import ModelSpec, build_model

EpochHook = Callable[[int, nn.Module], None]


class TrainingRecipe(ABC):
    """Build, train and test a model: the one way ggda retrains (zoo or user code)."""

    #: Whether ``fit`` honours per-example ``sample_weight`` (the ``weight`` retraining mode).
    supports_weights: bool = False

    @abstractmethod
    def build(self, seed: int) -> nn.Module:
        """A freshly initialised model (initialisation seeded by ``seed``)."""

    @abstractmethod
    def fit(
        self,
        model: nn.Module,
        data: Dataset,
        seed: int,
        device: str = "cpu",
        epochs: int | None = None,
        on_epoch: EpochHook | None = None,
        sample_weight: np.ndarray | None = None,
    ) -> None:
        """Train ``model`` in place on ``data`` (shuffling seeded by ``seed``)."""

    @abstractmethod
    def loss(self, kind: str) -> PerExampleLoss:
        """The per-example loss used to test a retrained model."""

    @abstractmethod
    def describe(self) -> dict:
        """What changes the results (enters every result key)."""

    @torch.no_grad()
    def evaluate(self, model: nn.Module, test: Dataset, device: str = "cpu", batch_size: int = 1024) -> dict:
        """Per-test-example ``losses`` (T,) and, for classification, ``correct`` (T,) bool."""
        dev = resolve_device(device)
        model.to(dev).eval()
        dtype = next(model.parameters()).dtype
        X = device_inputs(test.X, dev, dtype)
        y = torch.as_tensor(test.y, device=dev)
        loss_fn = self.loss(test.kind)
        losses, correct = [], []
        for start in range(0, len(test), batch_size):
            out = call_model(model, X[start : start + batch_size])
            yb = y[start : start + batch_size]
            losses.append(loss_fn(out, yb).double().cpu())
            if test.kind == "classification":
                correct.append((out.argmax(-1) == yb).cpu())
        result = {"losses": torch.cat(losses).numpy()}
        if test.kind == "classification":
            result["correct"] = torch.cat(correct).numpy()
        return result

    def check_picklable(self) -> None:
        """A clear error when the recipe cannot reach worker processes."""
        try:
            pickle.dumps(self)
        except Exception as exc:  # lambdas, local functions, open handles
            raise GGDAError(
                f"The training recipe cannot be sent to worker processes ({type(exc).__name__}: {exc}); "
                "define the model factory and training function at module level, or use backend='serial'."
            ) from exc


@dataclass
class ZooRecipe(TrainingRecipe):
    """A zoo model trained by :func:`~ggda.models.training.train_model` (what ``ggda train`` does)."""

    model: ModelSpec
    config: TrainConfig = field(default_factory=TrainConfig)
    supports_weights = True

    def build(self, seed: int) -> nn.Module:
        return build_model(self.model, seed=int(seed))

    def fit(self, model, data, seed, device="cpu", epochs=None, on_epoch=None, sample_weight=None) -> None:
        config = replace(self.config, seed=int(seed), epochs=epochs or self.config.epochs)
        train_model(model, data, config, device=device, sample_weight=sample_weight, on_epoch=on_epoch)

    def loss(self, kind: str) -> PerExampleLoss:
        return loss_for(kind)

    def describe(self) -> dict:
        train = self.config.to_dict()
        train.pop("seed", None)  # every job sets its own
        train.pop("checkpoint_every", None)  # retrains write no checkpoints
        return {"model": self.model.to_dict(), "train": train}


@dataclass
class UserRecipe(TrainingRecipe):
    """A user's model factory and PyTorch training function (see the module docstring).

    Args:
        model_factory: ``seed -> nn.Module``, a fresh, seeded initialisation.
        train_fn: ``(model, data, seed, epochs=None, on_epoch=None) -> None``; ``data`` is a
            map-style torch ``Dataset`` of the kept examples in the user's own item format
            (:meth:`ggda.data.Dataset.as_torch`).
        loss: per-example test loss ``(outputs, targets) -> (B,)``; default ggda's loss for the
            data kind (softmax cross-entropy or ½ squared error).
        key: a version string for the code; results stored under another key are not reused
            (default: the functions' qualified names — change it when you change the code).
    """

    model_factory: Callable[[int], nn.Module]
    train_fn: Callable[..., Any]
    loss_fn: PerExampleLoss | None = None
    key: str | None = None

    def build(self, seed: int) -> nn.Module:
        model = self.model_factory(int(seed))
        if not isinstance(model, nn.Module):
            raise GGDAError(f"model_factory returned a {type(model).__name__}; return an nn.Module.")
        return model

    def fit(self, model, data, seed, device="cpu", epochs=None, on_epoch=None, sample_weight=None) -> None:
        if sample_weight is not None:
            raise GGDAError(
                "A user training function gets the kept examples, not weights; use mode='subset'."
            )
        model.to(resolve_device(device))
        kwargs = {}
        if epochs is not None:
            kwargs["epochs"] = int(epochs)
        if on_epoch is not None:
            kwargs["on_epoch"] = on_epoch
        self.train_fn(model, data.as_torch(), int(seed), **kwargs)

    def loss(self, kind: str) -> PerExampleLoss:
        return self.loss_fn or loss_for(kind)

    def describe(self) -> dict:
        def name(fn) -> str:
            return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"

        key = self.key or f"{name(self.model_factory)}|{name(self.train_fn)}"
        return {"user": hashlib.sha1(key.encode()).hexdigest()[:16], "key": key}
