"""Per-layer gradient factors from one forward/backward: the basis of every fast gradient path.

For a layer ``out = W a + b`` applied to example i (at L positions: L = 1 for an MLP's
``nn.Linear``, L = H'·W' for an ``nn.Conv2d`` through ``F.unfold``) the per-example gradient is

    ∇_W ℓ_i = Σ_l δ_{i,l} a_{i,l}ᵀ,        ∇_b ℓ_i = Σ_l δ_{i,l},

with ``a`` the layer input and ``δ = ∂ℓ_i/∂out`` the output gradient. One forward and *one*
backward of the summed loss over a batch give every ``a_i`` and ``δ_i`` (the loss is a sum of
per-example terms, so ``∂(Σ_k ℓ_k)/∂out_i = ∂ℓ_i/∂out_i``). From these factors:

* a group gradient is ``Σ_{i∈S} Σ_l δ_{i,l} a_{i,l}ᵀ`` — one (batched) matrix product per layer
  instead of a backward per group (:mod:`ggda.gradients.fast_group`);
* per-example gradients are outer products, without ``vmap`` overhead;
* inner products of two per-example gradients factorise, ``⟨δ aᵀ, δ' a'ᵀ⟩ = (δᵀδ')(aᵀa')`` for
  L = 1, so Grad-Dot never materialises n × p gradients (:mod:`ggda.gradients.fast_inner`).

The output gradients are read from zero "probe" tensors added to each layer's output (the
gradient w.r.t. the probe is δ), so no weight gradient is formed by autograd and in-place
activations after the layer cannot corrupt the capture.

Supported: ``nn.Linear`` (any leading dims) and ``nn.Conv2d`` (``groups=1``, zero padding),
called any number of times per forward. Anything else among the attributed parameters (a custom
module, LayerNorm, embeddings, a subclass with its own ``forward``) makes :func:`plan_layers`
return ``None`` and the callers use the generic ``torch.func`` path. Before trusting the fast
path on a task, :func:`verify` compares it with ``vmap(grad)`` on a few examples processed
*together*, which also catches models whose examples interact within a batch (e.g. batch norm in
training mode) or forwards that bypass the modules; on a mismatch the generic path is used.

``AttributionTask(..., gradients="generic")`` forces the generic path (benchmarks compare both).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ggda.data.batches import input_signature, take, unsqueeze
from ggda.models.analysis import analyse, conv_padding
from ggda.models.capture import Capture
from ggda.task import AttributionTask, Params

ExampleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LayerSpec:
    """One supported module whose parameters are (partly) attributed."""

    module: nn.Module
    kind: str  # "linear" | "conv2d"
    weight: str | None  # task parameter name of the weight, if attributed
    bias: str | None  # task parameter name of the bias, if attributed
    d_in: int  # columns of the flattened weight (in_features, or C_in·kh·kw)
    d_out: int


@dataclass
class LayerPlan:
    """Which modules to hook, and where their gradients go in the flat parameter vector."""

    layers: list[LayerSpec]
    slices: dict[str, slice]
    n_params: int
    row_bytes: int = 0  # factor memory per example (set by verify); convolutions unfold to L × d_in

    def max_rows(self, budget_mb: float = 256.0) -> int:
        """Rows per forward chunk so the factors of a chunk stay under ``budget_mb``."""
        return max(1, int(budget_mb * 2**20 // max(1, self.row_bytes)))


def plan_layers(task: AttributionTask) -> LayerPlan | None:
    """A hook plan when every attributed parameter is a Linear/Conv2d weight or bias, else None
    (the model analysis of :mod:`ggda.models.analysis` decides which modules qualify)."""
    analysis = analyse(task)
    if not analysis.factorisable:
        return None
    layers = [
        LayerSpec(
            ly.module, ly.kind, ly.weight, ly.bias, ly.module.weight[0].numel(), ly.module.weight.shape[0]
        )
        for ly in analysis.factor_layers
    ]
    return LayerPlan(layers, task.layer_slices(), task.n_params)


@dataclass
class Factors:
    """Per-layer factors of a batch: ``A[l]`` (B, L, d_in) inputs, ``D[l]`` (B, L, d_out) output grads.

    ``values`` (B,) holds the per-example function values of the same forward pass, when known
    (TRAK reads its residual weights from them instead of running another forward).
    """

    A: list[torch.Tensor | None]
    D: list[torch.Tensor]
    values: torch.Tensor | None = None
    #: per layer, for convolutions captured with ``unfold=False``: the (input, output gradient)
    #: of every call as 4-D tensors, and ``A[l]`` is None (see :func:`conv_weight_sums`)
    conv: list[list[tuple[torch.Tensor, torch.Tensor]] | None] | None = None

    def rows(self, r0: int, r1: int) -> Factors:
        """The factors of rows ``r0:r1`` (views)."""
        conv = None
        if self.conv is not None:
            conv = [None if c is None else [(x[r0:r1], g[r0:r1]) for x, g in c] for c in self.conv]
        return Factors(
            [None if a is None else a[r0:r1] for a in self.A], [d[r0:r1] for d in self.D], None, conv
        )

    def index_rows(self, idx: torch.Tensor) -> Factors:
        """The factors of rows ``idx``, where index ``B`` (one past the last row) is a zero row."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(1, *t.shape[1:])]).index_select(0, idx)

        conv = None
        if self.conv is not None:
            conv = [None if c is None else [(pick(x), pick(g)) for x, g in c] for c in self.conv]
        return Factors(
            [None if a is None else pick(a) for a in self.A], [pick(d) for d in self.D], None, conv
        )


