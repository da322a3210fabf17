"""Influence functions, group-native: score_j = ∇f(θ)ᵀ (H + λI)⁻¹ g_{S_j} / n.

Definitions (NOTES A3, B4):

- H is the **mean** training-loss Hessian (1/n) Σ_i ∇²ℓ(z_i; θ) (``hessian="exact"``) or its
  Gauss–Newton approximation (1/n) Σ_i J_iᵀ ∇²_z ℓ_i J_i (``hessian="gn"``, the default: PSD for
  convex losses, equal to the exact Hessian for linear models), plus ``weight_decay``·I when training used an L2 term (wd/2)‖θ‖².
- g_{S_j} = Σ_{i∈S_j} ∇ℓ(z_i; θ), one batched backward per group.
- The 1/n makes the score a first-order estimate of f(θ_{−S_j}) − f(θ) when the training objective
  is (1/n) Σ_i ℓ_i (+ (wd/2)‖θ‖²): removing S shifts the optimum by ≈ H⁻¹ g_S / n. **Positive =
  helpful** (removing the group raises the cost f); this is −(Koh & Liang's I_up,loss)/n and the
  same scale and sign as torch-influence, which FiMODA uses.
- Damping λ defaults to ``damping_scale`` × λ₀ with λ₀ = mean_i ‖∇ℓ_i‖² / p, the mean squared
  per-example gradient entry (Grosse et al. 2023; FiMODA). λ₀ is also the mean eigenvalue of the
  empirical Fisher, so λ is expressed relative to the typical curvature; ``damping=`` overrides.

Group speedup: (H + λI)⁻¹ ∇f is computed **once per property** (``precondition``) and reused for
all K groups; only the group-gradient stage scales with K.

Solvers (one registered method each, all taking the options above as keyword arguments, i.e.
``--opt key=value`` on the CLI):

- ``if-explicit``: dense H, factorised once (reference; refuses above ``max_params``).
- ``if-cg``: (preconditioned) conjugate gradient with HVPs (``tol`` on the relative residual,
  ``max_iter``, ``preconditioner``: Arnoldi by default, EK-FAC, K-FAC or none).
- ``if-lissa``: LiSSA (``scale``, ``depth``, ``repeat``, ``batch_size``) with a divergence check.
- ``if-arnoldi``: Arnoldi low-rank inverse (``rank``, ``iterations``).
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch

from ggda.errors import GGDAError
from ggda.gradients.curvature import CURVATURE_KINDS
from ggda.gradients.per_example import per_example_sq_norms
from ggda.linalg.arnoldi import LowRankEigen, arnoldi, ihvp_arnoldi
from ggda.linalg.cg import BLOCK_HISTORY, ihvp_block_cg, ihvp_cg
from ggda.linalg.lissa import ihvp_lissa
from ggda.methods.base import InnerProductAttributor, register
from ggda.methods.curvature import TrainingCurvature
from ggda.methods.kronecker import KroneckerFactors, kronecker_layers
from ggda.methods.second_order import HessianCurvature, effective_group_vectors, second_order_scores
from ggda.models.analysis import analyse
from ggda.options import Spec
from ggda.properties import Property
from ggda.task import AttributionTask

HESSIANS = CURVATURE_KINDS
ARNOLDI_COMPLEMENTS = ("floor", "drop")
PRECONDITIONERS = ("auto", "arnoldi", "ekfac", "kfac", "none")
SOLVERS = ("auto", "block", "cg")
#: ``preconditioner="auto"`` with ``solver="cg"`` fits the Arnoldi preconditioner once a solve has
#: this many targets: its 48 setup products save about 9–17 products per target
#: (influence_accuracy.txt: MLP 20 → 11 iterations, LR 22 → 5), so from about four targets on;
#: below, plain CG is cheaper.
AUTO_MIN_TARGETS = 4
#: ``solver="auto"`` runs block CG from this many targets: they share one Krylov space
#: (influence_accuracy.txt, relative residual 1e-4: MLP, 50 targets, 313 products instead of
#: 556 + 48 with Arnoldi-preconditioned CG; LR, 100 targets, 330 instead of 599 + 48); one target
#: is the same method as CG, which keeps no history.
AUTO_BLOCK_TARGETS = 2
DEFAULT_DAMPING_REL = 0.01
DEFAULT_HESSIAN = "gn"


def base_damping(
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    samples: int | None = None,
    seed: int = 0,
    ids: np.ndarray | None = None,
) -> float:
    """λ₀ = mean_i ‖∇ℓ(z_i)‖² / p over all training points (default) or ``samples`` of them.

    A subsample is chosen by the examples' ``ids`` (a seeded hash of each id, the ``samples``
    smallest), not by row position, so λ₀ does not change when the rows are permuted; without
    ``ids`` positions serve as ids.
    """
    n = len(X)
    idx = np.arange(n)
    if samples is not None and samples < n:
        keys = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        idx = np.sort(np.argsort(id_hash(keys, seed), kind="stable")[: int(samples)])
    # from layer factors on MLPs (‖δ aᵀ‖² = ‖δ‖²‖a‖²): the per-example gradients of 1,000 points of
    # a 100k-parameter model would be 0.4 GB written only to be squared
    sq = per_example_sq_norms(task, X[idx] if len(idx) < n else X, y[idx] if len(idx) < n else y)
    return float(np.sort(sq.cpu().numpy()).sum()) / (len(idx) * task.n_params)  # sorted: order-free sum


def relative_damping(lambda_max: float, weight_decay: float, rel: float = DEFAULT_DAMPING_REL) -> float:
    """λ = max(0, rel·λ_max − wd): the damping that floors the spectrum of H + wd·I + λI at
    ``rel`` × its top eigenvalue ``lambda_max`` (of H + wd·I); weight decay counts towards it."""
    return max(0.0, rel * abs(float(lambda_max)) - float(weight_decay))


def id_hash(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """A seeded 64-bit mix (splitmix64) of integer ids: a row-order-free pseudo-random key per example."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def choose_damping(method, top_eigenvalue) -> float:
    """λ of an IF-family ``method``: its explicit ``damping``, else ``damping_scale``·λ₀, else the
    spectrum floored at ``damping_rel``·λ_max (``top_eigenvalue()``, weight decay included);
    recorded in ``method.info``."""
    if method.damping is not None:
        lam = float(method.damping)
    elif method.damping_scale is not None:
        train = method.train
        lam0 = base_damping(method.task, train.X, train.y, method.damping_samples, method.seed, train.ids)
        lam = method.damping_scale * lam0
        method.info.update(lambda0=lam0)
    else:
        lmax = top_eigenvalue()
        lam = relative_damping(lmax, method.weight_decay, method.damping_rel)
        method.info.update(lambda_max=lmax)
    method.info.update(damping=lam)
    return lam


