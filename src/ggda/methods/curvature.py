"""The training-curvature operator the influence family solves against.

Why an operator apart from the methods (as pyDVL keeps curvature operators apart from influence
models): explicit inversion, CG, LiSSA, Arnoldi, EK-FAC's correction and second-order group
influence all multiply by the same mean training curvature; only how they use the products
differs. The products themselves come from the gradient backend
(:func:`ggda.gradients.curvature.curvature_products`: chain GEMMs or ``torch.func``, chosen once
from the model analysis); this module adds what every solver needs on top — the mean over rows,
the weight-decay term, bounded memory over rows and vectors, seeded mini-batches, the dense
matrix and its factorised inverse, and the top eigenvalue.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ggda.errors import GGDAError
from ggda.gradients.curvature import CURVATURE_KINDS, ChainProducts, curvature_products
from ggda.linalg.dense import DenseInverse, dense_from_matvec, factorize
from ggda.linalg.multinomial import MultinomialInverse
from ggda.progress import Iterations
from ggda.task import AttributionTask

FORWARD_CACHE_MB = 256.0


class TrainingCurvature:
    """The operator V ↦ (mean training-loss Hessian or Gauss–Newton) V + wd·V over a data set.

    Products are accumulated over data chunks of ``chunk_size`` rows and vector blocks of
    ``vector_block`` so memory stays bounded for any n and any number of right-hand sides.
    ``product_count`` counts the column products made (one vector each, mini-batch ones included):
    the solvers' cost measure, reported in their records.

    Args:
        task: the attribution task (model, loss, attributed parameters, device, dtype).
        X, y: the training data (all n rows define the mean).
        kind: ``"exact"`` Hessian or ``"gn"`` Gauss–Newton.
        weight_decay: wd of an L2 term (wd/2)‖θ‖² in the training objective.
        chunk_size: data rows per product pass.
        vector_block: right-hand sides vectorised together.
        ids: stable example ids (the Dataset's ``ids``); mini-batches of :meth:`sampler` are drawn
            over the examples in id order, so the same seed picks the same examples however the
            rows are ordered. Default: positions.
    """

    def __init__(
        self,
        task: AttributionTask,
        X: np.ndarray,
        y: np.ndarray,
        kind: str = "exact",
        weight_decay: float = 0.0,
        chunk_size: int = 512,
        vector_block: int = 32,
        ids: np.ndarray | None = None,
    ) -> None:
        if kind not in CURVATURE_KINDS:
            raise GGDAError(f"Unknown hessian '{kind}'; choose exact or gn (e.g. --opt hessian=gn).")
        if chunk_size < 1 or vector_block < 1:
            raise GGDAError("chunk_size and vector_block must be >= 1.")
        self.task, self.kind, self.weight_decay = task, kind, float(weight_decay)
        self.chunk_size, self.vector_block = int(chunk_size), int(vector_block)
        self.Xt, self.yt = task.to_tensor(X, y)
        self.n = len(self.Xt)
        if ids is not None and len(ids) != self.n:
            raise GGDAError(f"ids has {len(ids)} entries for {self.n} training rows.")
        # rows in id order: what a seeded mini-batch draw indexes (row-order invariant)
        self._id_order = torch.as_tensor(
            np.argsort(np.asarray(ids), kind="stable") if ids is not None else np.arange(self.n)
        )
        params = task.params()
        self.theta = task.flatten(params)
        self.p = self.theta.numel()
        self.products = curvature_products(task, kind, params, self.theta)
        if isinstance(self.products, ChainProducts):
            self.vector_block = max(self.vector_block, self.products.vector_block(self.chunk_size))
        self._forwards: list | None = None  # per-chunk forwards, built on the first full product
        self._forwards_built = False
        self.product_count = 0  # column products so far (one vector times the curvature each)

    @property
    def chain(self):
        """The Linear/activation chain whose closed-form products are used, or None."""
        return self.products.chain

    def product(self, V: torch.Tensor, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """(mean over ``rows`` (default all) of the per-example curvature) V + wd V, V (T, p)."""
        if rows is None:
            m = self.n
        elif isinstance(rows, slice):
            m = len(range(*rows.indices(self.n)))
        else:
            m = len(rows)
        out = self.sum_product(V, rows) / m
        self.product_count += 1 if V.ndim == 1 else len(V)
        if self.weight_decay:
            out += self.weight_decay * V
        return out

    def sum_product(self, V: torch.Tensor, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """(Σ over ``rows`` (default all) of the per-example curvature) V, V (p,) or (T, p); no
        weight decay. ``rows``: positions (a tensor or slice)."""
        single = V.ndim == 1
        V = V[None] if single else V
        if isinstance(rows, torch.Tensor):
            rows = rows.to(self.yt.device)
        Xs, ys = (self.Xt, self.yt) if rows is None else (self.Xt[rows], self.yt[rows])
        m = len(ys)
        forwards = self._full_forwards() if rows is None else None
        out = torch.zeros_like(V)
        for vs in range(0, len(V), self.vector_block):
            block = V[vs : vs + self.vector_block]
            prepared = self.products.prepare(block)
            acc = torch.zeros_like(block)
            for c, start in enumerate(range(0, m, self.chunk_size)):
                chunk = slice(start, start + self.chunk_size)
                fwd = forwards[c] if forwards is not None else None
                self.products.accumulate(acc, block, prepared, Xs[chunk], ys[chunk], fwd)
            out[vs : vs + self.vector_block] = acc
        return out[0] if single else out

    def _full_forwards(self) -> list | None:
        """The forward pass of every full-data row chunk, computed on the first product and kept
        when it fits ``FORWARD_CACHE_MB``: a CG or Arnoldi solve multiplies the same rows at every
        iteration."""
        if not self._forwards_built:
            self._forwards_built = True
            per_row = self.products.forward_floats_per_row()
            fits = 0 < self.n * per_row * self.Xt.element_size() <= FORWARD_CACHE_MB * 2**20
            if fits:
                self._forwards = [
                    self.products.forward(self.Xt[s : s + self.chunk_size])
                    for s in range(0, self.n, self.chunk_size)
                ]
        return self._forwards

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """Full-data product (deterministic)."""
        return self.product(V)

    def sampler(self, batch_size: int | None, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
        """A stochastic operator: each call uses a fresh uniformly drawn mini-batch (LiSSA).

        Draws are made over the examples in id order and each batch is taken in id order, so the
        sampled examples (and the sums over them) do not depend on the order of the rows.
        """
        if batch_size is None or batch_size >= self.n:
            return self.matvec
        gen = torch.Generator(device="cpu").manual_seed(seed)

        def sample(V: torch.Tensor) -> torch.Tensor:
            picks = torch.randperm(self.n, generator=gen)[:batch_size].sort().values
            return self.product(V, self._id_order[picks])

        return sample

    def dense(self, block_size: int = 256) -> torch.Tensor:
        """The (p, p) matrix (small models only); in closed form where the products allow it."""
        H = self.products.dense_sum(self.Xt, self.yt)
        if H is None:
            return dense_from_matvec(self.matvec, self.p, self.theta.dtype, self.theta.device, block_size)
        H /= self.n
        if self.weight_decay:
            H.diagonal().add_(self.weight_decay)
        return H

    def inverse(self, damping: float, block_size: int = 256) -> DenseInverse | MultinomialInverse:
        """(H + λI)⁻¹ factorised once: in closed form where the products allow it (softmax
        regression in its reduced basis, exact and ~2× faster, :mod:`ggda.linalg.multinomial`),
        else the dense (p, p) matrix's Cholesky (LU if indefinite)."""
        closed = self.products.inverse(self.Xt, self.n, float(damping) + self.weight_decay)
        if closed is not None:
            return closed
        return factorize(self.dense(block_size), damping, overwrite=True)

    def top_eigenvalue(self, iterations: int = 30, seed: int = 0, progress: bool | None = None) -> float:
        """|largest| eigenvalue by power iteration (used to choose LiSSA's scale and damping);
        ``progress`` reports each iteration with the relative change of the estimate."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randn(self.p, generator=gen, dtype=self.theta.dtype).to(self.theta.device)
        v /= v.norm()
        mu = 0.0
        with Iterations(f"power iteration for λ_max ({iterations} HVPs)", iterations, progress) as bar:
            for _ in range(iterations):
                w = self.matvec(v)
                previous, mu = mu, float(w.norm())
                bar.step(lambda_max=mu, residual=abs(mu - previous) / mu if mu else 0.0)
                if mu == 0.0 or not math.isfinite(mu):
                    break
                v = w / mu
        return mu
