"""Gauss–Newton products for chain models (Linear → activation → … → Linear) as plain GEMMs.

For T vectors at once, G V = Σ_i J_iᵀ H_i J_i V is a forward-mode pass (J V), the loss Hessian
in output space (H_i, tiny), and a reverse pass (Jᵀ ·). On a chain each step is one large
matrix product per layer over all rows *and* all T vectors:

    ṡ_l = a_{l-1} V_lᵀ + v_{b,l} + ȧ_{l-1} W_lᵀ,   ȧ_l = σ'(s_l) ⊙ ṡ_l          (forward, J V)
    ∂W_l = Σ_i δ_{l,i} ⊗ a_{l-1,i},   δ_{l-1} = σ'(s_{l-1}) ⊙ (δ_l W_l)          (reverse, Jᵀ U)

where the first-layer term ``a_0 V_1ᵀ`` is a single GEMM against the shared inputs for all T
vectors. ``vmap(jvp)`` computes the same numbers but batches the T tangents less well; on
logistic regression with 500 vectors this is ~2.5× faster (``make bench``).

For a single Linear layer (z linear in θ) the Gauss–Newton matrix *is* the exact Hessian, so
:class:`~ggda.methods.curvature.TrainingCurvature` also uses this product for ``hessian="exact"``
there.
"""

from __future__ import annotations

import torch
from torch.func import grad, hessian, jvp, vmap

from ggda.models.chain import LinearChain
from ggda.task import AttributionTask, Params


def loss_hessian_product(
    task: AttributionTask, z: torch.Tensor, y: torch.Tensor, U: torch.Tensor
) -> torch.Tensor:
    """H_i u for every row i and vector: z (n, C), U (n, T, C) -> (n, T, C), with H_i = ∇²_z ℓ(z_i, y_i).

    Softmax cross-entropy (ggda's classification loss) in closed form, H_i u = p ⊙ u − p (pᵀu);
    any other loss through ``torch.func``.
    """
    if task.loss_kind == "cross-entropy":
        prob = torch.softmax(z, dim=-1)[:, None, :]  # (n, 1, C)
        return prob * (U - (U * prob).sum(-1, keepdim=True))
    g = grad(lambda zz: task.loss_fn(zz, y).sum())

    def single(u: torch.Tensor) -> torch.Tensor:
        return jvp(g, (z,), (u,))[1]

    return vmap(single, in_dims=1, out_dims=1)(U)