def conv_weight_sums(
    module: nn.Conv2d, calls: list[tuple[torch.Tensor, torch.Tensor]], k: int
) -> torch.Tensor:
    """(k, C_out, C_in·kh·kw): the weight gradient summed over each of k groups of consecutive
    rows (equal sizes), from the layer's raw inputs and output gradients.

    Why not unfold: ``F.unfold`` copies every input kh·kw times and the (k, s·L, ·) products
    then run as small ``bmm``s; the k groups are instead the ``groups`` of one grouped
    convolution weight-gradient (the rows of group j become channels block j), which is the
    backend's own weight-gradient kernel on inputs of the original size (3–10× faster on the
    ResNet of ``benchmarks/bench_group_models.py``), and exactly Σ_{i∈S} Σ_l δ_{i,l} a_{i,l}ᵀ.
    """
    total = None
    for x, g in calls:
        s = x.shape[0] // k
        if s == 1:  # per-example gradients: every row is its own group, no transpose needed
            xg, gg = x.reshape(1, -1, *x.shape[2:]), g.reshape(1, -1, *g.shape[2:])
        else:
            xg = x.reshape(k, s, *x.shape[1:]).transpose(0, 1).reshape(s, -1, *x.shape[2:])
            gg = g.reshape(k, s, *g.shape[1:]).transpose(0, 1).reshape(s, -1, *g.shape[2:])
        w = torch.nn.grad.conv2d_weight(
            xg,
            (k * module.out_channels, module.in_channels, *module.kernel_size),
            gg,
            module.stride,
            conv_padding(module),
            module.dilation,
            groups=k,
        )
        total = w if total is None else total.add_(w)
    return total.reshape(k, module.out_channels, -1)


def _unfold(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    cols = F.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=conv_padding(module), stride=module.stride
    )
    return cols.transpose(1, 2)  # (B, L, C_in·kh·kw)


def layer_factors(
    task: AttributionTask,
    plan: LayerPlan,
    X: torch.Tensor,
    y: torch.Tensor,
    fn: ExampleFn,
    params: Params,
    weights: torch.Tensor | None = None,
    unfold: bool = True,
) -> Factors:
    """One forward + one backward of Σ_i w_i fn(z_i) over the batch; returns the layer factors.

    ``weights`` (B,) scale each example's δ (a 0/1 mask drops padding rows). ``unfold=False``
    keeps convolutions' raw inputs and output gradients (``Factors.conv``) instead of unfolding
    the inputs into patches, for consumers that only need weight-gradient sums
    (:func:`conv_weight_sums`).
    """
    with Capture([spec.module for spec in plan.layers], mode="probe") as cap, torch.enable_grad():
        values = fn(task.forward(params, X), y)
        total = values.sum() if weights is None else (values * weights).sum()
        flat = [call.output for calls in cap.calls for call in calls]
        grads = torch.autograd.grad(total, flat, allow_unused=True) if flat else ()
    A, D, conv, k = [], [], [], 0
    B = len(y)
    for i, spec in enumerate(plan.layers):
        a_parts, d_parts, raw = [], [], []
        for call in cap.calls[i]:
            x, probe = call.input, call.output
            g = grads[k]
            k += 1
            g = torch.zeros_like(probe) if g is None else g.detach()
            if spec.kind == "conv2d":
                if unfold:
                    a_parts.append(_unfold(spec.module, x))
                else:
                    raw.append((x.detach(), g))
                d_parts.append(g.reshape(B, g.shape[1], -1).transpose(1, 2))  # (B, L, C_out)
            else:
                a_parts.append(x.reshape(x.shape[0], -1, x.shape[-1]))
                d_parts.append(g.reshape(B, -1, g.shape[-1]))
        if not d_parts:  # layer not reached: zero gradient
            a_parts = [torch.zeros(B, 1, spec.d_in, dtype=task.dtype, device=task.device)]
            d_parts = [torch.zeros(B, 1, spec.d_out, dtype=task.dtype, device=task.device)]
        conv.append(raw or None)
        A.append(None if raw else torch.cat(a_parts, 1) if len(a_parts) > 1 else a_parts[0])
        D.append(torch.cat(d_parts, 1) if len(d_parts) > 1 else d_parts[0])
    return Factors(A, D, values.detach(), None if unfold else conv)


