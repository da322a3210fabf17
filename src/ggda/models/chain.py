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

import torch
from torch import nn

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
    nn.Identity,
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


def linear_chain(task: AttributionTask) -> LinearChain | None:
    """The chain structure of ``task.model`` when every attributed parameter belongs to it, else None."""
    model = task.model
    if type(model) is not nn.Sequential:
        return None
    mods = list(model.named_children())
    weights: list[str] = []
    biases: list[str | None] = []
    acts: list[nn.Module | None] = []
    shapes: list[tuple[int, int]] = []
    for name, mod in mods:
        if type(mod) is nn.Linear:  # exact type: a subclass may override forward
            weights.append(f"{name}.weight")
            biases.append(f"{name}.bias" if mod.bias is not None else None)
            acts.append(None)
            shapes.append((mod.out_features, mod.in_features))
        elif type(mod) in ELEMENTWISE:
            if not weights or acts[-1] is not None:
                return None  # activation first, or two activations in a row
            acts[-1] = mod
        else:
            return None
    if not weights or acts[-1] is not None:
        return None  # must end in a Linear layer (the outputs z are its pre-activations)
    attributed = set(task.param_names)
    expected = set(weights) | {b for b in biases if b}
    if attributed != expected:
        return None
    return LinearChain(weights, biases, acts, shapes)
