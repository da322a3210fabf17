"""Influence with a *batched* empirical Fisher built from the K group gradients (``if-group-fisher``).

The IF family (:mod:`ggda.methods.influence`) inverts a curvature built from all n training
points, so grouping barely speeds it up: the iHVP dominates. GGDA's cost note (NOTES A3,
gotcha 11; TRAK's F̂^batched) suggests a curvature built from the group gradients themselves:

    F̂ = (1/n) Σ_j g_{S_j} g_{S_j}ᵀ / |S_j|,     g_{S_j} = Σ_{i∈S_j} ∇ℓ(z_i; θ).

For singleton groups F̂ is the exact empirical Fisher (1/n) Σ_i ∇ℓ_i ∇ℓ_iᵀ; for a group whose
members share one gradient g, g_S g_Sᵀ/|S| = |S| g gᵀ = Σ_{i∈S} ∇ℓ_i ∇ℓ_iᵀ, so F̂ equals the
per-point Fisher there too. Otherwise it keeps only the group-mean directions (rank ≤ K).

Score (same scale and sign as the IF family: positive = helpful, 1/n for a mean objective):

    τ_j(t) = ∇f_tᵀ (F̂ + λI)⁻¹ g_{S_j} / n.

With U = Gᵀ D (p × K), D = diag(1/√(n|S_j|)), F̂ = UUᵀ and Woodbury's push-through identity
(λI + UUᵀ)⁻¹ U = U (λI_K + UᵀU)⁻¹ give, since Gᵀ = U D⁻¹,

    τ(t) = (∇f_tᵀ Gᵀ) D M⁻¹ D⁻¹ / n,      M = λI_K + D (G Gᵀ) D,

so everything happens in K-space: the K × K Gram G Gᵀ is formed once in ``_cache`` and
Cholesky-factorised (float64), and each property needs only the raw inner products ∇f Gᵀ (the
Grad-Dot scores, computed by :class:`InnerProductAttributor`, including its MLP factor fast
path) plus a K × K triangular solve. Cost: Gram O(K² p) (or factor inner products), Cholesky
O(K³/3), O(T K²) per property — no Hessian-vector product over the n points at all. The K × K
system grows quadratically in memory and cubically in time, so K above ``max_groups``
(default 20,000) is refused.
"""

from __future__ import annotations

import numpy as np
import torch

from ggda.errors import GGDAError
from ggda.methods.base import InnerProductAttributor, register
from ggda.methods.influence import DEFAULT_DAMPING_REL, choose_damping
from ggda.methods.second_order import effective_group_vectors, second_order_scores
from ggda.properties import ExampleLoss, Property
from ggda.task import AttributionTask

DEFAULT_MAX_GROUPS = 20_000