class InfluenceFunction(InnerProductAttributor):
    """Shared machinery of the IF family: curvature operator, damping, 1/n scaling.

    Args:
        task: the attribution task.
        damping: λ; overrides the rules below.
        damping_rel: the default rule: the spectrum of H + wd·I + λI is floored at ``damping_rel``
            × its largest eigenvalue, i.e. λ = max(0, damping_rel·λ_max(H + wd·I) − wd) (default
            0.01, chosen on the fidelity suite, docs/fidelity.md: it keeps weight decay as the only
            damping when that already conditions H, as on L2 logistic regression, and adds enough
            to a flat non-convex spectrum; it bounds the condition number near 1/damping_rel, so
            CG converges in tens of iterations and LiSSA within its default depth). λ_max comes
            from the solver's own curvature (power iteration over all rows; Arnoldi's Ritz values;
            EK-FAC's corrected eigenvalues).
        damping_scale: the former rule, λ = damping_scale × λ₀ with λ₀ = mean_i ‖∇ℓ_i‖² / p (the
            mean squared per-example gradient entry); used when given (the default before was 100).
        hessian: ``"gn"`` (Gauss–Newton, default: PSD, what FiMODA's CG/LiSSA and EK-FAC use) or
            ``"exact"`` (true Hessian; indefinite for trained non-convex models unless damped
            above its most negative eigenvalue).
        weight_decay: the L2 coefficient of training, added to H as wd·I.
        chunk_size: data rows per Hessian pass.
        damping_samples: training points used to estimate λ₀ for ``damping_scale`` (all if None,
            the default; a subsample is chosen by example id, not row position).
        seed: seed of every random choice (λ₀ subsample, LiSSA batches, Arnoldi and power-iteration
            start vectors).
        order: 1 (default) first-order influence; 2 = second-order group influence (Basu et al.
            2020, :mod:`ggda.methods.second_order`): the renormalised removal of each group with
            its own curvature taken out (K extra solves in ``cache``, for groups rather than
            points); k > 2 keeps k terms of the same expansion (→ one Newton step).
        progress: report the iterations of the solver and its fits (CG, LiSSA, Arnoldi, power
            iteration, EK-FAC passes) with their residuals on stderr; ``None`` (default): off, unless
            the program turned progress on (the ``ggda`` command line does, see :mod:`ggda.progress`).
        **options: ``aggregate``, ``max_batch``, ``memory_mb`` of :class:`InnerProductAttributor`.
    """

    preconditioned = True

    def __init__(
        self,
        task: AttributionTask,
        damping: float | None = None,
        damping_rel: float = DEFAULT_DAMPING_REL,
        damping_scale: float | None = None,
        hessian: str = DEFAULT_HESSIAN,
        weight_decay: float = 0.0,
        chunk_size: int = 512,
        damping_samples: int | None = None,
        seed: int = 0,
        order: int = 1,
        progress: bool | None = None,
        **options,
    ) -> None:
        super().__init__(task, **options)
        if order < 1:
            raise GGDAError(f"order must be >= 1 (got {order}); e.g. --opt order=2.")
        self.order = int(order)
        self.progress = progress
        if hessian not in HESSIANS:
            raise GGDAError(f"Unknown hessian '{hessian}'; choose exact or gn (e.g. --opt hessian=gn).")
        if damping is not None and damping < 0:
            raise GGDAError(f"damping must be >= 0 (got {damping}); e.g. --opt damping=1e-3.")
        if (damping_scale is not None and damping_scale < 0) or damping_rel < 0 or weight_decay < 0:
            raise GGDAError("damping_rel, damping_scale and weight_decay must be >= 0.")
        if damping_samples is not None and damping_samples < 1:
            raise GGDAError("damping_samples must be >= 1 (or none for all rows).")
        self.damping, self.damping_rel = damping, float(damping_rel)
        self.damping_scale = None if damping_scale is None else float(damping_scale)
        self.hessian, self.weight_decay = hessian, float(weight_decay)
        self.chunk_size, self.damping_samples, self.seed = int(chunk_size), damping_samples, int(seed)
        self.info: dict = {}

    # -- training side ------------------------------------------------------------------------
    def _cache(self) -> None:
        super()._cache()  # group gradients
        self.n = len(self.train)
        self.curvature = TrainingCurvature(
            self.task,
            self.train.X,
            self.train.y,
            self.hessian,
            self.weight_decay,
            self.chunk_size,
            ids=self.train.ids,
        )
        self._lambda_max: float | None = None
        self._prepare()
        self.lambda_ = self._resolve_damping()
        self._fit()
        self._second = None
        if self.order > 1:
            self._second = effective_group_vectors(
                self.side,
                self.grouping,
                self._solve,
                HessianCurvature(self.curvature, self.grouping),
                self.memory_mb,
                self.order,
            )

    def _resolve_damping(self) -> float:
        return choose_damping(self, self.top_eigenvalue)

    def top_eigenvalue(self) -> float:
        """|λ_max| of the curvature H + wd·I this solver inverts (power iteration over all rows by
        default; cached)."""
        if self._lambda_max is None:
            self._lambda_max = self._top_eigenvalue()
        return self._lambda_max

    def _top_eigenvalue(self) -> float:
        return self.curvature.top_eigenvalue(seed=self.seed, progress=self.progress)

    def _ritz_pairs(self, iterations: int, rank: int, block: int = 1) -> LowRankEigen:
        """Top-``rank`` (by |μ|) Ritz pairs of the curvature H + wd·I from ``iterations`` Arnoldi
        products over all rows, ``block`` vectors per pass (if-arnoldi's inverse and if-cg's
        preconditioner use the same fit)."""
        return arnoldi(
            self.curvature.matvec,
            self.curvature.p,
            iterations,
            rank,
            dtype=self.task.dtype,
            device=self.task.device,
            seed=self.seed,
            progress=self.progress,
            block=block,
        )

    def _prepare(self) -> None:  # noqa: B027  (optional hook)
        """Solver work that does not depend on λ (run before the damping is chosen)."""

    def _fit(self) -> None:  # noqa: B027  (optional hook)
        """Solver-specific training-side work that needs λ (factorisations, scales)."""

    # -- property side ------------------------------------------------------------------------
    def precondition(self, target_grads: torch.Tensor) -> torch.Tensor:
        """(H + λI)⁻¹ ∇f / n, once per property, shared by every group."""
        return self._solve(target_grads) / self.n

    def _attribute(self, prop: Property) -> np.ndarray:
        if self._second is not None:
            return second_order_scores(self._solve(prop.gradients(self.task)), self._second)
        return super()._attribute(prop)

    @abstractmethod
    def _solve(self, B: torch.Tensor) -> torch.Tensor:
        """(H + λI)⁻¹ B for B (T, p)."""