def split_vectors(
    chain: LinearChain, slices: dict[str, slice], V: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per layer: V's weight part as a contiguous (T·d_out, d_in) matrix and its bias part (T, d_out)."""
    T = V.shape[0]
    out = []
    for k in range(chain.depth):
        d_out, d_in = chain.shapes[k]
        Vw = V[:, slices[chain.weights[k]]].reshape(T * d_out, d_in).contiguous()
        vb = V[:, slices[chain.biases[k]]] if chain.biases[k] is not None else None
        out.append((Vw, vb))
    return out


def forward_tangents(
    chain: LinearChain,
    params: Params,
    inputs: list[torch.Tensor],
    derivs: list[torch.Tensor | None],
    layers: list[tuple[torch.Tensor, torch.Tensor | None]],
    n: int,
    T: int,
    on_preactivation=None,
) -> list[torch.Tensor]:
    """Forward mode over the chain for all T vectors at once: every layer's output tangent
    (J_l V, each (n, T, d_out)), from ``inputs``/``derivs`` of the chain's forward pass and V split
    per layer. ``on_preactivation(k, ṡ_k)`` sees each layer's pre-activation tangent before σ' is
    applied in place (the exact product keeps σ''(s_k) ⊙ ṡ_k from it)."""
    tangents: list[torch.Tensor] = []
    tangent = None
    for k in range(chain.depth):
        d_out, _ = chain.shapes[k]
        Vw, vb = layers[k]
        s_dot = (inputs[k] @ Vw.T).view(n, T, d_out)
        if vb is not None:
            s_dot += vb[None]
        if tangent is not None:
            s_dot += tangent @ params[chain.weights[k]].T
        if on_preactivation is not None:
            on_preactivation(k, s_dot)
        tangent = s_dot if derivs[k] is None else s_dot.mul_(derivs[k][:, None, :])
        tangents.append(tangent)
    return tangents


def chain_gn_product(
    chain: LinearChain,
    task: AttributionTask,
    params: Params,
    slices: dict[str, slice],
    X: torch.Tensor,
    y: torch.Tensor,
    V: torch.Tensor,
    layers: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    out: torch.Tensor | None = None,
    forward: tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Σ over the rows of (X, y) of J_iᵀ H_i J_i V for V (T, p); returns (T, p).

    ``layers``: :func:`split_vectors` of V, for callers that apply the product to many row chunks;
    ``out``: a (T, p) tensor to *add* the result to (saves a copy per row chunk);
    ``forward``: ``chain.forward(params, X)``, for callers that multiply the same rows many times
    (a CG solve): with few vectors the forward pass is a third of the product's cost.
    """
    T, n = V.shape[0], X.shape[0]
    layers = split_vectors(chain, slices, V) if layers is None else layers
    inputs, derivs, z = chain.forward(params, X) if forward is None else forward
    tangent = forward_tangents(chain, params, inputs, derivs, layers, n, T)[-1]
    delta = loss_hessian_product(task, z, y, tangent)
    # reverse mode: Jᵀ applied to every vector's output-space result
    if out is None:
        out = torch.zeros(T, V.shape[1], dtype=V.dtype, device=V.device)
    for k in reversed(range(chain.depth)):
        d_out, d_in = chain.shapes[k]
        w = out[:, slices[chain.weights[k]]].view(T, d_out, d_in)
        w += (delta.reshape(n, T * d_out).T @ inputs[k]).view(T, d_out, d_in)
        if chain.biases[k] is not None:
            out[:, slices[chain.biases[k]]] += delta.sum(0)
        if k > 0:
            delta = delta @ params[chain.weights[k]]
            if derivs[k - 1] is not None:  # no activation between two Linear layers: identity
                delta.mul_(derivs[k - 1][:, None, :])
    return out


def linear_model_hessian(
    chain: LinearChain,
    task: AttributionTask,
    params: Params,
    slices: dict[str, slice],
    X: torch.Tensor,
    y: torch.Tensor,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Σ_i ∇²ℓ_i for a single Linear layer z = W x + b, formed directly: (p, p).

    With x̃ = [x, 1] the Hessian is Σ_i H_i ⊗ x̃_i x̃_iᵀ (H_i = ∇²_z ℓ_i, C × C), so the (a, b) block
    over the weights of outputs a and b is X̃ᵀ diag(H_{·ab}) X̃: C(C+1)/2 GEMMs of n × (d+1)², about
    a quarter of the FLOPs of building the matrix from p Hessian-vector products.
    """
    if chain.depth != 1 or chain.activations[0] is not None:
        raise ValueError("linear_model_hessian needs a single Linear layer (outputs linear in θ).")
    C, d = chain.shapes[0]
    w_name, b_name = chain.weights[0], chain.biases[0]
    da = d + (1 if b_name else 0)
    dtype, device = X.dtype, X.device
    blocks = torch.zeros(C, da, C, da, dtype=dtype, device=device)

    def one(zi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return task.loss_fn(zi[None], yi[None])[0]

    for start in range(0, len(X), chunk_size):
        Xc, yc = X[start : start + chunk_size], y[start : start + chunk_size]
        z = torch.nn.functional.linear(Xc, params[w_name], params[b_name] if b_name else None)
        HL = vmap(hessian(one))(z.detach(), yc)  # (m, C, C)
        Xa = torch.cat([Xc, torch.ones(len(Xc), 1, dtype=dtype, device=device)], 1) if b_name else Xc
        for a in range(C):
            for b in range(a, C):
                blocks[a, :, b, :] += (Xa * HL[:, a, b, None]).T @ Xa
    for a in range(C):  # the lower blocks are transposes of the upper ones
        for b in range(a + 1, C):
            blocks[b, :, a, :] = blocks[a, :, b, :].T
    # rows of `blocks` are (output a, input j) with j = d the bias; map them to the flat layout
    order = torch.empty(C * da, dtype=torch.long)
    w0 = slices[w_name].start
    for a in range(C):
        order[a * da : a * da + d] = w0 + a * d + torch.arange(d)
        if b_name:
            order[a * da + d] = slices[b_name].start + a
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    flat = blocks.reshape(C * da, C * da)
    inverse = inverse.to(device)
    return flat.index_select(0, inverse).index_select(1, inverse)