@register("if-group-fisher")
class GroupFisherIF(InnerProductAttributor):
    """∇fᵀ (F̂ + λI)⁻¹ g_S / n with the batched empirical Fisher of the K group gradients.

    Args:
        task: the attribution task.
        damping: λ; overrides the rules below.
        damping_rel: the IF family's default rule on this method's own curvature:
            λ = max(0, damping_rel·λ_max(F̂ + wd·I) − wd) (default 0.01; λ_max of F̂ from its
            K × K form, so it costs nothing).
        damping_scale: the former rule, λ = damping_scale × λ₀, λ₀ = mean_i ‖∇ℓ_i‖² / p (per-example
            gradients, as the IF family); used when given (the default before was 100).
        weight_decay: the L2 coefficient of training, added to F̂ as wd·I (as in the IF family).
        damping_samples: training points used to estimate λ₀ for ``damping_scale`` (all if None,
            the default; a subsample is chosen by example id).
        seed: seed of the λ₀ subsample.
        max_groups: refuse more groups than this (default 20,000: the K × K float64 system is
            3.2 GB and its Cholesky ~2.7·10¹² flops there).
        order: 1 (default) first-order; 2 = second-order group influence
            (:mod:`ggda.methods.second_order`) with the batched Fisher as the curvature: removing
            S removes its term g_S g_Sᵀ/|S| from F̂ and renormalises the rest; k > 2 keeps k terms.
        **options: ``aggregate``, ``max_batch``, ``memory_mb`` of :class:`InnerProductAttributor`.
    """

    def __init__(
        self,
        task: AttributionTask,
        damping: float | None = None,
        damping_rel: float = DEFAULT_DAMPING_REL,
        damping_scale: float | None = None,
        weight_decay: float = 0.0,
        damping_samples: int | None = None,
        seed: int = 0,
        max_groups: int = DEFAULT_MAX_GROUPS,
        order: int = 1,
        **options,
    ) -> None:
        super().__init__(task, **options)
        if order < 1:
            raise GGDAError(f"order must be >= 1 (got {order}); e.g. --opt order=2.")
        self.order = int(order)
        if damping is not None and damping < 0:
            raise GGDAError(f"damping must be >= 0 (got {damping}); e.g. --opt damping=1e-3.")
        if (damping_scale is not None and damping_scale < 0) or damping_rel < 0 or weight_decay < 0:
            raise GGDAError("damping_rel, damping_scale and weight_decay must be >= 0.")
        self.damping, self.damping_rel, self.weight_decay = damping, float(damping_rel), float(weight_decay)
        self.damping_scale = None if damping_scale is None else float(damping_scale)
        self.damping_samples, self.seed, self.max_groups = damping_samples, int(seed), int(max_groups)
        self.info: dict = {}

    # -- training side ------------------------------------------------------------------------
    def _cache(self) -> None:
        K = self.grouping.n_groups
        if K > self.max_groups:
            raise GGDAError(
                f"if-group-fisher solves a {K:,}x{K:,} system, above max_groups={self.max_groups:,}; "
                "use a coarser --grouping, --method if-cg, or raise --opt max_groups=..."
            )
        super()._cache()  # group gradients (dense _G when it fits) or layer factors
        self.n = len(self.train)
        gram = self._gram().to(torch.float64)
        sizes = torch.as_tensor(self.grouping.sizes, dtype=torch.float64, device=gram.device)
        self._d = 1.0 / torch.sqrt(self.n * sizes)  # diag of D
        M = self._d[:, None] * gram * self._d[None, :]  # UᵀU: its nonzero spectrum is F̂'s
        lam = choose_damping(self, lambda: _top_eigenvalue(M) + self.weight_decay)
        self.lambda_ = lam + self.weight_decay
        M.diagonal().add_(self.lambda_)
        L, fail = torch.linalg.cholesky_ex(M)
        if int(fail) != 0:
            raise GGDAError(
                f"λI + UᵀU is not positive definite at λ={self.lambda_:.3g} (collinear group gradients); "
                "use a positive damping, e.g. --opt damping_rel=0.01."
            )
        self._chol = L
        self._second = None
        if self.order > 1:
            self._second = effective_group_vectors(
                self.side,
                self.grouping,
                self.solve,
                BatchedFisherCurvature(self.side),
                self.memory_mb,
                self.order,
            )

    def _gram(self) -> torch.Tensor:
        """G Gᵀ (K × K): from the cached group gradients, else by scoring the training set."""
        if self.side.G is not None:
            G = self.side.G.to(torch.float64)
            return G @ G.T
        # Row i of P = ∇ℓ_iᵀ Gᵀ (raw inner products, factor fast path when available); summing
        # rows over each group gives g_{S_k}ᵀ Gᵀ. Train rows are chunked to bound memory.
        K = self.grouping.n_groups
        gram = torch.zeros(K, K, dtype=torch.float64, device=self.task.device)
        labels = torch.as_tensor(self.grouping.labels, dtype=torch.long, device=self.task.device)
        rows = max(1, min(self.max_batch, int(self.memory_mb * 2**20 / (8 * K))))
        X, y = self.train.X, self.train.y
        for start in range(0, len(X), rows):
            prop = ExampleLoss(X[start : start + rows], y[start : start + rows])
            P = torch.as_tensor(InnerProductAttributor._attribute(self, prop), device=self.task.device)
            gram.index_add_(0, labels[start : start + rows], P.to(torch.float64))
        return (gram + gram.T) / 2

    # -- property side ------------------------------------------------------------------------
    def _attribute(self, prop: Property) -> np.ndarray:
        if self._second is not None:
            return second_order_scores(self.solve(prop.gradients(self.task)), self._second)
        raw = InnerProductAttributor._attribute(self, prop)  # ∇f Gᵀ, (T, K)
        S = torch.as_tensor(raw, device=self.task.device).to(torch.float64) * self._d[None, :]
        Y = torch.cholesky_solve(S.T, self._chol).T  # (∇f Gᵀ D) M⁻¹
        scores = Y / self._d[None, :] / self.n
        return scores.to(self.task.dtype).cpu().numpy()

    def solve(self, V: torch.Tensor) -> torch.Tensor:
        """(F̂ + λI)⁻¹ V for V (T, p) by Woodbury in p-space: (V − (V U) M⁻¹ Uᵀ)/λ.

        Not used for scoring (that is done in K-space); exposed to apply the batched-Fisher
        inverse to arbitrary vectors. Uses the cached group gradients, else streams them twice.
        """
        V64 = V.to(device=self.task.device, dtype=torch.float64)
        d = self._d

        VU = torch.zeros(len(V64), self.grouping.n_groups, dtype=torch.float64, device=V64.device)
        for gids, Gb in self.side.blocks():
            gids = torch.as_tensor(gids, device=V64.device)
            VU[:, gids] = (V64 @ Gb.to(torch.float64).T) * d[gids][None, :]
        C = torch.cholesky_solve(VU.T, self._chol).T * d[None, :]  # (V U M⁻¹) D
        out = V64.clone()
        for gids, Gb in self.side.blocks():
            gids = torch.as_tensor(gids, device=V64.device)
            out -= C[:, gids] @ Gb.to(torch.float64)
        return (out / self.lambda_).to(V.dtype)


