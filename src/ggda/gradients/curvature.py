"""Curvature products of the training loss: the second half of the gradient backend.

Influence functions, LiSSA, Arnoldi, EK-FAC's eigenvalue correction and second-order group
influence all need the same thing: Σ_i C_i V over some training rows, where C_i is example i's
loss Hessian (``kind="exact"``) or Gauss–Newton matrix J_iᵀ ∇²_z ℓ_i J_i (``kind="gn"``) and
V holds T vectors. Like gradients, the product has a structure-exploiting and a generic
implementation, and the choice is made once, from the one model analysis
(:mod:`ggda.models.analysis`), by :func:`curvature_products`:

* :class:`ChainProducts` — a plain Linear/activation chain: the Gauss–Newton product
  (:mod:`ggda.linalg.chain_gn`) or the exact Hessian product (Pearlmutter's R-operator,
  :mod:`ggda.linalg.chain_exact`) as GEMMs over all rows and vectors at once, with the chain's
  forward pass of a row chunk reusable across products (a CG or Arnoldi solve multiplies the same
  rows at every iteration). A single Linear layer, whose exact Hessian equals its Gauss–Newton
  matrix, takes the (cheaper) Gauss–Newton product for both kinds and gets closed forms for the
  dense matrix and the softmax-regression inverse.
* :class:`FunctionalProducts` — any model: ``torch.func`` Hessian- or Gauss–Newton-vector products
  vectorised over V (:mod:`ggda.linalg.hvp`).

Both give the same numbers to float rounding; the operator built on them
(:class:`ggda.methods.curvature.TrainingCurvature`: means, weight decay, sampling, solvers) does
not know which it got.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ggda.linalg.chain_exact import chain_exact_forward, chain_exact_product, split_exact_vectors
from ggda.linalg.chain_gn import chain_gn_product, linear_model_hessian, split_vectors
from ggda.linalg.hvp import gnhvp, hvp
from ggda.linalg.multinomial import MultinomialInverse
from ggda.models.analysis import analyse
from ggda.models.chain import LinearChain
from ggda.task import AttributionTask, Params

CURVATURE_KINDS = ("exact", "gn")


class CurvatureProducts(ABC):
    """Σ over a chunk of rows of the per-example curvature of the task's loss, times vectors.

    ``prepare(V)`` is called once per vector block (work shared by every row chunk);
    ``accumulate`` adds one row chunk's product into ``acc``. ``forward(Xc)`` returns what a
    product of these rows may reuse across calls (None when nothing is worth keeping).
    """

    name = "curvature"
    chain: LinearChain | None = None

    def __init__(self, task: AttributionTask, kind: str, params: Params, theta: torch.Tensor) -> None:
        self.task, self.kind, self.params, self.theta = task, kind, params, theta

    def prepare(self, V: torch.Tensor) -> object:
        return None

    def forward(self, Xc) -> object:
        return None

    def forward_floats_per_row(self) -> int:
        """Floats a cached :meth:`forward` keeps per row (0: no cache)."""
        return 0

    @abstractmethod
    def accumulate(
        self, acc: torch.Tensor, V: torch.Tensor, prepared, Xc, yc: torch.Tensor, forward=None
    ) -> None:
        """acc (T, p) += Σ over the rows (Xc, yc) of C_i V."""

    def dense_sum(self, X, y: torch.Tensor) -> torch.Tensor | None:
        """Σ_i C_i as a (p, p) matrix in closed form, or None (then it is formed from products)."""
        return None

    def inverse(self, X, n: int, mu: float) -> MultinomialInverse | None:
        """((1/n) Σ_i C_i + μI)⁻¹ in closed form, or None."""
        return None


class FunctionalProducts(CurvatureProducts):
    """``torch.func`` products for any model (see the module docstring)."""

    name = "torch.func"

    def __init__(self, task, kind, params, theta) -> None:
        super().__init__(task, kind, params, theta)
        self._shapes = [(name, p.shape, p.numel()) for name, p in params.items()]

    def _unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, shape, size in self._shapes:
            out[name] = theta[start : start + size].reshape(shape)
            start += size
        return out

    def accumulate(self, acc, V, prepared, Xc, yc, forward=None) -> None:
        task = self.task

        def model_fn(theta: torch.Tensor) -> torch.Tensor:
            return task.forward(self._unflatten(theta), Xc)

        if self.kind == "gn":
            acc += gnhvp(model_fn, lambda z: task.loss_fn(z, yc).sum(), self.theta, V)
        else:
            acc += hvp(lambda theta: task.loss_fn(model_fn(theta), yc).sum(), self.theta, V)


class ChainProducts(CurvatureProducts):
    """Closed-form products on a Linear/activation chain (see the module docstring)."""

    name = "chain GEMMs"

    def __init__(self, task, kind, params, theta, chain: LinearChain) -> None:
        super().__init__(task, kind, params, theta)
        self.chain = chain
        self.slices = task.layer_slices()

    @property
    def single_linear(self) -> bool:
        return self.chain.depth == 1 and self.chain.activations[0] is None

    @property
    def exact(self) -> bool:
        """Whether products need the exact Hessian's second-order terms (not a single Linear layer)."""
        return self.kind == "exact" and not self.single_linear

    def vector_block(self, chunk_size: int) -> int:
        """Vectors per block that keep the (rows, T, width) tangents near 64 MB (the exact product
        keeps every layer's tangents for its backward pass, so it counts all widths)."""
        widths = [d_out for d_out, _ in self.chain.shapes]
        width = 2 * sum(widths) if self.exact else max(widths)
        return max(1, int(16 * 2**20 // (chunk_size * width)))

    def prepare(self, V):
        if self.exact:
            return split_exact_vectors(self.chain, self.slices, V)
        return split_vectors(self.chain, self.slices, V)

    def forward(self, Xc):
        if self.exact:
            return chain_exact_forward(self.chain, self.params, Xc)
        return self.chain.forward(self.params, Xc)

    def forward_floats_per_row(self) -> int:
        chain = self.chain
        hidden = sum(d_in for _, d_in in chain.shapes[1:])
        activated = [
            d_out for (d_out, _), act in zip(chain.shapes, chain.activations, strict=True) if act is not None
        ]
        # the exact forward also keeps σ'' (counted for every activation: an upper bound)
        return hidden + sum(activated) * (2 if self.exact else 1) + chain.shapes[-1][0]

    def accumulate(self, acc, V, prepared, Xc, yc, forward=None) -> None:
        product = chain_exact_product if self.exact else chain_gn_product
        product(self.chain, self.task, self.params, self.slices, Xc, yc, V, prepared, acc, forward)

    def dense_sum(self, X, y):
        if not self.single_linear:
            return None
        return linear_model_hessian(self.chain, self.task, self.params, self.slices, X, y)

    def inverse(self, X, n, mu):
        if not (self.single_linear and self.task.loss_kind == "cross-entropy" and mu > 0):
            return None
        chain = self.chain
        w, b = chain.weights[0], chain.biases[0]
        inv = MultinomialInverse(
            X,
            self.params[w].detach(),
            self.params[b].detach() if b else None,
            1.0 / n,
            mu,
            self.slices[w],
            self.slices[b] if b else None,
        )
        return inv if inv.positive_definite else None


def curvature_products(
    task: AttributionTask, kind: str, params: Params | None = None, theta: torch.Tensor | None = None
) -> CurvatureProducts:
    """The products for ``kind`` on this task: chain GEMMs where the model analysis finds a chain
    (Gauss–Newton or exact Hessian), ``torch.func`` otherwise (and for ``gradients="generic"``)."""
    params = task.params() if params is None else params
    theta = task.flatten(params) if theta is None else theta
    chain = analyse(task).chain
    if chain is not None:
        return ChainProducts(task, kind, params, theta, chain)
    return FunctionalProducts(task, kind, params, theta)
