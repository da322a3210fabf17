"""Exact Hessian–vector products for chain models (Linear → activation → … → Linear) as GEMMs.

Why: influence functions with ``hessian="exact"`` on an MLP multiply by the training-loss
Hessian at every CG/LiSSA/Arnoldi step. Through ``torch.func`` (``jvp`` of ``grad``, ``vmap``
over T vectors) that is ~100× slower than the Gauss–Newton chain product; written out as
Pearlmutter's R-operator through backprop, every step is again one large matrix product per
layer over all rows *and* all T vectors, like :mod:`ggda.linalg.chain_gn`.

Forward s_l = a_{l-1} W_lᵀ + b_l, a_l = σ(s_l); backward δ_L = ∂ℓ/∂z, δ_{l-1} = σ'(s_{l-1}) ⊙
(δ_l W_l). Applying R = d/dε (θ + εV) to both:

    Rs_l = Ra_{l-1} W_lᵀ + a_{l-1} V_lᵀ + v_{b,l},   Ra_l = σ'(s_l) ⊙ Rs_l           (R-forward)
    Rδ_L = H_z Rs_L                                                              (output space)
    R∂W_l = Σ_i Rδ_l ⊗ a_{l-1} + δ_l ⊗ Ra_{l-1},   R∂b_l = Σ_i Rδ_l
    Rδ_{l-1} = σ''(s_{l-1}) ⊙ Rs_{l-1} ⊙ (δ_l W_l) + σ'(s_{l-1}) ⊙ (Rδ_l W_l + δ_l V_l)

Dropping the δ terms leaves the Gauss–Newton product; they are what makes it exact. δ is shared
by the T vectors (one cheap backward per row chunk); σ' and σ'' come from autograd on the
pre-activations, so any elementwise activation works (piecewise-linear ones have σ'' = 0 and skip
that term). H_z is closed-form for softmax cross-entropy, ``torch.func`` for any other loss.
"""

from __future__ import annotations

import torch
from torch import nn

from ggda.linalg.chain_gn import forward_tangents, loss_hessian_product, split_vectors
from ggda.models.chain import LinearChain
from ggda.task import AttributionTask, Params

# activations whose second derivative is zero almost everywhere: no σ'' term
PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU)

ExactForward = tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor | None], torch.Tensor]
ExactVectors = tuple[list[tuple[torch.Tensor, torch.Tensor | None]], list[torch.Tensor | None]]


def chain_exact_forward(chain: LinearChain, params: Params, X: torch.Tensor) -> ExactForward:
    """(inputs a_l of every layer, σ'(s_l), σ''(s_l) (None: no activation or piecewise linear),
    outputs z) — the R-operator's forward quantities, reusable across products of the same rows."""
    inputs, derivs, seconds = [], [], []
    a = X
    for k in range(chain.depth):
        inputs.append(a)
        s = torch.nn.functional.linear(
            a, params[chain.weights[k]], params[chain.biases[k]] if chain.biases[k] else None
        ).detach()
        act = chain.activations[k]
        if act is None:
            derivs.append(None)
            seconds.append(None)
            a = s
            continue
        with torch.enable_grad():
            s_ = s.requires_grad_(True)
            out = act(s_)
            if isinstance(act, PIECEWISE_LINEAR):
                (d,) = torch.autograd.grad(out.sum(), s_)
                dd = None
            else:  # elementwise: ∂/∂s_j Σ_i σ'(s_i) = σ''(s_j)
                (d,) = torch.autograd.grad(out.sum(), s_, create_graph=True)
                (dd,) = torch.autograd.grad(d.sum(), s_, allow_unused=True)
                dd = None if dd is None else dd.detach()
        derivs.append(d.detach())
        seconds.append(dd)
        a = out.detach()
    return inputs, derivs, seconds, a