def _top_eigenvalue(M: torch.Tensor) -> float:
    """Largest eigenvalue of the symmetric PSD K × K matrix M (dense below 4,096, else power
    iteration from a seeded start indexed by group)."""
    if len(M) <= 4096:
        return float(torch.linalg.eigvalsh(M)[-1])
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(len(M), generator=gen, dtype=M.dtype).to(M.device)
    mu = 0.0
    for _ in range(100):
        w = M @ v
        mu = float(w.norm() / v.norm())
        v = w / w.norm().clamp_min(1e-300)
    return mu


class BatchedFisherCurvature:
    """The batched Fisher as the curvature of the second-order expansion: n F̂ = Σ_j g_j g_jᵀ/|S_j|
    over all rows, g_j g_jᵀ/|S_j| over group j (``ggda.methods.second_order.Curvature``)."""

    def __init__(self, side) -> None:
        K, p = side.grouping.n_groups, side.task.n_params
        G = torch.zeros(K, p, dtype=side.task.dtype, device=side.task.device)
        for gids, Gb in side.blocks():
            G[torch.as_tensor(gids, device=G.device)] = Gb.to(G.dtype)
        self.G = G
        self.inv_sizes = 1.0 / torch.as_tensor(side.grouping.sizes, dtype=G.dtype, device=G.device)

    def data_product(self, W: torch.Tensor) -> torch.Tensor:
        return ((W @ self.G.T) * self.inv_sizes[None, :]) @ self.G

    def group_product(self, j: int, w: torch.Tensor) -> torch.Tensor:
        return self.G[j] * (self.G[j] @ w) * self.inv_sizes[j]
