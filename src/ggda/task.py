"""The attribution task: *what* is attributed, separate from *how* (the methods).

An :class:`AttributionTask` holds the model, its per-example training loss and which parameters
attribution looks at (all trainable ones by default, or chosen layers). It exposes the model as a
pure function of a parameter dict, ``forward(params, X)``, which is what ``torch.func`` needs for
per-example and group gradients, HVPs and vmapped further training.

The *property function* f(θ) (GGDA Definition 3) lives in :mod:`ggda.properties`; tasks and
properties are combined by the methods.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from ggda.errors import GGDAError
from ggda.models.checkpoint import load_into, load_state
from ggda.models.losses import PerExampleLoss, loss_for
from ggda.models.training import resolve_device

Params = dict[str, torch.Tensor]


class AttributionTask:
    """Model + per-example training loss + the parameters attribution differentiates.

    Args:
        model: any ``nn.Module`` mapping a batch of flattened inputs to outputs.
        loss: per-example loss ``(outputs, targets) -> (B,)``, or ``"classification"``,
            ``"regression"``, ``"cross-entropy"``, ``"mse"``.
        layers: names (or name prefixes, e.g. ``"2"`` or ``"fc2"``) of the parameters to attribute
            through; the others are held fixed. Default: every trainable parameter.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.

    Subclass and override :meth:`forward` for models that need more than ``model(X)`` (dict
    inputs, attention masks).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: PerExampleLoss | str = "classification",
        layers: Iterable[str] | None = None,
        device: str | torch.device | None = "cpu",
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.loss_fn: PerExampleLoss = loss_for(loss) if isinstance(loss, str) else loss
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not named:
            raise GGDAError(
                "The model has no trainable parameters; unfreeze the layers to attribute through."
            )
        if layers is None:
            chosen = list(named)
        else:
            layers = list(layers)
            chosen = [n for n in named if any(n == s or n.startswith(s + ".") for s in layers)]
            if not chosen:
                raise GGDAError(f"No parameters match layers {layers}; choose from {list(named)}.")
        self.param_names: list[str] = chosen
        self.layers = None if layers is None else list(layers)
        self.dtype = next(self.model.parameters()).dtype

    # -- parameters ---------------------------------------------------------------------------
    def params(self) -> Params:
        """The attributed parameters, detached (a snapshot of the current model)."""
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.param_names}

    def fixed(self) -> dict[str, torch.Tensor]:
        """Everything the forward pass needs besides the attributed parameters."""
        state = {n: p.detach() for n, p in self.model.named_parameters() if n not in self.param_names}
        state.update({n: b for n, b in self.model.named_buffers()})
        return state

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params().values())

    def flatten(self, tensors: Params, batch_dims: int = 0) -> torch.Tensor:
        """Concatenate a parameter-shaped dict into vectors, in ``param_names`` order."""
        lead = None
        parts = []
        for n in self.param_names:
            t = tensors[n]
            lead = t.shape[:batch_dims]
            parts.append(t.reshape(*lead, -1))
        return torch.cat(parts, dim=batch_dims)

    def unflatten(self, vector: torch.Tensor) -> Params:
        out, start = {}, 0
        for n, p in self.params().items():
            out[n] = vector[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return out

    def layer_slices(self) -> dict[str, slice]:
        """Where each attributed parameter lives in the flat vector (per-layer methods use it)."""
        out, start = {}, 0
        for n, p in self.params().items():
            out[n] = slice(start, start + p.numel())
            start += p.numel()
        return out

    # -- functional model ---------------------------------------------------------------------
    def forward(self, params: Params, X: torch.Tensor) -> torch.Tensor:
        """Model outputs at ``params`` (attributed parameters; others fixed) for inputs ``X``."""
        return functional_call(self.model, {**self.fixed(), **params}, (X,))

    def losses(self, params: Params, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.forward(params, X), y)

    def to_tensor(self, X, y=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        Xt = torch.as_tensor(X, device=self.device)
        Xt = Xt.to(self.dtype) if Xt.is_floating_point() else Xt
        yt = None if y is None else torch.as_tensor(y, device=self.device)
        return Xt, yt

    # -- checkpoints --------------------------------------------------------------------------
    def at(self, state: dict | str | Path) -> AttributionTask:
        """The same task with the model at another state (a checkpoint path or a state dict)."""
        import copy

        if isinstance(state, (str, Path)):
            state = load_state(state)["state_dict"]
        model = copy.deepcopy(self.model)
        load_into(model, state, source="checkpoint")
        clone = copy.copy(self)
        clone.model = model.to(self.device).eval()
        return clone

    def describe(self) -> str:
        return f"{type(self.model).__name__}, {self.n_params:,} attributed parameters ({len(self.param_names)} tensors), {self.device}"
