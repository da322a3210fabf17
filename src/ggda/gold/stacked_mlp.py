"""Hand-written stacked forward + backward for R copies of a Linear/activation chain.

The vectorised engine's generic kernel is ``vmap(grad(objective))``. For the models gold-standard
further training mostly runs (the zoo's ``logreg``, ``mlp-s``, ``mlp-m``: an ``nn.Sequential`` of
``nn.Linear`` layers and elementwise activations) the same gradients can be written as a handful
of large matrix products over preallocated buffers, with none of autograd's or vmap's per-operator
bookkeeping and allocations:

- Activations are kept *feature-major* per run, ``(R, features, B)``, so every tensor is
  contiguous and every product is a plain GEMM or batched GEMM with transpose flags only.
- ``mask``/``weight`` mode: all runs read the same mini-batch, so the first layer of all R runs is
  ONE GEMM ``W1 (R·h, d) @ Xᵀ (d, B)`` and its weight gradient ONE GEMM ``dZ1 (R·h, B) @ X (B, d)``.
  Later layers are ``bmm`` over runs. Per-run sample weights only scale the rows of the loss
  gradient.
- ``sampler`` mode (per-run batches) and ``weight`` mode's extra term ``-ε Σ_{j∈unit} ℓ_j``
  (per-run inputs) use ``bmm`` for the first layer too; the extra term's gradients are accumulated
  into the batch term's (``baddbmm_``).
- Activation derivatives are ATen's own backward kernels (``threshold_backward``,
  ``tanh_backward``, ``gelu_backward`` ...), written in place, and the loss gradient is the one
  autograd forms for ``log_softmax`` + ``nll``, so the numbers agree with the generic path to
  rounding (tests: ``tests/gold/test_stacked_mlp.py``).

The kernel computes exactly :func:`ggda.gold.objective.objective`'s gradient for every run and
returns it with the objective values, like the ``vmap(grad(...))`` function it replaces;
the optimiser step, recording, forking and divergence handling stay in
:func:`ggda.gold.vectorised.train_vectorised`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ggda.buffers import storage_key
from ggda.models.analysis import analyse
from ggda.task import AttributionTask, Params

aten = torch.ops.aten


@dataclass(frozen=True)
class _Activation:
    """An elementwise activation: ``forward(z, out)`` and in-place ``backward(grad, z, a)``."""

    forward: Callable[[torch.Tensor, torch.Tensor], object]
    backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]
    #: the derivative needs only the output, so the activation may overwrite its input
    from_output: bool = False


def _activation(m: nn.Module) -> _Activation | None:
    """The kernels autograd itself uses for ``m`` (derivatives.yaml), or None if unsupported."""
    t = type(m)
    if t is nn.ReLU:
        return _Activation(
            lambda z, a: torch.clamp_min(z, 0, out=a),
            lambda g, z, a: aten.threshold_backward.grad_input(g, a, 0, grad_input=g),
            True,
        )
    if t is nn.Tanh:
        return _Activation(
            lambda z, a: torch.tanh(z, out=a),
            lambda g, z, a: aten.tanh_backward.grad_input(g, a, grad_input=g),
            True,
        )
    if t is nn.Sigmoid:
        return _Activation(
            lambda z, a: torch.sigmoid(z, out=a),
            lambda g, z, a: aten.sigmoid_backward.grad_input(g, a, grad_input=g),
            True,
        )
    if t is nn.GELU:
        ap = m.approximate
        return _Activation(
            lambda z, a: aten.gelu.out(z, approximate=ap, out=a),
            lambda g, z, a: aten.gelu_backward.grad_input(g, z, approximate=ap, grad_input=g),
        )
    if t is nn.SiLU:
        return _Activation(
            lambda z, a: aten.silu.out(z, out=a),
            lambda g, z, a: aten.silu_backward.grad_input(g, z, grad_input=g),
        )
    if t is nn.LeakyReLU:
        s = m.negative_slope
        return _Activation(
            lambda z, a: aten.leaky_relu.out(z, s, out=a),
            lambda g, z, a: aten.leaky_relu_backward.grad_input(g, z, s, False, grad_input=g),
        )
    if t is nn.ELU:
        al = m.alpha
        return _Activation(
            lambda z, a: aten.elu.out(z, al, 1, 1, out=a),
            lambda g, z, a: aten.elu_backward.grad_input(g, al, 1, 1, False, z, grad_input=g),
        )
    if t is nn.Softplus:
        beta, th = m.beta, m.threshold
        return _Activation(
            lambda z, a: aten.softplus.out(z, beta, th, out=a),
            lambda g, z, a: aten.softplus_backward.grad_input(g, z, beta, th, grad_input=g),
        )
    return None


SUPPORTED = "nn.Linear, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus"


@dataclass(frozen=True)
class _Linear:
    weight: str
    bias: str | None
    fin: int
    fout: int


def _parse(task: AttributionTask) -> tuple[list[_Linear | _Activation], str | None]:
    """(the chain of ops, None) or ([], why the model is not a plain Linear/activation chain).

    The structure comes from the model analysis (:mod:`ggda.models.analysis`, shared with the
    curvature products); this kernel adds: a cross-entropy or squared-error loss kind, no
    buffers, and a fused kernel for every activation.
    """
    analysis = analyse(task)
    if analysis.loss_kind not in ("cross-entropy", "squared-error"):
        return [], "the loss is not of kind cross-entropy or squared-error"
    if any(True for _ in task.model.buffers()):
        return [], "the model has buffers"
    chain, why = analysis.chain, analysis.chain_reason
    if chain is None:
        return [], why
    ops: list[_Linear | _Activation] = []
    for k in range(chain.depth):
        fout, fin = chain.shapes[k]
        ops.append(_Linear(chain.weights[k], chain.biases[k], fin, fout))
        module = chain.activations[k]
        if module is not None:
            act = _activation(module)
            if act is None:
                return [], f"module {type(module).__name__} has no fused kernel (supported: {SUPPORTED})"
            ops.append(act)
    if task.loss_kind == "squared-error" and chain.shapes[-1][0] != 1:
        return [], "squared error with more than one output"
    return ops, None


def ineligible_reason(task: AttributionTask) -> str | None:
    """Why :class:`StackedMLP` cannot run ``task`` (None: it can)."""
    return _parse(task)[1]


class StackedMLP:
    """Gradients of :func:`ggda.gold.objective.objective` for R stacked runs of a Linear chain.

    Call it like the vectorised engine's ``vmap(grad(objective, has_aux=True))``: stacked
    ``params`` (each ``(R, *shape)``, contiguous), the batch ``X`` (``(B, d)`` shared by every run,
    or ``(R, B, d)`` per run), ``y``, per-run sample ``weight`` ``(R, B)`` and ``divisor`` ``(R,)``,
    and optionally ``weight`` mode's per-run extra points ``Xe (R, m, d)``, ``ye``, ``coef (R, m)``.
    Returns ``(grads, obj)``; ``grads`` are views of buffers reused by the next call (the optimiser
    may update them in place).

    Args:
        task: an eligible task (:func:`ineligible_reason` is None).
        capacity: the most runs a call will stack (buffers are allocated once for it, and a call
            with fewer runs uses their leading rows, so a growing stack never reallocates).
        block: runs per forward/backward sweep. The sweep's activations, weights and gradients of
            ``block`` runs stay in cache between the layers; the whole stack at once would stream
            tens of MB through memory several times per step.
    """

    def __init__(self, task: AttributionTask, capacity: int = 0, block: int = 0) -> None:
        ops, why = _parse(task)
        if why is not None:
            raise ValueError(f"StackedMLP cannot run this task: {why}")
        self.ops = ops
        self.classification = task.loss_kind == "cross-entropy"
        self.block = block or default_block(task)
        self.inplace = True  # activations that allow it overwrite the Linear output (benchmarks toggle it)
        self._cap = capacity
        self._grads: Params = {}
        self._buffers: dict[tuple, dict] = {}
        self._views: dict[tuple, list] = {}

    # -- buffers --------------------------------------------------------------------------------
    def _grad_buffers(self, params: Params, R: int) -> Params:
        if R > self._cap or not self._grads:
            self._cap = max(R, self._cap)
            self._grads = {
                k: torch.empty(self._cap, *v.shape[1:], dtype=v.dtype, device=v.device)
                for k, v in params.items()
            }
            self._buffers, self._views = {}, {}
        return {k: v[:R] for k, v in self._grads.items()}

    def _work(self, W: int, like: torch.Tensor, key: str) -> dict:
        """Activation and activation-gradient buffers (capacity, features, W) of one batch width."""
        buf = self._buffers.get((key, W))
        if buf is None:
            new = lambda f: torch.empty(self._cap, f, W, dtype=like.dtype, device=like.device)  # noqa: E731
            outs, grads = [], []
            width = self.ops[0].fin
            for i, op in enumerate(self.ops):
                if isinstance(op, _Linear):
                    grads.append(new(op.fin) if i > 0 else None)
                    width = op.fout
                else:
                    grads.append(None)
                if (
                    self.inplace
                    and not isinstance(op, _Linear)
                    and op.from_output
                    and isinstance(self.ops[i - 1], _Linear)
                ):
                    outs.append(outs[-1])  # overwrite the Linear's output: its backward never reads it
                else:
                    outs.append(new(width))
            buf = {"outs": outs, "grads": grads, "top": new(width)}
            self._buffers[(key, W)] = buf
        return buf

    # -- the kernel -----------------------------------------------------------------------------
    def __call__(
        self,
        params: Params,
        X: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor,
        divisor: torch.Tensor,
        Xe: torch.Tensor | None = None,
        ye: torch.Tensor | None = None,
        coef: torch.Tensor | None = None,
    ) -> tuple[Params, torch.Tensor]:
        R = weight.shape[0]
        grads = self._grad_buffers(params, R)
        # d obj / d ℓ_b = weight_b / divisor (the order autograd applies ``sum() / divisor``)
        scale = weight * (1.0 / divisor)[:, None]
        losses = self._pass(params, grads, X, y, scale, "batch", accumulate=False)
        obj = (losses * weight).sum(-1) / divisor
        if Xe is not None:
            extra = self._pass(params, grads, Xe, ye, -coef, "extra", accumulate=True)
            obj = obj - (extra * coef).sum(-1)
        return grads, obj

    def _pass(
        self,
        params: Params,
        grads: Params,
        X: torch.Tensor,
        y: torch.Tensor,
        scale: torch.Tensor,
        key: str,
        accumulate: bool,
    ) -> torch.Tensor:
        """Forward + backward of ``Σ_b scale_rb ℓ_rb`` for every run r, ``block`` runs at a time;
        returns the losses (R, B). With ``accumulate`` the gradients are added to ``grads``."""
        shared = X.ndim == 2
        R, W = scale.shape
        blocks = self._blocks(params, grads, R, W, X, f"{key}{'s' if shared else 'r'}")
        # shared: (d, B) contiguous for the one-GEMM first layer; per run: (R, d, B) views
        Xt = X.t().contiguous() if shared else X.transpose(1, 2)
        losses = []
        for a, b, layers, top in blocks:
            losses.append(
                self._sweep(
                    layers,
                    top,
                    X if shared else X[a:b],
                    Xt if shared else Xt[a:b],
                    y if y.ndim == 1 else y[a:b],
                    scale[a:b],
                    accumulate,
                )
            )
        return losses[0] if len(losses) == 1 else torch.cat(losses)

    def _blocks(self, params: Params, grads: Params, R: int, W: int, like: torch.Tensor, key: str) -> list:
        """Per block of runs: (start, stop, per-op views, loss-gradient buffer), cached.

        Building ~40 views per block costs more than a block's small operations, so they are
        made once per (stack size, batch width, parameter storage) and reused every step.
        """
        ck = (key, W, R, storage_key(params.values()))
        blocks = self._views.get(ck)
        if blocks is not None:
            return blocks
        if len(self._views) > 256:
            self._views.clear()
        work = self._work(W, like, key)
        blocks = []
        for a in range(0, R, self.block):
            b = min(R, a + self.block)
            n = b - a
            layers = []
            for i, op in enumerate(self.ops):
                out = work["outs"][i][a:b]
                if not isinstance(op, _Linear):
                    layers.append(_LayerViews(op, out))
                    continue
                w = params[op.weight][a:b]
                bias = params[op.bias][a:b] if op.bias is not None else None
                gw = grads[op.weight][a:b]
                v = _LayerViews(
                    op,
                    out,
                    w=w,
                    wt=w.transpose(1, 2),
                    b=None if bias is None else bias.unsqueeze(-1),
                    gw=gw,
                    gb=None if bias is None else grads[op.bias][a:b],
                    gin=None if work["grads"][i] is None else work["grads"][i][a:b],
                )
                if i == 0:  # the one-GEMM forms over all runs of the block
                    v.w2 = w.view(n * op.fout, op.fin)
                    v.b2 = None if bias is None else bias.reshape(n * op.fout, 1)
                    v.out2 = out.view(n * op.fout, W)
                    v.gw2 = gw.view(n * op.fout, op.fin)
                layers.append(v)
            blocks.append((a, b, layers, work["top"][a:b]))
        self._views[ck] = blocks
        return blocks

    def _sweep(
        self,
        layers: list[_LayerViews],
        g: torch.Tensor,
        X: torch.Tensor,
        Xt: torch.Tensor,
        y: torch.Tensor,
        scale: torch.Tensor,
        accumulate: bool,
    ) -> torch.Tensor:
        """Forward, loss and backward of one block of runs; returns its losses (r, B)."""
        shared = X.ndim == 2
        R, W = scale.shape
        a = Xt
        for i, v in enumerate(layers):
            op = v.op
            if isinstance(op, _Linear):
                if i == 0 and shared:  # all runs' first layers: one GEMM against the shared batch
                    if v.b is None:
                        torch.mm(v.w2, a, out=v.out2)
                    else:
                        torch.addmm(v.b2, v.w2, a, out=v.out2)
                elif v.b is None:
                    torch.bmm(v.w, a, out=v.out)
                else:
                    torch.baddbmm(v.b, v.w, a, out=v.out)
            else:
                op.forward(a, v.out)
            a = v.out
        # loss and its gradient wrt the outputs (R, C, W)
        s = scale.unsqueeze(1)
        if self.classification:
            logp = F.log_softmax(a, dim=1)
            yi = (y.view(1, 1, W).expand(R, 1, W) if y.ndim == 1 else y.unsqueeze(1)).long()
            losses = -logp.gather(1, yi).squeeze(1)  # (R, W)
            # autograd's log_softmax backward of nll: grad = exp(logp)·s - onehot·s
            torch.exp(logp, out=g)
            g.mul_(s)
            g.scatter_add_(1, yi, -s)
        else:
            target = y.to(a.dtype)
            target = target.view(1, 1, W) if target.ndim == 1 else target.unsqueeze(1)
            diff = a - target
            losses = 0.5 * diff.square().squeeze(1)
            torch.mul(diff, s, out=g)
        # backward
        for i in range(len(layers) - 1, -1, -1):
            v = layers[i]
            op = v.op
            a_in = Xt if i == 0 else layers[i - 1].out
            if not isinstance(op, _Linear):
                op.backward(g, a_in, v.out)
                continue
            if i == 0 and shared:  # all runs' first-layer weight gradients: one GEMM
                g2 = g.view(R * op.fout, W)
                if accumulate:
                    v.gw2.addmm_(g2, X)
                else:
                    torch.mm(g2, X, out=v.gw2)
            elif accumulate:
                v.gw.baddbmm_(g, a_in.transpose(1, 2))
            else:
                torch.bmm(g, a_in.transpose(1, 2), out=v.gw)
            if v.gb is not None:
                if accumulate:
                    v.gb.add_(g.sum(-1))
                else:
                    torch.sum(g, -1, out=v.gb)
            if i > 0:
                torch.bmm(v.wt, g, out=v.gin)
                g = v.gin
        return losses


@dataclass
class _LayerViews:
    """One op's buffers for one block of runs (views into the stacked tensors)."""

    op: _Linear | _Activation
    out: torch.Tensor
    w: torch.Tensor | None = None
    wt: torch.Tensor | None = None
    b: torch.Tensor | None = None
    gw: torch.Tensor | None = None
    gb: torch.Tensor | None = None
    gin: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    out2: torch.Tensor | None = None
    gw2: torch.Tensor | None = None


def default_block(task: AttributionTask) -> int:
    """Runs per sweep: about BLOCK_BYTES of weights, gradients and batch activations per thread.

    More threads split each product of a block, so a block grows with them to keep every
    thread's share (and the per-block Python overhead) the same. On a GPU there is no cache to
    fit and every launch costs, so all runs are one block.
    """
    if task.device.type != "cpu":
        return 1 << 30
    per_run = 0
    for op in _parse(task)[0]:
        if isinstance(op, _Linear):
            per_run += 2 * op.fin * op.fout + 4 * op.fout * 128
    size = torch.finfo(task.dtype).bits // 8
    budget = BLOCK_BYTES * max(1, torch.get_num_threads())
    return max(1, min(256, budget // max(1, per_run * size)))


#: Working set aimed at per sweep: well inside a server CPU's L3 cache, so a block's activations
#: and weights are still cached when the sweep comes back through them (16 runs of a 100-128-128-2
#: MLP in float32; measured best between 8 and 32 on a 32 MB-L3 EPYC, see docs/gold.md).
BLOCK_BYTES = 12 << 20