@register("if-explicit")
class ExplicitIF(InfluenceFunction):
    """Dense Hessian, factorised once (Cholesky, LU if indefinite): the exact damped inverse.

    Args:
        max_params: refuse models with more attributed parameters (default 10,000: a float32
            p × p matrix is 400 MB and its factorisation O(p³)); use ``if-cg`` above it.
        block_size: basis vectors per HVP block while building H.
    """

    def __init__(
        self, task: AttributionTask, max_params: int = 10_000, block_size: int = 256, **options
    ) -> None:
        super().__init__(task, **options)
        if task.n_params > max_params:
            raise GGDAError(
                f"if-explicit forms the dense {task.n_params:,}x{task.n_params:,} Hessian, above max_params={max_params:,}; "
                "use --method if-cg (or if-arnoldi, ekfac), or raise --opt max_params=... if memory allows."
            )
        self.max_params, self.block_size = int(max_params), int(block_size)

    def _fit(self) -> None:
        self._inverse = self.curvature.inverse(self.lambda_, self.block_size)  # H itself is not kept
        self.info.update(positive_definite=self._inverse.positive_definite)
        if not self._inverse.positive_definite:
            warnings.warn(
                f"H + λI (λ={self.lambda_:.3g}) is indefinite: the model is not at a minimum at this damping; "
                "raise damping_scale or use hessian=gn.",
                stacklevel=2,
            )

    def _solve(self, B: torch.Tensor) -> torch.Tensor:
        return self._inverse.solve(B)


