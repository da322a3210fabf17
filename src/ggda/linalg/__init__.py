"""Pure functional linear-algebra primitives for second-order attribution (dattri's style).

Nothing here knows about tasks, data sets or groups: every routine takes a function of a flat
parameter vector, or a *matvec* operator ``V (T, p) -> H V (T, p)``, and returns tensors. The
influence methods (:mod:`ggda.methods.influence`) build the training-set operators and call these.

- :mod:`~ggda.linalg.hvp`: Hessian-vector products (``hvp``) and Gauss–Newton products (``gnhvp``).
- :mod:`~ggda.linalg.dense`: dense Hessian / Gauss–Newton matrices for small models.
- :mod:`~ggda.linalg.cg`: batched conjugate gradient for ``(H + λI) X = B``.
- :mod:`~ggda.linalg.lissa`: LiSSA (stochastic Neumann series) with a divergence check.
- :mod:`~ggda.linalg.arnoldi`: Arnoldi/Lanczos low-rank eigendecomposition and its damped inverse.
"""

from ggda.linalg.arnoldi import LowRankEigen, arnoldi, ihvp_arnoldi
from ggda.linalg.cg import CGResult, ihvp_cg
from ggda.linalg.dense import dense_from_matvec, gauss_newton, hessian, ihvp_dense
from ggda.linalg.hvp import gnhvp, hvp
from ggda.linalg.lissa import ihvp_lissa

__all__ = [
    "CGResult",
    "LowRankEigen",
    "arnoldi",
    "dense_from_matvec",
    "gauss_newton",
    "gnhvp",
    "hessian",
    "hvp",
    "ihvp_arnoldi",
    "ihvp_cg",
    "ihvp_dense",
    "ihvp_lissa",
]
