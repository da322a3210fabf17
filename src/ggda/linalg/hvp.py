"""Hessian-vector and Gauss–Newton-vector products with ``torch.func``, never forming a matrix.

``hvp`` is forward-over-reverse (``jvp`` of ``grad``): one extra forward-mode pass on top of a
backward, the cheapest exact HVP (Pearlmutter's trick). ``gnhvp`` multiplies by the Gauss–Newton
matrix Jᵀ H_L J, which is positive semi-definite for convex losses — the curvature EK-FAC, LiSSA
(FiMODA's default) and TRAK approximate — without ever materialising the Jacobian J.

Both accept a batch of vectors ``V (T, p)`` and vectorise over it with ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, jvp, vjp, vmap

ScalarFn = Callable[[torch.Tensor], torch.Tensor]


def _batched(single: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    return single(v) if v.ndim == 1 else vmap(single)(v)


def hvp(func: ScalarFn, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """∇²func(θ) · v for a scalar ``func`` of a flat vector; ``v`` is (p,) or (T, p)."""
    g = grad(func)

    def single(u: torch.Tensor) -> torch.Tensor:
        return jvp(g, (theta,), (u,))[1]

    return _batched(single, v)


def gnhvp(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    theta: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """Gauss–Newton product Jᵀ (∇²_z L) J v.

    Args:
        model_fn: θ -> outputs z (any shape).
        loss_fn: z -> scalar loss (e.g. the summed per-example losses of a batch).
        theta: (p,) flat parameters.
        v: (p,) or (T, p) vectors.
    """
    out, pullback = vjp(model_fn, theta)
    loss_grad = grad(loss_fn)

    def single(u: torch.Tensor) -> torch.Tensor:
        ju = jvp(model_fn, (theta,), (u,))[1]  # J u
        hju = jvp(loss_grad, (out,), (ju,))[1]  # H_L J u
        return pullback(hju)[0]  # Jᵀ H_L J u

    return _batched(single, v)