def split_exact_vectors(chain: LinearChain, slices: dict[str, slice], V: torch.Tensor) -> ExactVectors:
    """:func:`split_vectors`, plus for every layer but the first its weight part laid out as
    (d_out, T·d_in) so that δ_l V_l for all T vectors is one GEMM."""
    T = V.shape[0]
    layers = split_vectors(chain, slices, V)
    wide: list[torch.Tensor | None] = [None]
    for k in range(1, chain.depth):
        d_out, d_in = chain.shapes[k]
        wide.append(layers[k][0].view(T, d_out, d_in).transpose(0, 1).reshape(d_out, T * d_in))
    return layers, wide


def _output_gradient(task: AttributionTask, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∂ℓ_i/∂z_i for every row, (n, C)."""
    with torch.enable_grad():
        z_ = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(task.loss_fn(z_, y).sum(), z_)
    return g.detach()


def chain_exact_product(
    chain: LinearChain,
    task: AttributionTask,
    params: Params,
    slices: dict[str, slice],
    X: torch.Tensor,
    y: torch.Tensor,
    V: torch.Tensor,
    vectors: ExactVectors | None = None,
    out: torch.Tensor | None = None,
    forward: ExactForward | None = None,
) -> torch.Tensor:
    """Σ over the rows of (X, y) of ∇²_θ ℓ_i V for V (T, p); returns (T, p).

    ``vectors``: :func:`split_exact_vectors` of V (shared by many row chunks); ``out``: a (T, p)
    tensor to add the result to; ``forward``: :func:`chain_exact_forward` of X (shared by many
    products of the same rows).
    """
    T, n = V.shape[0], X.shape[0]
    layers, wide = split_exact_vectors(chain, slices, V) if vectors is None else vectors
    inputs, derivs, seconds, z = chain_exact_forward(chain, params, X) if forward is None else forward
    weights = [params[w] for w in chain.weights]
    # R-forward: Ra_l (n, T, d_out) of every layer kept for the backward; σ''(s_l) ⊙ Rs_l where σ'' ≠ 0
    r_curv: list[torch.Tensor | None] = [None] * chain.depth

    def keep_curvature(k: int, s_dot: torch.Tensor) -> None:
        if seconds[k] is not None:
            r_curv[k] = s_dot * seconds[k][:, None, :]

    r_acts = forward_tangents(chain, params, inputs, derivs, layers, n, T, keep_curvature)
    tangent = r_acts[-1]
    # output space: Rδ_L = H_z Rz, and the ordinary backward δ_L = ∂ℓ/∂z (shared by the T vectors)
    r_delta = loss_hessian_product(task, z, y, tangent)
    delta = _output_gradient(task, z, y)
    if out is None:
        out = torch.zeros(T, V.shape[1], dtype=V.dtype, device=V.device)
    for k in reversed(range(chain.depth)):
        d_out, d_in = chain.shapes[k]
        w = out[:, slices[chain.weights[k]]].view(T, d_out, d_in)
        w += (r_delta.reshape(n, T * d_out).T @ inputs[k]).view(T, d_out, d_in)
        if k > 0:  # δ_l ⊗ Ra_{l-1}: the inputs of the first layer do not depend on θ
            w += (delta.T @ r_acts[k - 1].reshape(n, T * d_in)).view(d_out, T, d_in).transpose(0, 1)
        if chain.biases[k] is not None:
            out[:, slices[chain.biases[k]]] += r_delta.sum(0)
        if k == 0:
            break
        back = delta @ weights[k]  # δ_l W_l, (n, d_in)
        r_delta = r_delta @ weights[k]
        r_delta += (delta @ wide[k]).view(n, T, d_in)  # δ_l V_l
        if derivs[k - 1] is not None:  # no activation between two Linear layers: identity
            r_delta.mul_(derivs[k - 1][:, None, :])
            if r_curv[k - 1] is not None:
                r_delta += r_curv[k - 1] * back[:, None, :]
            back.mul_(derivs[k - 1])
        delta = back
    return out
