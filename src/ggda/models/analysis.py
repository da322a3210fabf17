"""One analysis of a task's model: which structure-exploiting paths may apply, decided in one place.

Why: several fast paths rest on the same facts about a model — layer-factor gradients and
EK-FAC's Kronecker blocks need every attributed parameter to sit in a plain ``nn.Linear`` or a
supported ``nn.Conv2d``; closed-form Gauss–Newton products and the stacked further-training
kernel need a plain Linear/activation chain; closed forms on the loss need its declared kind.
Deciding these once, with one set of rules, keeps the paths from disagreeing about a model.
(Whether the hooked modules really compute the gradients is still *verified* numerically per
task and function by :func:`ggda.gradients.fast_factors.fast_plan`.)

:func:`analyse` is cached per task object and parameter selection.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import nn

from ggda.models.chain import LinearChain, chain_or_reason

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def factor_kind(module: nn.Module) -> str | None:
    """``"linear"`` or ``"conv2d"`` when per-example gradients of ``module`` are outer products of
    its input (patches) and output gradient, else None.

    Exact types only (a subclass may override ``forward``); Conv2d with ``groups=1``, zero padding
    given as integers or ``"valid"`` (``"same"`` can be asymmetric, which ``unfold`` cannot express).
    """
    if type(module) is nn.Linear:
        return "linear"
    if type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros":
        if isinstance(module.padding, str) and module.padding != "valid":
            return None
        return "conv2d"
    return None


def conv_padding(module: nn.Conv2d):
    """The padding ``F.unfold`` takes for a supported convolution."""
    return 0 if module.padding == "valid" else module.padding


@dataclass
class FactorLayer:
    """A supported module holding attributed parameters (``weight``/``bias``: task parameter names)."""

    name: str
    module: nn.Module
    kind: str
    weight: str | None
    bias: str | None


@dataclass
class ModelAnalysis:
    """What a task's model allows.

    Attributes:
        factor_layers: the supported modules holding attributed parameters, in module order.
        unsupported: attributed parameters outside them (empty: layer factors cover the model).
        chain / chain_reason: the Linear/activation chain, or why the model is not one.
        loss_kind: the task's declared or recognised loss kind.
    """

    factor_layers: list[FactorLayer] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    chain: LinearChain | None = None
    chain_reason: str | None = None
    loss_kind: str = "custom"

    @property
    def factorisable(self) -> bool:
        """Every attributed parameter's per-example gradient comes from layer factors."""
        return bool(self.factor_layers) and not self.unsupported


def analyse(task) -> ModelAnalysis:
    """The :class:`ModelAnalysis` of ``task`` (cached per task object and parameter selection)."""
    key = (tuple(task.param_names), task.loss_kind, getattr(task, "gradients", "auto"))
    per_task = _CACHE.setdefault(task, {})
    if key not in per_task:
        per_task[key] = _analyse(task)
    return per_task[key]


def _analyse(task) -> ModelAnalysis:
    names = set(task.param_names)
    layers, covered = [], set()
    for mname, module in task.model.named_modules():
        kind = factor_kind(module)
        if kind is None:
            continue
        prefix = f"{mname}." if mname else ""
        weight = f"{prefix}weight" if f"{prefix}weight" in names else None
        bias = f"{prefix}bias" if module.bias is not None and f"{prefix}bias" in names else None
        if weight is None and bias is None:
            continue
        layers.append(FactorLayer(mname, module, kind, weight, bias))
        covered |= {weight, bias}
    unsupported = [n for n in task.param_names if n not in covered]
    if getattr(task, "gradients", "auto") != "auto":
        chain, why = None, "generic gradients requested"
    else:
        chain, why = chain_or_reason(task)
    return ModelAnalysis(layers, unsupported, chain, why, task.loss_kind)
