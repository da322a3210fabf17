"""Forward-hook capture of what modules see and produce, written once.

Why one place: layer-factor gradients read each hooked layer's input and the gradient at its
output, EK-FAC reads inputs and back-propagates cotangents to outputs, Grad-K-Means stops
autograd at the output layer, and representation methods read a layer's input or output. Each
wants the same hooks with one of three treatments of the output, and hooks must be removed on
every exit path.

Modes:
    ``record`` — outputs pass through unchanged (kept with their graph);
    ``probe`` — a zero tensor that requires grad is added to each output: its gradient is the
        gradient at the output, with no weight gradient formed and immune to in-place ops after
        the layer;
    ``leaf`` — each output is replaced by a detached leaf that requires grad: autograd stops at
        the layer, and the leaf's gradient is the gradient at the output.

Inputs are stored detached. A module called several times in one forward records every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

MODES = ("record", "probe", "leaf")


@dataclass
class Call:
    """One call of a hooked module: its (first) input, detached, and its output as treated."""

    input: torch.Tensor
    output: torch.Tensor


class Capture:
    """``with Capture(modules, mode) as cap: model(x)``; then ``cap.calls[i]`` lists module i's
    calls and ``cap.order`` every (module index, call) in execution order."""

    def __init__(self, modules: Sequence[nn.Module], mode: str = "record") -> None:
        if mode not in MODES:
            raise ValueError(f"Unknown capture mode '{mode}'; choose one of {', '.join(MODES)}.")
        self.modules, self.mode = list(modules), mode
        self.calls: list[list[Call]] = [[] for _ in self.modules]
        self.order: list[tuple[int, Call]] = []
        self._handles: list = []

    def _hook(self, i: int):
        def hook(module, args, out):
            x = args[0].detach() if args and isinstance(args[0], torch.Tensor) else None
            if not isinstance(out, torch.Tensor):
                call = Call(x, out)
                result = None
            elif self.mode == "probe":
                probe = torch.zeros_like(out, requires_grad=True)
                call, result = Call(x, probe), out + probe
            elif self.mode == "leaf":
                leaf = out.detach().requires_grad_(True)
                call, result = Call(x, leaf), leaf
            else:
                call, result = Call(x, out), None
            self.calls[i].append(call)
            self.order.append((i, call))
            return result

        return hook

    def __enter__(self) -> Capture:
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def last(self, i: int) -> Call:
        """Module i's last call (for modules called once per forward)."""
        return self.calls[i][-1]
