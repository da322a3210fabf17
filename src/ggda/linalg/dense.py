"""Dense Hessians and their damped inverse, for models small enough to hold p × p.

The explicit influence function is the reference every iterative solver is checked against, so
it factorises once and solves exactly. ``dense_from_matvec`` builds the matrix column block by
column block from any HVP operator, which keeps memory at (block × p) on top of the result and
lets the training-set Hessian be accumulated over data chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import hessian as _hessian
from torch.func import jacrev

from ggda.linalg.hvp import ScalarFn

Matvec = Callable[[torch.Tensor], torch.Tensor]


def hessian(func: ScalarFn, theta: torch.Tensor) -> torch.Tensor:
    """(p, p) Hessian of a scalar function of a flat vector (``torch.func.hessian``)."""
    return _hessian(func)(theta)


def gauss_newton(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    theta: torch.Tensor,
) -> torch.Tensor:
    """(p, p) Gauss–Newton matrix Jᵀ ∇²_z L J, with J the full output Jacobian (small models)."""
    out = model_fn(theta)
    J = jacrev(model_fn)(theta).reshape(out.numel(), -1)
    HL = _hessian(loss_fn)(out).reshape(out.numel(), out.numel())
    return J.T @ HL @ J


def dense_from_matvec(
    matvec: Matvec, p: int, dtype: torch.dtype, device: torch.device | str = "cpu", block_size: int = 256
) -> torch.Tensor:
    """Materialise a symmetric operator as a (p, p) matrix by applying it to identity blocks."""
    out = torch.empty(p, p, dtype=dtype, device=device)
    for start in range(0, p, block_size):
        stop = min(start + block_size, p)
        basis = torch.zeros(stop - start, p, dtype=dtype, device=device)
        rows = torch.arange(stop - start, device=device)
        basis[rows, rows + start] = 1.0
        out[start:stop] = matvec(basis)  # rows = columns, the operator being symmetric
    return 0.5 * (out + out.T)  # remove round-off asymmetry


@dataclass
class DenseInverse:
    """A factorisation of H + λI: Cholesky when positive definite, LU otherwise.

    Attributes:
        positive_definite: whether the Cholesky factorisation succeeded (False means H + λI is
            indefinite — the model is not at a minimum of the regularised loss at this damping).
    """

    factor: torch.Tensor
    pivots: torch.Tensor | None
    positive_definite: bool

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """(H + λI)⁻¹ B for B (p,) or (T, p)."""
        rhs = B.T if B.ndim == 2 else B[:, None]
        if self.positive_definite:
            x = torch.cholesky_solve(rhs, self.factor)
        else:
            x = torch.linalg.lu_solve(self.factor, self.pivots, rhs)
        return x.T if B.ndim == 2 else x[:, 0]


def factorize(H: torch.Tensor, damping: float, overwrite: bool = False) -> DenseInverse:
    """Factorise H + λI once so that every later right-hand side costs only O(p²).

    ``overwrite``: add λ to H's diagonal in place (saves a p × p copy when H is not needed after).
    """
    if overwrite:
        A = H
        A.diagonal().add_(damping)
    else:
        A = H.clone()
        A.diagonal().add_(damping)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return DenseInverse(L, None, True)
    LU, pivots = torch.linalg.lu_factor(A)
    return DenseInverse(LU, pivots, False)


def ihvp_dense(H: torch.Tensor, B: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """(H + λI)⁻¹ B with a dense H (one-shot; use :func:`factorize` to reuse the factorisation)."""
    return factorize(H, damping).solve(B)
