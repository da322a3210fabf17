"""Recognise models that are a plain chain ``Linear → activation → Linear → … → Linear``.

Why: for such a model every product the methods need (Gauss–Newton-vector products, stacked
further-training steps) can be written as a handful of large matrix products over the layers,
with no autograd graph, no ``vmap`` and no per-operator overhead. Anything else (convolutions,
normalisation, a custom ``forward``, frozen layers) returns ``None`` and callers keep their
generic ``torch.func`` path.

The activation derivative is taken from autograd on the pre-activations, so any elementwise
activation module works (ReLU, Tanh, GELU, Sigmoid, LeakyReLU, SiLU, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # the task sits above the models; the chain only reads a task it is given
    from ggda.task import AttributionTask, Params

ELEMENTWISE = (
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.LeakyReLU,
    nn.SiLU,
    nn.ELU,
    nn.Softplus,
)


@dataclass
class LinearChain:
    """The layers of a chain model, in order.

    ``weights[k]`` / ``biases[k]`` are the task's parameter names of layer k (bias may be None);
    ``activations[k]`` is the module applied after layer k (None after the last layer).
    """

    weights: list[str]
    biases: list[str | None]
    activations: list[nn.Module | None]
    shapes: list[tuple[int, int]]  # (d_out, d_in) per layer

    @property
    def depth(self) -> int:
        return len(self.weights)

    def forward(
        self, params: Params, X: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor]:
        """(inputs a_l of every layer, activation derivatives σ'(s_l) (None after the last), outputs z)."""
        inputs, derivs = [], []
        a = X
        for k in range(self.depth):
            inputs.append(a)
            s = torch.nn.functional.linear(
                a, params[self.weights[k]], params[self.biases[k]] if self.biases[k] else None
            )
            act = self.activations[k]
            if act is None:
                derivs.append(None)
                a = s
                continue
            with torch.enable_grad():
                s_ = s.detach().requires_grad_(True)
                out = act(s_)
                (d,) = torch.autograd.grad(out.sum(), s_)
            derivs.append(d)
            a = out.detach()
        return inputs, derivs, a


def chain_or_reason(task: AttributionTask) -> tuple[LinearChain | None, str | None]:
    """(the chain, None) or (None, why ``task`` is not a plain Linear/activation chain).

    Refused: a task that overrides ``forward``/``losses``; a model that is neither a bare
    ``nn.Linear`` nor an ``nn.Sequential`` of exact ``nn.Linear`` and elementwise activation modules (``nn.Identity``
    and eval-mode ``nn.Dropout`` are skipped); hooks or parametrizations; a Linear layer used twice
    (shared weights); not every parameter attributed; an activation first, two in a row, or a
    model that does not end in a Linear layer.
    """
    from ggda.task import AttributionTask

    cls = type(task)
    if cls.forward is not AttributionTask.forward or cls.losses is not AttributionTask.losses:
        return None, "the task overrides forward/losses"
    model = task.model
    if type(model) is nn.Linear:  # a bare Linear layer (logistic/linear regression): a chain of one
        modules: list[tuple[str, nn.Module]] = [("", model)]
    elif type(model) is nn.Sequential:
        modules = list(model._modules.items())  # forward order, repeats included (named_children dedups)
    else:
        return None, f"the model is a {type(model).__name__}, not an nn.Sequential or nn.Linear"
    weights: list[str] = []
    biases: list[str | None] = []
    acts: list[nn.Module | None] = []
    shapes: list[tuple[int, int]] = []
    seen: list[nn.Module] = []
    for name, mod in modules:
        prefix = f"{name}." if name else ""
        if mod._forward_hooks or mod._forward_pre_hooks or getattr(mod, "parametrizations", None) is not None:
            return None, f"module {name} has hooks or parametrizations"
        if type(mod) is nn.Linear:  # exact type: a subclass may override forward
            if any(mod is other for other in seen):
                return None, f"module {name} repeats a Linear layer (shared weights)"
            seen.append(mod)
            weights.append(f"{prefix}weight")
            biases.append(f"{prefix}bias" if mod.bias is not None else None)
            acts.append(None)
            shapes.append((mod.out_features, mod.in_features))
        elif type(mod) is nn.Identity or (type(mod) is nn.Dropout and not mod.training):
            continue
        elif type(mod) in ELEMENTWISE:
            if not weights:
                return None, "the first module is not an nn.Linear"
            if acts[-1] is not None:
                return None, f"module {name}: two activations in a row"
            acts[-1] = mod
        else:
            return None, f"module {name} is a {type(mod).__name__}"
    if not weights or acts[-1] is not None:
        return None, "the model does not end in an nn.Linear"
    names = {n for n, _ in model.named_parameters()}
    if set(task.param_names) != names:
        return None, "not every parameter is attributed (layers=...)"
    return LinearChain(weights, biases, acts, shapes), None


def linear_chain(task: AttributionTask) -> LinearChain | None:
    """The chain structure of ``task.model`` (see :func:`chain_or_reason`), or None."""
    return chain_or_reason(task)[0]