@register("if-cg")
class ConjugateGradientIF(InfluenceFunction):
    """Conjugate gradient on (H + λI) x = ∇f with exact HVPs over the whole training set, block
    CG over the targets of a property or per-target CG preconditioned by a cheap approximation of
    the same damped curvature.

    The stopping rule is the relative residual ‖∇f − (H + λI)x‖ / ‖∇f‖ ≤ ``tol`` per target
    (per-target CG confirms it at the end with one product per target, since its recurrence
    drifts in float32; block CG's residual is the recurrence of its products as made), so every
    solver and preconditioner gives the same answer to that accuracy; they only decide how
    many curvature products (full passes over the data) it takes. The record (``info``) holds the
    solver and preconditioner used, the iterations, the largest final residual, the CG products
    (one per vector multiplied) and every other curvature product made (power iteration for λ,
    Arnoldi).

    Args:
        tol: relative residual at which a target's solve stops (default 1e-5).
        max_iter: iteration cap (default 200); a warning is issued if it is reached.
        solver: ``"block"``: block CG (:func:`~ggda.linalg.cg.ihvp_block_cg`): the T targets
            share one block Krylov space; each iteration multiplies a block of at most T search
            directions drawn from the active targets' residuals (fewer as targets converge or where
            residuals are dependent, e.g. repeated targets), kept conjugate to the previous two,
            and gives every active target its Galerkin step in it. An outlying eigendirection at either end of the damped spectrum
            is then found once for all targets instead of once per target (MLP with an indefinite
            exact Hessian, 50 targets to 1e-4: 8 iterations, 313 products, against 11 iterations,
            556 + 48 products with Arnoldi-preconditioned CG; influence_accuracy.txt). Memory:
            the last two blocks of directions and their products (2·T·p floats each), one if
            ``memory_mb`` is smaller. ``"cg"``: one CG per target, in lock-step,
            ending with a true-residual check (one product per target). ``"auto"`` (default):
            ``"block"`` from :data:`AUTO_BLOCK_TARGETS` targets, ``"cg"`` for one.
        preconditioner: M ≈ H + wd·I + λI, damped like the CG system. ``"auto"`` (default): none
            for block CG (its shared space already holds the outliers that a 48-product Arnoldi
            fit would remove: MLP 300 + 48 products with it, 313 without); for per-target CG
            ``"arnoldi"`` for solves of at least :data:`AUTO_MIN_TARGETS` targets (fitted at the
            first such solve and kept for later ones), plain CG below — a one-target property (a
            mean loss) would pay 48 setup products to save a handful. ``"arnoldi"``: the
            top ``preconditioner_rank`` Ritz pairs of H + wd·I from ``preconditioner_iterations``
            products made ``preconditioner_block`` vectors at a time (block Arnoldi: 48 products
            in 6 GEMM passes by default), the rest of the spectrum at the smallest kept |Ritz
            value|; it works for any model and removes the outlying eigenvalues CG spends its
            iterations on (benchmarks/results/influence_accuracy.txt, relative residual 1e-4:
            logistic regression, 100 targets, 5 iterations instead of 22; MLP, 11 instead of 20
            — there the exact Hessian's indefinite band, not an outlier, sets the rest; on its
            Gauss–Newton matrix 3 instead of 11). Its setup products pay for themselves from a
            few targets on; for one or two targets ``"none"`` is cheaper. ``"ekfac"`` / ``"kfac"``: EK-FAC / K-FAC factors of the Gauss–Newton
            matrix (two / one passes of per-example output gradients; nn.Linear and nn.Conv2d
            layers, other parameters scaled by a typical eigenvalue): exact for least squares, but
            only 1–11 % fewer products on those softmax models. ``"none"``: plain CG.
        preconditioner_rank: Ritz pairs kept by the Arnoldi preconditioner (default 32).
        preconditioner_iterations: products the Arnoldi fit makes (default 48).
        preconditioner_block: vectors per Arnoldi step (default 8; 1 = classical Arnoldi, one
            sequential matrix–vector pass per product: 64 of them were the default before). A few
            block steps find the handful of outliers that matter at the GEMM throughput of a
            multi-vector product (logistic regression: 0.4 s instead of 0.9 s for the fit).
        warm_start: targets per block (0, the default: one block, no warm start): the blocks are
            solved in turn, each started from the Galerkin combination of the solutions already
            found (exact for a target in their span; one product per target for its starting
            residual). Off by default: no fewer products (benchmarks/results/influence_accuracy_warm.txt: 2,006 vs 1,927 with EK-FAC).
    """

    option_specs: ClassVar[dict] = {
        "preconditioner": Spec(str, choices=PRECONDITIONERS),
        "solver": Spec(str, choices=SOLVERS),
        "warm_start": Spec(int, 0),
    }

    def __init__(
        self,
        task: AttributionTask,
        tol: float = 1e-5,
        max_iter: int = 200,
        solver: str = "auto",
        preconditioner: str = "auto",
        preconditioner_rank: int = 32,
        preconditioner_iterations: int = 48,
        preconditioner_block: int = 8,
        warm_start: int = 0,
        **options,
    ) -> None:
        super().__init__(task, **options)
        if solver not in SOLVERS:
            raise GGDAError(
                f"Unknown solver '{solver}'; choose one of {', '.join(SOLVERS)} (e.g. --opt solver=block)."
            )
        self.solver = solver
        if preconditioner not in PRECONDITIONERS:
            raise GGDAError(
                f"Unknown preconditioner '{preconditioner}'; choose one of {', '.join(PRECONDITIONERS)} "
                "(e.g. --opt preconditioner=ekfac)."
            )
        if (
            not tol > 0
            or max_iter < 1
            or min(preconditioner_rank, preconditioner_iterations, preconditioner_block) < 1
        ):
            raise GGDAError(
                "if-cg needs tol > 0 and max_iter, preconditioner_rank, preconditioner_iterations, "
                "preconditioner_block >= 1; e.g. --opt tol=1e-4 --opt max_iter=200."
            )
        self.tol, self.max_iter = float(tol), int(max_iter)
        self.preconditioner = preconditioner
        self.preconditioner_rank, self.preconditioner_iterations = (
            int(preconditioner_rank),
            int(preconditioner_iterations),
        )
        self.preconditioner_block = int(preconditioner_block)
        if warm_start < 0:
            raise GGDAError(
                f"warm_start must be >= 0 targets per block (got {warm_start}); e.g. --opt warm_start=32."
            )
        self.warm_start = int(warm_start)

    def _prepare(self) -> None:
        """Fit the preconditioner's curvature (it does not depend on λ)."""
        kind = self.preconditioner
        self._factors = self._eigen = None
        before = self.curvature.product_count
        if kind in ("ekfac", "kfac"):
            if not analyse(self.task).factor_layers:
                raise GGDAError(
                    f"preconditioner={kind} factors nn.Linear/nn.Conv2d layers and this model attributes none; "
                    "use --opt preconditioner=arnoldi (or none)."
                )
            self._factors = KroneckerFactors(self.task, kronecker_layers(self.task), progress=self.progress)
            self._factors.fit(
                self.curvature.Xt, self.curvature.yt, self.chunk_size, corrected=kind == "ekfac"
            )
        elif kind == "arnoldi":
            self._fit_arnoldi()
        self.info.update(preconditioner=kind, preconditioner_products=self.curvature.product_count - before)

    def _fit_arnoldi(self) -> None:
        """The Arnoldi preconditioner's Ritz pairs (``auto``: at the first solve with enough targets)."""
        before = self.curvature.product_count
        self._eigen = self._ritz_pairs(
            self.preconditioner_iterations, self.preconditioner_rank, self.preconditioner_block
        )
        fitted = self.curvature.product_count - before
        self.info["preconditioner_products"] = self.info.get("preconditioner_products", 0) + fitted

    def _precondition(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """R ↦ M⁻¹ R with M ≈ H + wd·I + λI (symmetric positive definite), or None for plain CG."""
        shift = self.lambda_ + self.weight_decay
        if self._factors is not None:
            factors = self._factors
            return lambda R: factors.solve(R, shift)
        if self._eigen is not None:
            eig = self._eigen
            # the Ritz values μ are those of the operator H + wd·I itself (its products add wd·V),
            # so the damped values are μ + λ on the Ritz subspace; below it, at most the smallest
            # kept |μ|: M is the damped inverse there and a flat floor elsewhere, kept positive
            floor = max(self.lambda_, 1e-12 * max(float(eig.values.abs().max()), 1.0))
            vals = (eig.values + self.lambda_).clamp_min(floor)
            rest = max(float(eig.values.abs().min()) + self.lambda_, floor)
            U = eig.vectors

            def apply(R: torch.Tensor) -> torch.Tensor:
                C = R @ U
                return (C / vals) @ U.T + (R - C @ U.T) / rest

            return apply
        return None

    def _solver_for(self, targets: int) -> str:
        """The solver a solve of ``targets`` right-hand sides runs (``auto``: block from
        :data:`AUTO_BLOCK_TARGETS` on)."""
        if self.solver != "auto":
            return self.solver
        return "block" if targets >= AUTO_BLOCK_TARGETS else "cg"

    def _solve(self, B: torch.Tensor) -> torch.Tensor:
        block = self.warm_start or len(B)
        solver = self._solver_for(min(block, len(B)))
        auto_pc = self.preconditioner == "auto"
        if auto_pc and solver == "cg" and self._eigen is None and len(B) >= AUTO_MIN_TARGETS:
            self._fit_arnoldi()
        pre = None if auto_pc and solver == "block" else self._precondition()
        self.info["solver_used"] = solver
        self.info["preconditioner_used"] = (
            "none" if pre is None else ("arnoldi" if self._eigen is not None else self.preconditioner)
        )
        # block CG's kept blocks: directions and their products, 2·T·p floats a block, within memory_mb
        per_block = 2 * min(block, len(B)) * B.shape[1] * B.element_size()
        history = max(1, min(BLOCK_HISTORY, int(self.memory_mb * 2**20 / per_block)))
        X = torch.empty_like(B)
        iterations, residual, products = 0, [], 0
        for start in range(0, len(B), block):
            Bb = B[start : start + block]
            x0 = galerkin_start(B[:start], X[:start], Bb) if start else None
            common = {"x0": x0, "progress": self.progress, "precondition": pre}
            args = (self.curvature.matvec, Bb, self.lambda_, self.tol, self.max_iter)
            if solver == "block":
                result = ihvp_block_cg(*args, history=history, **common)
            else:
                result = ihvp_cg(*args, verify=True, **common)
            X[start : start + block] = result.x
            iterations = max(iterations, result.iterations)
            residual.append(result.residual)
            products += result.products
        worst = float(torch.cat(residual).max())
        self.info.update(
            cg_iterations=iterations,
            cg_max_residual=worst,
            cg_products=products,
            cg_targets=len(B),
            curvature_products=self.curvature.product_count,
        )
        if worst > self.tol:
            warnings.warn(
                f"CG stopped at max_iter={self.max_iter} with relative residual {worst:.2e} "
                f"> tol={self.tol:g}; raise --opt max_iter=... or the damping.",
                stacklevel=2,
            )
        return X


def galerkin_start(B_prev: torch.Tensor, X_prev: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Starting points for new right-hand sides B from solved pairs (B_prev, X_prev), A X_prev ≈
    B_prev: x0 = X_prev c with (X_prevᵀ A X_prev) c = X_prevᵀ b, the A-norm-optimal combination of
    the known solutions (X_prevᵀ A X_prev ≈ X_prevᵀ B_prev, no product needed)."""
    G = X_prev @ B_prev.T
    G = 0.5 * (G + G.T)
    rhs = X_prev @ B.T
    eye = torch.eye(len(G), dtype=G.dtype, device=G.device)
    C = torch.linalg.lstsq(G + 1e-10 * G.diagonal().abs().max() * eye, rhs).solution
    return C.T @ X_prev


@register("if-lissa")
class LiSSAIF(InfluenceFunction):
    """LiSSA: stochastic Neumann series with mini-batch HVPs.

    Args:
        scale: s, must exceed the largest eigenvalue of (mini-batch) H + λI. Default ``None``:
            2 × (|λ_max| of the full-data H from 30 power iterations) + λ.
        depth: recursion steps per repetition (default 1000).
        repeat: independent repetitions averaged (default 1).
        batch_size: training points per HVP (default 128; ``None`` = full batch, deterministic).
    """

    def __init__(
        self,
        task: AttributionTask,
        scale: float | None = None,
        depth: int = 1000,
        repeat: int = 1,
        batch_size: int | None = 128,
        **options,
    ) -> None:
        super().__init__(task, **options)
        self.scale, self.depth, self.repeat, self.batch_size = scale, int(depth), int(repeat), batch_size

    def _fit(self) -> None:
        if self.scale is None:
            self.scale_ = 2.0 * self.top_eigenvalue() + self.lambda_
        else:
            self.scale_ = float(self.scale)
        self.info.update(scale=self.scale_)

    def _solve(self, B: torch.Tensor) -> torch.Tensor:
        op = self.curvature.sampler(self.batch_size, self.seed)
        return ihvp_lissa(op, B, self.lambda_, self.scale_, self.depth, self.repeat, progress=self.progress)


@register("if-arnoldi")
class ArnoldiIF(InfluenceFunction):
    """Arnoldi low-rank inverse (Schioppa et al. 2022) on the top-``rank`` eigendirections of H.

    Args:
        rank: eigenpairs kept (default 50).
        iterations: Arnoldi steps, i.e. HVPs (default 200); both are capped at p.
        complement: what happens off the Ritz subspace: ``"floor"`` (default) treats the
            remaining directions as if their curvature were the smallest kept |Ritz value| (an
            upper bound for it), (v − UUᵀv)/(μ_min + λ); ``"drop"`` projects them out
            (Schioppa et al.). On L2 logistic regression (rank 50 of 650) "drop" reaches Pearson
            0.39 against leave-one-out and "floor" 0.77 (docs/fidelity.md).
    """

    def __init__(
        self,
        task: AttributionTask,
        rank: int = 50,
        iterations: int = 200,
        complement: str = "floor",
        **options,
    ) -> None:
        super().__init__(task, **options)
        if complement not in ARNOLDI_COMPLEMENTS:
            raise GGDAError(f"Unknown complement '{complement}'; choose floor or drop.")
        self.rank, self.iterations, self.complement = int(rank), int(iterations), complement

    def _prepare(self) -> None:
        self.eigen: LowRankEigen = self._ritz_pairs(self.iterations, self.rank)
        self.info.update(rank=self.eigen.rank, top_eigenvalue=float(self.eigen.values.abs().max()))

    def _top_eigenvalue(self) -> float:
        return float(self.eigen.values.abs().max())  # the Ritz value: Arnoldi finds the top first

    def _solve(self, B: torch.Tensor) -> torch.Tensor:
        floor = None
        if self.complement == "floor" and self.eigen.rank < self.curvature.p:
            floor = float(self.eigen.values.abs().min())
        return ihvp_arnoldi(self.eigen, B, self.lambda_, floor)