def per_example_from_factors(
    plan: LayerPlan, factors: Factors, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, p) flat per-example gradients from factors (outer products, summed over positions)."""
    B = factors.A[0].shape[0]
    ref = factors.A[0]
    if out is None:
        out = torch.empty(B, plan.n_params, dtype=ref.dtype, device=ref.device)
    for spec, a, d in zip(plan.layers, factors.A, factors.D, strict=True):
        if spec.weight is not None:
            w = out[:, plan.slices[spec.weight]].view(B, spec.d_out, spec.d_in)  # strided, no temporary
            if a.shape[1] == 1:
                torch.mul(d[:, 0, :, None], a[:, 0, None, :], out=w)
            else:
                torch.bmm(d.transpose(1, 2), a, out=w)
        if spec.bias is not None:
            out[:, plan.slices[spec.bias]] = d.sum(1)
    return out


_VERIFIED: dict[tuple, bool] = {}
_VERIFIED_TASKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # task -> {key: (ok, row_bytes)}


def verify(
    task: AttributionTask,
    plan: LayerPlan,
    X: torch.Tensor,
    y: torch.Tensor,
    fn: ExampleFn,
    params: Params,
    rows: int = 3,
) -> bool:
    """Check the fast factors against ``vmap(grad)`` on a few examples taken *together*.

    A mismatch means the model is not a plain composition of the hooked modules applied per
    example (batch interactions, a forward that bypasses the modules, ...): warn and report it so
    the caller uses the generic path.
    """
    from torch.func import grad, vmap

    m = min(rows, len(y))
    if m == 0:
        return True
    Xs, ys = take(X, slice(0, m)), y[:m]  # a batch (tensor, tuple or dict), whatever X is
    factors = layer_factors(task, plan, Xs, ys, fn, params)
    plan.row_bytes = sum(t[0].numel() * t.element_size() for t in factors.A + factors.D)
    fast = per_example_from_factors(plan, factors)

    def value(p, x, t):
        return fn(task.forward(p, unsqueeze(x)), t[None])[0]

    try:
        ref = task.flatten(vmap(grad(value), in_dims=(None, 0, 0))(params, Xs, ys), batch_dims=1)
    except RuntimeError:  # fn not vmappable (data-dependent ops): one grad per example
        try:
            ref = torch.stack([task.flatten(grad(value)(params, take(Xs, i), ys[i])) for i in range(m)])
        except RuntimeError:  # not even per example (e.g. batch norm updating its statistics)
            ref = None
    ok = ref is not None
    if ok:
        scale = ref.abs().max().clamp_min(1e-12)
        ok = bool(torch.allclose(fast, ref, rtol=1e-3, atol=1e-4 * float(scale)))
    if not ok:
        key = (type(task.model).__name__, tuple(task.param_names))
        if key not in _VERIFIED:
            warnings.warn(
                f"ggda: fast layer-factor gradients disagree with torch.func for {key[0]}; using the "
                "generic path (the model may mix examples within a batch or bypass its modules).",
                RuntimeWarning,
                stacklevel=3,
            )
        _VERIFIED[key] = False
    return ok


def fast_plan(
    task: AttributionTask, X: torch.Tensor, y: torch.Tensor, fn: ExampleFn, params: Params
) -> LayerPlan | None:
    """The plan to use for this task and function, or None for the generic path."""
    if task.gradients != "auto" or len(y) == 0:
        return None
    plan = plan_layers(task)
    if plan is None:
        return None
    # The check's answer depends on the model's code and modes, not on the data or the parameter
    # values, so for the task's own training loss it is kept per task (it costs a vmap on every
    # call otherwise, ~4% of a 20,000-row group-gradient pass).
    key = None
    if fn is task.loss_fn:
        modes = tuple(m.training for m in task.model.modules())
        key = (modes, input_signature(X), tuple(task.param_names))
        known = _VERIFIED_TASKS.get(task, {}).get(key)
        if known is not None:
            ok, plan.row_bytes = known
            return plan if ok else None
    ok = verify(task, plan, X, y, fn, params)
    if key is not None:
        _VERIFIED_TASKS.setdefault(task, {})[key] = (ok, plan.row_bytes)
    return plan if ok else None
