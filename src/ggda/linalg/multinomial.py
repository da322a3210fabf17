"""The exact damped inverse Hessian of multinomial logistic regression, in its reduced basis.

For one Linear layer z = W x + b under softmax cross-entropy the per-example loss Hessian is
H_i = diag(p_i) − p_i p_iᵀ (C × C), and the parameter Hessian is Σ_i H_i ⊗ x̃_i x̃_iᵀ with
x̃ = [x, 1] (the bias is the last input column). Two facts make it much cheaper than a generic
dense Hessian:

* **Softmax is shift invariant**: H_i 1 = 0, so every vector 1 ⊗ u (the same change to every
  class's weights) is in the null space. With Q a C × (C−1) orthonormal basis of 1⊥, the Hessian is
  (Q ⊗ I) H̃ (Q ⊗ I)ᵀ with H̃ = Σ_i (QᵀH_iQ) ⊗ x̃_i x̃_iᵀ, and since H + μI commutes with the
  projector onto that null space,

      (H + μI)⁻¹ b = (Q ⊗ I)(H̃ + μI)⁻¹(Q ⊗ I)ᵀ b + (1/μ)·(11ᵀ/C ⊗ I) b          (exact).

  The factorised matrix has (C−1)·(d+1) rows instead of C·(d+1): 27% fewer Cholesky FLOPs at
  C = 10, 19% fewer per solve.
* **Every block is symmetric**: block (α, β) of H̃ is X̃ᵀ diag(h̃_αβ) X̃, symmetric for any
  diagonal, so only its upper tiles are computed, and only the C(C−1)/2 blocks with α ≤ β.

Together the matrix costs about a third of the FLOPs of forming Σ_i H_i ⊗ x̃x̃ᵀ block by block,
and nothing is approximated: the solve equals the dense one up to float round-off (tests).
"""

from __future__ import annotations

import math

import torch

from ggda.buffers import empty_huge


