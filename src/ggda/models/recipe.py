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

import functools
import hashlib
import inspect
import os
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


def _frozen_text(model: nn.Module) -> bool:
    """Whether ``model`` is a text classifier whose encoder is frozen (``ggda text-train --mode
    frozen``): its retrains then train the head on cached encoder features (exact, see
    :func:`ggda.models.text.fit_frozen`) instead of re-encoding every review every epoch."""
    spec = getattr(model, "ggda_spec", None)
    return getattr(spec, "name", None) == "minilm" and getattr(model, "train_layers", None) == 0


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
        if _frozen_text(model):  # same updates, on head inputs encoded once per process
            from ggda.models.text import fit_frozen

            fit_frozen(model, data, config, device=device, sample_weight=sample_weight, on_epoch=on_epoch)
            return
        train_model(model, data, config, device=device, sample_weight=sample_weight, on_epoch=on_epoch)

    def evaluate(self, model: nn.Module, test: Dataset, device: str = "cpu", batch_size: int = 1024) -> dict:
        if _frozen_text(model):  # the head on cached frozen-encoder features: the same logits
            from ggda.models.text import frozen_features

            E = frozen_features(model, test.X, device=device)
            features = Dataset(X=E, y=test.y, ids=test.ids, n_classes=test.n_classes, kind=test.kind)
            return super().evaluate(model.head, features, device, batch_size)
        return super().evaluate(model, test, device, batch_size)

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
        """Identity of the recipe for result stores: the code's names (or ``key``) and a digest of
        the hyper-parameters bound into the callables (``functools.partial`` arguments, a callable
        instance's fields), so two recipes that train differently never share stored results."""
        key = self.key or f"{_callable_name(self.model_factory)}|{_callable_name(self.train_fn)}"
        try:
            params = "|".join(_callable_state(fn) for fn in (self.model_factory, self.train_fn))
        except _Undescribable as exc:
            if self.key is None:
                raise GGDAError(
                    f"UserRecipe cannot tell the settings of {exc} apart; pass key='...' naming "
                    "the code and its hyper-parameters (change it whenever they change)."
                ) from None
            params = "key-only"  # the user's key stands for the settings
        user = hashlib.sha1(f"{key}|{params}".encode()).hexdigest()[:16]
        return {"user": user, "key": key, "params": hashlib.sha1(params.encode()).hexdigest()[:16]}


class _Undescribable(Exception):
    """A callable holds state whose value cannot be written down stably."""


def _callable_name(fn) -> str:
    fn = getattr(fn, "func", fn) if isinstance(fn, functools.partial) else fn
    if not (inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isclass(fn) or inspect.isbuiltin(fn)):
        fn = type(fn)  # a callable instance: its class
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _callable_state(fn, depth: int = 0) -> str:
    """What a callable was configured with: partial args/keywords (recursively), a bound method's
    instance, a callable instance's fields; plain functions and classes carry none."""
    if isinstance(fn, functools.partial):
        args = ",".join(_value_text(a, depth + 1) for a in fn.args)
        kwargs = ",".join(f"{k}={_value_text(v, depth + 1)}" for k, v in sorted(fn.keywords.items()))
        return f"partial({_callable_name(fn.func)};{_callable_state(fn.func, depth + 1)};{args};{kwargs})"
    if inspect.ismethod(fn):
        return _value_text(fn.__self__, depth + 1)
    if inspect.isfunction(fn) or inspect.isclass(fn) or inspect.isbuiltin(fn):
        return ""
    return _value_text(fn, depth + 1)


def _value_text(value, depth: int) -> str:
    """A stable text of a hyper-parameter value (arrays and tensors by content digest)."""
    if depth > 8:
        raise _Undescribable(type(value).__name__)
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return repr(value)
    if isinstance(value, os.PathLike):
        return repr(os.fspath(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_value_text(v, depth + 1) for v in value]
        return f"{type(value).__name__}({','.join(sorted(items) if isinstance(value, (set, frozenset)) else items)})"
    if isinstance(value, dict):
        return (
            "{"
            + ",".join(
                f"{_value_text(k, depth + 1)}:{_value_text(v, depth + 1)}"
                for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))
            )
            + "}"
        )
    if isinstance(value, (np.ndarray, np.generic, torch.Tensor)):
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        digest = hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]
        return f"array({arr.dtype},{arr.shape},{digest})"
    if (
        isinstance(value, (functools.partial,))
        or callable(value)
        and (
            inspect.isfunction(value)
            or inspect.isclass(value)
            or inspect.isbuiltin(value)
            or inspect.ismethod(value)
        )
    ):
        return f"{_callable_name(value)}[{_callable_state(value, depth + 1)}]"
    if isinstance(value, nn.Module):  # a module's identity is its class and weights
        state = {k: v for k, v in value.state_dict().items()}
        return f"{_callable_name(value)}{_value_text(state, depth + 1)}"
    if hasattr(value, "__dict__") or hasattr(value, "__slots__"):
        fields = dict(vars(value)) if hasattr(value, "__dict__") else {}
        for slot in getattr(type(value), "__slots__", ()):
            if hasattr(value, slot):
                fields[slot] = getattr(value, slot)
        return f"{_callable_name(value)}{_value_text(fields, depth + 1)}"
    raise _Undescribable(f"a {type(value).__name__} value")
