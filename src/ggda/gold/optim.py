"""SGD (+momentum, weight decay) and Adam written functionally for R stacked runs.

The vectorised path keeps every run's parameters in one tensor per parameter name, with a leading
run dimension. These updates repeat ``torch.optim.SGD`` / ``torch.optim.Adam`` (single-tensor
implementation, the CPU default) operation for operation, so the stacked path and the sequential
path (which uses ``make_optimizer``) agree to rounding; ``tests/gold`` checks it.

Runs can be *inactive* for a step (``sampler`` mode: a run whose epoch has fewer batches). An
inactive run's parameters, momentum and Adam step count stay untouched, as if the step did not
exist — the same as a sequential run that simply has fewer steps.
"""

from __future__ import annotations

import torch

from ggda.gold.config import GoldConfig

Stacked = dict[str, torch.Tensor]

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam defaults, which make_optimizer uses
ADAM_EPS = 1e-8


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


class StackedOptimizer:
    """A fresh optimiser state for R runs (FiMO: no optimiser state comes with θ^f)."""

    def __init__(self, config: GoldConfig, params: Stacked, capacity: int = 0) -> None:
        """``capacity``: rows reserved for runs added later by :meth:`fork`, so a growing stack's
        state is copied in place instead of concatenated (reallocated) at every fork."""
        self.kind, self.lr = config.optimizer, config.lr
        self.momentum, self.weight_decay = config.momentum, config.weight_decay
        R = next(iter(params.values())).shape[0]
        self.steps = [0] * R
        self._cap = max(R, capacity)
        self._full: dict[str, Stacked] = {}  # state name -> full-capacity tensors

        def zeros(name: str) -> Stacked:
            self._full[name] = {
                k: torch.zeros(self._cap, *v.shape[1:], dtype=v.dtype, device=v.device)
                for k, v in params.items()
            }
            return {k: v[:R] for k, v in self._full[name].items()}

        if self.kind == "sgd":
            self.buf = zeros("buf") if self.momentum else None
        else:
            self.m = zeros("m")
            self.v = zeros("v")

    def fork(self, source: int, count: int) -> None:
        """Append ``count`` runs whose optimiser state is a copy of run ``source``'s."""
        R, new = len(self.steps), len(self.steps) + count
        self.steps = self.steps + [self.steps[source]] * count
        for name, full in self._full.items():
            state = getattr(self, name)
            for k, v in state.items():
                if new <= self._cap:
                    full[k][R:new] = v[source : source + 1]
                    state[k] = full[k][:new]
                else:
                    state[k] = full[k] = torch.cat([v, v[source : source + 1].expand(count, *v.shape[1:])])
        self._cap = max(self._cap, new)

    @torch.no_grad()
    def step(
        self, params: Stacked, grads: Stacked, active: torch.Tensor | None = None, scratch: bool = False
    ) -> None:
        """Update ``params`` in place; rows with ``active == False`` are left as they are.

        ``scratch``: ``grads`` may be overwritten (the caller's gradient buffers), which saves
        temporaries.
        """
        act = None if active is None else active.to(next(iter(params.values())).device)
        flags = [True] * len(self.steps) if active is None else active.tolist()
        self.steps = [t + 1 if a else t for t, a in zip(self.steps, flags, strict=True)]
        if act is None:
            self._step_inplace(params, grads, scratch)
            return
        for k, p in params.items():
            g = grads[k]
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if self.kind == "sgd":
                if self.buf is not None:
                    buf = self.buf[k]
                    new_buf = buf.mul(self.momentum).add_(g)
                    new_buf = torch.where(_rows(act, buf), new_buf, buf)
                    buf.copy_(new_buf)
                    g = buf
                new_p = p.add(g, alpha=-self.lr)
            else:
                new_p = self._adam(k, p, g, act)
            new_p = torch.where(_rows(act, p), new_p, p)
            p.copy_(new_p)

    def _step_inplace(self, params: Stacked, grads: Stacked, scratch: bool) -> None:
        """Every run steps: the same operations as :meth:`step`, fused in place (no temporaries
        but Adam's denominator), which matters when the gradient kernel itself is cheap."""
        b1, b2 = ADAM_BETAS
        steps = set(max(t, 1) for t in self.steps)
        for k, p in params.items():
            g = grads[k]
            if self.weight_decay:
                g = g.add_(p, alpha=self.weight_decay) if scratch else g.add(p, alpha=self.weight_decay)
            if self.kind == "sgd":
                if self.buf is not None:
                    g = self.buf[k].mul_(self.momentum).add_(g)
                p.add_(g, alpha=-self.lr)
                continue
            m, v = self.m[k], self.v[k]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            if len(steps) == 1:
                t = next(iter(steps))
                denom = torch.sqrt(v, out=g) if scratch else v.sqrt()
                denom.div_((1 - b2**t) ** 0.5).add_(ADAM_EPS)
                p.addcdiv_(m, denom, value=-self.lr / (1 - b1**t))
            else:
                p.copy_(self._adam_update(p, m, v))

    def _adam(self, k: str, p: torch.Tensor, g: torch.Tensor, act: torch.Tensor | None) -> torch.Tensor:
        b1, b2 = ADAM_BETAS
        m = torch.lerp(self.m[k], g, 1 - b1)
        v = self.v[k].mul(b2).addcmul_(g, g, value=1 - b2)
        if act is not None:
            m = torch.where(_rows(act, p), m, self.m[k])
            v = torch.where(_rows(act, p), v, self.v[k])
        self.m[k].copy_(m)
        self.v[k].copy_(v)
        return self._adam_update(p, self.m[k], self.v[k])

    def _adam_update(self, p: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b1, b2 = ADAM_BETAS
        steps = [max(t, 1) for t in self.steps]
        if len(set(steps)) == 1:  # python floats, exactly as torch.optim.Adam computes them
            t = steps[0]
            step_size = self.lr / (1 - b1**t)
            bc2_sqrt = (1 - b2**t) ** 0.5
            denom = (v.sqrt() / bc2_sqrt).add_(ADAM_EPS)
            return p.addcdiv(m, denom, value=-step_size)
        step_size = torch.tensor([self.lr / (1 - b1**t) for t in steps], dtype=p.dtype, device=p.device)
        bc2_sqrt = torch.tensor([(1 - b2**t) ** 0.5 for t in steps], dtype=p.dtype, device=p.device)
        denom = (v.sqrt() / _rows(bc2_sqrt, v)).add_(ADAM_EPS)
        return p - _rows(step_size, p) * (m / denom)