def null_complement_basis(C: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """(C, C−1) orthonormal basis of the vectors whose entries sum to zero (Helmert contrasts)."""
    Q = torch.zeros(C, C - 1, dtype=torch.float64)
    for k in range(1, C):  # column k−1: (1, …, 1, −k, 0, …) / √(k(k+1))
        Q[:k, k - 1] = 1.0
        Q[k, k - 1] = -float(k)
        Q[:, k - 1] /= math.sqrt(k * (k + 1))
    return Q.to(dtype=dtype, device=device)


def _symmetric_gram(Y: torch.Tensor, X: torch.Tensor, out: torch.Tensor, tile: int) -> None:
    """out += Yᵀ X for a product known to be symmetric: upper tiles only, mirrored after."""
    m = X.shape[1]
    for s in range(0, m, tile):
        s1 = min(s + tile, m)
        # one GEMM for the tile row's upper part (tiles s..end), then mirror its off-diagonal part
        out[s:s1, s:].addmm_(Y[:, s:s1].T, X[:, s:])


def _mirror_upper(M: torch.Tensor, tile: int) -> None:
    m = M.shape[0]
    for s in range(0, m, tile):
        s1 = min(s + tile, m)
        if s1 < m:
            M[s1:, s:s1] = M[s:s1, s1:].T


class MultinomialInverse:
    """(H + μI)⁻¹ for the summed or mean Hessian of a softmax-regression layer, factorised once.

    Args:
        X: (n, d) inputs; W: (C, d) weights; b: (C,) bias or None.
        scale: multiplies the Hessian (1/n for the mean Hessian).
        damping: μ (damping plus any weight decay), > 0.
        weight_slice, bias_slice: where W (row-major) and b sit in the flat parameter vector.
        chunk_size: rows per accumulation step; tile: columns per symmetric tile.

    Attributes:
        positive_definite: whether the Cholesky factorisation succeeded (always, for μ > 0, up
            to round-off: H is PSD for this convex loss).
    """

    def __init__(
        self,
        X: torch.Tensor,
        W: torch.Tensor,
        b: torch.Tensor | None,
        scale: float,
        damping: float,
        weight_slice: slice,
        bias_slice: slice | None,
        chunk_size: int = 2048,
        tile: int = 128,
    ) -> None:
        C, d = W.shape
        dtype, device = X.dtype, X.device
        self.C, self.d, self.has_bias = C, d, b is not None
        self.da = d + (1 if b is not None else 0)
        self.damping = float(damping)
        self.weight_slice, self.bias_slice = weight_slice, bias_slice
        self.Q = null_complement_basis(C, dtype, device)
        r, da = C - 1, self.da
        H = empty_huge(r * da, r * da, dtype=dtype, device=device).zero_()
        blocks = H.view(r, da, r, da)
        pairs = [(a, c) for a in range(r) for c in range(a, r)]
        acc = torch.zeros(da, da, dtype=dtype, device=device) if len(X) > chunk_size else None
        for start in range(0, len(X), chunk_size):
            Xc = X[start : start + chunk_size]
            prob = torch.softmax(torch.nn.functional.linear(Xc, W, b), dim=-1)
            # Qᵀ H_i Q = QᵀDiag(p)Q − (Qᵀp)(Qᵀp)ᵀ for every row: (m, r, r)
            Qp = prob @ self.Q
            h = torch.einsum("ca,mc,cb->mab", self.Q, prob, self.Q) - Qp[:, :, None] * Qp[:, None, :]
            Xa = (
                torch.cat([Xc, torch.ones(len(Xc), 1, dtype=dtype, device=device)], 1)
                if b is not None
                else Xc
            )
            Y = torch.empty_like(Xa)
            for a, c in pairs:
                torch.mul(Xa, h[:, a, c, None], out=Y)
                if acc is None:  # one chunk: straight into the block's upper tiles
                    _symmetric_gram(Y, Xa, blocks[a, :, c, :], tile)
                else:
                    acc.zero_()
                    _symmetric_gram(Y, Xa, acc, tile)
                    blocks[a, :, c, :] += acc
        for a, c in pairs:  # complete each block from its upper tiles, then the lower blocks
            blk = blocks[a, :, c, :]
            _mirror_upper(blk, tile)
            if c != a:
                blocks[c, :, a, :] = blk.T
        H.mul_(scale)
        H.diagonal().add_(self.damping)
        self.factor, info = torch.linalg.cholesky_ex(H)
        del H
        self.positive_definite = int(info) == 0  # callers fall back to the dense LU path if not

    def _to_blocks(self, B: torch.Tensor) -> torch.Tensor:
        """(T, p) flat vectors -> (T, C, da) with the bias as the last column."""
        T = B.shape[0]
        Wp = B[:, self.weight_slice].reshape(T, self.C, self.d)
        if not self.has_bias:
            return Wp
        return torch.cat([Wp, B[:, self.bias_slice].reshape(T, self.C, 1)], 2)

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """(H + μI)⁻¹ B for B (p,) or (T, p)."""
        single = B.ndim == 1
        B2 = B[None] if single else B
        T = B2.shape[0]
        V = self._to_blocks(B2)  # (T, C, da)
        mean = V.mean(1, keepdim=True)  # the null-space part, (1/C) 11ᵀ ⊗ I
        reduced = torch.einsum("ca,tcj->taj", self.Q, V).reshape(T, -1)
        x = torch.cholesky_solve(reduced.T, self.factor).T.reshape(T, self.C - 1, self.da)
        Xb = torch.einsum("ca,taj->tcj", self.Q, x) + mean / self.damping
        out = torch.empty_like(B2)
        out[:, self.weight_slice] = Xb[:, :, : self.d].reshape(T, -1)
        if self.has_bias:
            out[:, self.bias_slice] = Xb[:, :, self.d]
        return out[0] if single else out
