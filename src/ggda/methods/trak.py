"""TRAK (Park et al., 2023), group-native (GGDA, NOTES A3).

For each model θ_m of an ensemble (the final model, checkpoints, or independently trained models)
and a random projection P (one seeded matrix shared by all members, so their gradients are projected
in the same passes; ``member_seeds=True`` draws P_m per model, as the paper's Algorithm 1 and the
``trak`` and dattri libraries do):

* **group features** φ_j = P_mᵀ ∇_θ Σ_{i∈S_j} out(z_i; θ_m) — one batched backward per group of the
  summed *model output* out: the correct-class margin ``z_y − logsumexp_{c≠y} z_c`` for
  classification, the prediction for regression. Rows form Φ_m (K × k);
* **kernel** ΦᵀΦ + λI (GGDA's F̂^batched). λ > 0 is what makes TRAK well-posed when K < k (the
  kernel is then singular) or the features are nearly collinear; default λ = ``ridge_rel`` ×
  tr(ΦᵀΦ)/min(K, k) = 2 × the mean non-zero eigenvalue (a strong ridge: with a weak one TRAK sits at
  the interpolation peak when k ≈ K; docs/trak.md), or an absolute ``ridge``;
* **residual weights** q_j aggregated from q_i = 1 − p_i(correct) (classification) or the signed
  residual y_i − f_i (regression) over the group's members (``residual="sum"`` by default, or
  ``"mean"``/``"none"``);
* **target features** ψ(z) (see *Target side* below);
* **score** τ_j(z) = ψ(z)ᵀ (ΦᵀΦ + λI)⁻¹ φ_j q_j, averaged over the ensemble. With fewer groups than
  projection dimensions (K < k) the same scores come from the K × K Gram matrix,
  ψᵀΦᵀ(ΦΦᵀ + λI)⁻¹ (push-through identity), so the solve also gets the group speedup.

Ensemble (M members). The TRAK paper (Park et al., 2023, Algorithm 1) scores
τ(z) = S((1/M Σ_m φ_m(z)ᵀ(Φ_mᵀΦ_m)⁻¹Φ_mᵀ) · (1/M Σ_m Q_m)), Q_m = diag(1 − p_i(θ_m)) and S a
soft-threshold; ``average="trak"`` is this with the ridge and without S. The default
``average="scores"`` averages the members' complete scores, τ(z) = (1/M) Σ_m ψ_m(z)ᵀ(Φ_mᵀΦ_m + λ_m I)⁻¹Φ_mᵀQ_m,
so the ensemble of M copies of one model is that model's score. Cost: the members' group
gradients are computed in one interleaved traversal of the groups and, with the shared P,
projected together (:meth:`TRAK._dense_features`): P is generated once and each pass over it
serves all members; and where it is cheaper (per point, M ≥ 2) an MLP's input layer is projected
once for all members (:meth:`TRAK._shared_input_layer`). The other layers' projections, the
kernels and the target gradients grow with M (docs/trak.md, *Ensembles*, has the measured
M = 1/5/20 times).

Sign: positive = helpful. Why it is on that scale: cross-entropy is exactly ℓ_i = softplus(−m_i),
so ∇ℓ_i = −(1 − p_i) ∇m_i = −q_i ∇m_i, and for MSE ∇ℓ_i = −(y_i − f_i) ∇f_i. Hence
φ_i q_i = −Pᵀ∇ℓ_i, and τ is the projected Gauss–Newton one-step estimate
∇f_costᵀ (H + λI)⁻¹ ∇ℓ_i of how much the target cost rises when the point is removed.

Target side (option ``target``):

* ``"output"`` — ψ(z) = Pᵀ∇out(z) at the property's target examples (TRAK as published:
  attributes the target's margin). Used by ``"auto"`` for :class:`~ggda.properties.ExampleLoss` and
  :class:`~ggda.properties.Margin` on classifiers. For ExampleLoss it differs from the exact
  chain-rule target only by the positive per-target factor (1 − p_z), so rankings per target are
  the same. For :class:`~ggda.properties.MeanLoss` it averages the targets' output features.
* ``"property"`` — ψ = −Pᵀ∇f, the property's own (cost-oriented) gradient, negated. Used by
  ``"auto"`` for MeanLoss, :class:`~ggda.properties.CallableProperty` and every regression task
  (where the prediction is not a cost and TRAK's raw output would need FiMODA's sign flip; the
  property gradient needs none).

Groups: for singletons everything reduces to per-point TRAK. For a group, φ_j sums member output
gradients and q_j sums member residuals, as in GGDA; the kernel is built from group features, so it
grows ~|S| when members' gradients align (K-Means / Grad-K-Means groups), and then the "sum" residual
makes the group score ≈ the sum of member scores (the library's convention), "mean" ≈ their mean.
TRAK is *not* linear in the group; the group score is this definition, not a sum of point scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ggda.buffers import empty_huge, shares_storage
from ggda.errors import GGDAError
from ggda.gradients.fast_factors import LayerPlan, fast_plan, layer_factors, per_example_from_factors
from ggda.gradients.fast_project import iter_projected_group_gradients
from ggda.gradients.group import iter_group_gradients
from ggda.gradients.per_example import iter_per_example_gradients
from ggda.gradients.projection import (
    DEFAULT_CACHE_MB,
    PROJECTIONS,
    IdentityProjector,
    KroneckerProjector,
    Projector,
    RandomProjector,
    make_projector,
    module_slices,
)
from ggda.methods.base import Attributor, register
from ggda.models.checkpoint import Checkpoint
from ggda.progress import Iterations
from ggda.properties import ExampleLoss, ExampleProperty, Margin, MeanLoss, Property
from ggda.task import AttributionTask, Params

OUTPUTS = ("auto", "margin", "prediction")
TARGETS = ("auto", "output", "property")
RESIDUALS = ("sum", "mean", "none")
ENSEMBLES = ("auto", "final", "checkpoints", "models")
#: Default relative ridge: λ = ridge_rel × tr(ΦᵀΦ)/k, the kernel's mean eigenvalue (docs/trak.md).
RIDGE_REL = 2.0
#: Default projection size (docs/trak.md): PROJ_DIM, lowered (powers of two, not below PROJ_MIN)
#: until every member's K × k feature matrix fits in half of ``memory_mb``; exact features when p ≤ k.
PROJ_DIM, PROJ_MIN = 2048, 512
#: ``ensemble="auto"`` uses at most this many of the latest checkpoints.
AUTO_CHECKPOINTS = 10
AVERAGES = ("scores", "trak")
SOLVERS = ("auto", "primal", "dual")
TRAK_PROJECTIONS = (*PROJECTIONS, "kronecker")


def margin_output(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct-class margin z_y − logsumexp_{c≠y} z_c = log(p/(1−p)), per example (vmap-safe)."""
    if outputs.ndim != 2 or outputs.shape[-1] < 2:
        raise GGDAError("TRAK's margin needs a classifier with >= 2 logits; use output=prediction.")
    y = y.long()
    correct = outputs.gather(-1, y[:, None])[:, 0]
    others = outputs.scatter(-1, y[:, None], float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def prediction_output(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The scalar prediction f(x) of a single-output regressor, per example."""
    if outputs.numel() != y.numel():
        raise GGDAError(
            f"TRAK's prediction output needs one output per example; got outputs {tuple(outputs.shape)}. "
            "Use output=margin for classifiers."
        )
    return outputs.reshape(y.shape)


def default_proj_dim(n_units: int, p: int, members: int = 1, memory_mb: float = 1024.0) -> int:
    """Projection size k from the number of units K (groups, or points), of parameters p and of
    ensemble members M: ``PROJ_DIM`` (2048), halved while the M feature matrices (K × k, float32)
    would exceed half of ``memory_mb`` (never below ``PROJ_MIN``), and at most p — when p ≤ k
    the exact gradients are used (no projection). docs/trak.md has the LDS measurements behind it:
    with the default ridge, LDS rises with k up to the exact features, so k is as large as the
    cost allows.
    """
    k = PROJ_DIM
    while k > PROJ_MIN and members * n_units * k * 4 > memory_mb * 2**19:
        k //= 2
    return int(min(k, p))


def _same_params(params: Params, others: list[Params]) -> bool:
    """Whether ``params`` equals (every tensor, exactly) one of ``others``."""
    for other in others:
        if params.keys() == other.keys() and all(
            params[k].shape == other[k].shape and torch.equal(params[k], other[k]) for k in params
        ):
            return True
    return False


def _row_pearson(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of A with the same row of B (NaN where one is constant)."""
    A = A - A.mean(axis=1, keepdims=True)
    B = B - B.mean(axis=1, keepdims=True)
    den = np.sqrt((A * A).sum(1) * (B * B).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (A * B).sum(1) / np.where(den > 0, den, 1.0), np.nan)


class _Stage:
    """Gathers gradient blocks into one tall matrix before projecting it.

    Why: each projection pass regenerates (or streams) all of P, and a GEMM with few rows runs
    below peak, so small blocks (a few large groups per chunk) are projected together — and, in
    an ensemble sharing one P, the blocks of *all* members are projected together, so P is read
    (or regenerated) once per stage for the whole ensemble instead of once per member. The blocks
    are written straight into slices of one buffer (``allocate``), so gathering copies nothing and
    touches no fresh memory beyond the rows used. Each block carries a key (member, group ids);
    ``sink(keys, G)`` gets the keys of G's rows in order.
    """

    def __init__(self, rows: int, p: int, dtype: torch.dtype, device, sink) -> None:
        self.rows, self.p, self.dtype, self.device, self.sink = int(rows), int(p), dtype, device, sink
        self.buffer: torch.Tensor | None = None
        self.used, self.keys = 0, []

    def allocate(self, k: int) -> torch.Tensor:
        if k > self.rows:  # taller than the stage: projected on its own
            return empty_huge(k, self.p, dtype=self.dtype, device=self.device)
        if self.used + k > self.rows:
            self.flush()
        if self.buffer is None:
            self.buffer = empty_huge(self.rows, self.p, dtype=self.dtype, device=self.device)
        view = self.buffer[self.used : self.used + k]
        self.used += k
        return view

    def add(self, key: tuple[int, np.ndarray], G: torch.Tensor) -> None:
        in_place = self.buffer is not None and shares_storage(G, self.buffer)
        if not in_place:
            if len(G) > self.rows:
                self.sink([key], G)
                return
            self.allocate(len(G)).copy_(G)  # a block made elsewhere (generic path): gather by copy
        self.keys.append(key)

    def flush(self) -> None:
        if self.used:
            self.sink(self.keys, self.buffer[: self.used])
        self.used, self.keys = 0, []


@dataclass
class _Member:
    """Training-side state of one ensemble member."""

    task: AttributionTask
    projector: Projector
    features: torch.Tensor  # Φ (K, k), task dtype
    chol: torch.Tensor  # Cholesky factor of ΦᵀΦ + λI (k × k) or, dual, of ΦΦᵀ + λI (K × K); float64
    ridge: float  # λ actually used
    dual: bool
    residual: np.ndarray  # q (K,), float64


@register("trak")
class TRAK(Attributor):
    """TRAK: projected output-gradient features, ridge kernel, residual weights, ensembles; group-native.

    Args:
        proj_dim: projection dimension k; default None: :func:`default_proj_dim` (2048, less when
            the members' K × k features would not fit in half of ``memory_mb``, exact features when
            p ≤ k).
        projection: ``rademacher`` (default, as in the TRAK library: random ±1/√k, generated 32 signs
            per random word), ``gaussian``, ``identity`` (exact features, k = p; small models) or
            ``kronecker`` (LoGra-style per-layer P_out ⊗ P_in, computed from layer factors without
            forming gradients; Linear/Conv2d models only; feature dimension ≈ ``proj_dim``).
        seed: projection seed (of every member; of member 0 with ``member_seeds``).
        member_seeds: False (default): all members share one P (seed ``seed``), generated once and
            applied to every member's gradients in the same passes; True: member m gets its own
            P_m (seed ``seed + m``, TRAK paper's Algorithm 1), each applied separately.
        per_layer: block-diagonal projection, ``proj_dim`` split over the model's layers.
        ridge: absolute λ added to ΦᵀΦ; default None → ``ridge_rel`` × tr(ΦᵀΦ)/min(K, k).
        ridge_rel: relative λ (multiple of the kernel's mean non-zero eigenvalue; default 2) used
            when ``ridge`` is None.
        residual: aggregate q over a group: ``sum`` (GGDA), ``mean``, or ``none`` (q = 1).
        target: ``auto``, ``output`` or ``property`` — what ψ(z) is (module docstring).
        output: model output function: ``auto`` (margin for cross-entropy, prediction for MSE),
            ``margin`` or ``prediction``.
        models: ensemble of independently trained models (modules, state dicts or model files).
        checkpoints: checkpoints (Checkpoint objects, files or state dicts), e.g. ``run.checkpoints``.
        ensemble: ``auto`` (default: ``models`` or else the task's model, plus the latest checkpoints,
            skipping a checkpoint equal to a model already in), ``final`` (the task's model only),
            ``checkpoints`` or ``models``.
        n_checkpoints: use only the last N checkpoints (``auto``: at most ``AUTO_CHECKPOINTS``).
        average: ``scores`` (mean of member scores) or ``trak`` (TRAK paper: mean of the
            un-weighted scores times the mean residual weights).
        agreement: record in ``info`` the per-target agreement of two independent half-size
            projections (:meth:`seed_agreement`) at every ``attribute``.
        block_rows, cache_mb: projection block size and the size (MB, default 512) under which the dense
            P is generated once and kept; above it, P is regenerated per gradient block (same numbers).
        max_dim: refuse primal kernels larger than this (k × k float64).
        solver: ``primal`` (k × k kernel), ``dual`` (K × K Gram matrix, same scores) or ``auto``
            (dual when there are fewer groups than projection dimensions).
    """

    def __init__(
        self,
        task: AttributionTask,
        proj_dim: int | None = None,
        projection: str = "rademacher",
        seed: int = 0,
        per_layer: bool = False,
        ridge: float | None = None,
        ridge_rel: float = RIDGE_REL,
        residual: str = "sum",
        target: str = "auto",
        output: str = "auto",
        models: Sequence | None = None,
        checkpoints: Sequence | None = None,
        ensemble: str | None = None,
        n_checkpoints: int | None = None,
        average: str = "scores",
        member_seeds: bool = False,
        agreement: bool = True,
        block_rows: int = 2048,
        cache_mb: float = DEFAULT_CACHE_MB,
        max_dim: int = 8192,
        solver: str = "auto",
        aggregate: str = "sum",
        max_batch: int = 2048,
        memory_mb: float = 1024.0,
    ) -> None:
        super().__init__(task, aggregate=aggregate, max_batch=max_batch, memory_mb=memory_mb)
        for name, value, allowed in (
            ("projection", projection, TRAK_PROJECTIONS),
            ("residual", residual, RESIDUALS),
            ("target", target, TARGETS),
            ("output", output, OUTPUTS),
            ("average", average, AVERAGES),
            ("solver", solver, SOLVERS),
        ):
            if value not in allowed:
                raise GGDAError(f"Unknown TRAK {name} '{value}'; choose one of {', '.join(allowed)}.")
        if (ridge is not None and ridge < 0) or ridge_rel < 0:
            raise GGDAError("TRAK's ridge must be >= 0 (pass e.g. --opt ridge=1e-3).")
        if proj_dim is not None and int(proj_dim) < 1:
            raise GGDAError(f"TRAK's proj_dim must be a positive integer; got {proj_dim}.")
        self.proj_dim, self.projection, self.seed, self.per_layer = proj_dim, projection, int(seed), per_layer
        self.agreement, self.member_seeds = bool(agreement), bool(member_seeds)
        self.info: dict = {}
        self.ridge, self.ridge_rel = ridge, float(ridge_rel)
        self.residual_mode, self.target, self.average = residual, target, average
        self.block_rows, self.cache_mb, self.max_dim = int(block_rows), float(cache_mb), int(max_dim)
        self.solver = solver
        self.output = self._resolve_output(output)
        self.output_fn = margin_output if self.output == "margin" else prediction_output
        self.ensemble = self._resolve_ensemble(ensemble, models, checkpoints, n_checkpoints)
        self.members: list[_Member] = []

    # -- configuration ------------------------------------------------------------------------
    def _resolve_output(self, output: str) -> str:
        if output != "auto":
            return output
        if self.task.loss_kind == "cross-entropy":
            return "margin"
        if self.task.loss_kind == "squared-error":
            return "prediction"
        raise GGDAError(
            "TRAK cannot infer the model output from a custom loss; pass output=margin (classifier) "
            "or output=prediction (single-output regressor)."
        )

    def _resolve_ensemble(self, ensemble, models, checkpoints, n_checkpoints) -> list:
        """Ensemble sources (``None`` = the task's model).

        ``auto`` (default): the given ``models`` (else the task's model) plus the latest
        checkpoints (at most ``AUTO_CHECKPOINTS``, or ``n_checkpoints``); a checkpoint equal to a
        model already in the ensemble (the final epoch's) is skipped at ``cache`` time.
        """
        ensemble = ensemble or "auto"
        if ensemble not in ENSEMBLES:
            raise GGDAError(f"Unknown TRAK ensemble '{ensemble}'; choose one of {', '.join(ENSEMBLES)}.")
        self.ensemble_mode = ensemble
        if n_checkpoints is not None and n_checkpoints < 1:
            raise GGDAError(f"n_checkpoints must be >= 1; got {n_checkpoints}.")
        if ensemble == "final":
            return [None]
        if ensemble == "models":
            if not models:
                raise GGDAError("ensemble=models needs models=[...] (trained modules or model files).")
            return list(models)
        if ensemble == "auto":
            last = AUTO_CHECKPOINTS if n_checkpoints is None else int(n_checkpoints)
            return (list(models) if models else [None]) + list(checkpoints or [])[-last:]
        if not checkpoints:
            raise GGDAError(
                "ensemble=checkpoints needs checkpoints; train with checkpoints (`ggda train`) or pass them."
            )
        chosen = list(checkpoints)
        if n_checkpoints is not None:
            chosen = chosen[-int(n_checkpoints) :]
        return chosen

    def resolved_proj_dim(self, task: AttributionTask, n_units: int) -> int:
        """k: ``proj_dim`` if given, else :func:`default_proj_dim` of the units and parameters."""
        if self.projection == "identity":
            return task.n_params
        if self.proj_dim is not None:
            return int(self.proj_dim)
        return default_proj_dim(n_units, task.n_params, len(self.ensemble), self.memory_mb)

    def _member_task(self, source) -> AttributionTask:
        if source is None:
            return self.task
        if isinstance(source, AttributionTask):
            return source
        if isinstance(source, nn.Module):
            return AttributionTask(source, self.task.loss_fn, self.task.layers, self.task.device)
        if isinstance(source, Checkpoint):
            return self.task.at(source.path)
        if isinstance(source, tuple) and len(source) == 2:  # TracIn-style (state, lr)
            source = source[0]
        if isinstance(source, (str, Path, dict)):
            return self.task.at(source)
        raise GGDAError(
            f"TRAK ensemble members must be modules, checkpoints, model files or state dicts; got {type(source)}."
        )

    def _member_seed(self, m: int) -> int:
        """Projection seed of member m: ``seed`` for all (one shared P), or ``seed + m`` (``member_seeds``)."""
        return self.seed + m if self.member_seeds else self.seed

    def _projector(self, task: AttributionTask, m: int) -> Projector:
        p = task.n_params
        k = self.resolved_proj_dim(task, self.grouping.n_groups)
        names, slices = module_slices(task) if self.per_layer else (None, None)
        exact = self.projection == "identity" or (self.proj_dim is None and k >= p)
        return make_projector(
            "identity" if exact else self.projection,
            p,
            k,
            seed=self._member_seed(m),
            device=task.device,
            dtype=task.dtype,
            layer_slices=slices,
            layer_names=names,
            block_rows=self.block_rows,
            cache_mb=self.cache_mb,
        )

    def _chunk_rows(self, p: int, dtype: torch.dtype) -> int:
        return max(1, int(min(256.0, self.memory_mb) * 2**20 // (p * torch.finfo(dtype).bits // 8)))

    # -- training side ------------------------------------------------------------------------
    def point_residuals(self, task: AttributionTask, params: Params | None = None) -> np.ndarray:
        """(n,) per-point q_i from a forward pass over the training set (:meth:`residuals_from_values`)."""
        params = task.params() if params is None else params
        X, y = task.to_tensor(self.train.X, self.train.y)
        values = torch.empty(len(X), dtype=torch.float64, device=X.device)
        with torch.no_grad():
            for start in range(0, len(X), self.max_batch):
                rows = slice(start, start + self.max_batch)
                values[rows] = self.output_fn(task.forward(params, X[rows]), y[rows]).double()
        return self.residuals_from_values(task, values)

    def residuals_from_values(self, task: AttributionTask, values: torch.Tensor) -> np.ndarray:
        """q_i = 1 − p_i(correct) = sigmoid(−margin_i), or the residual y_i − f_i, from output values (n,)."""
        if self.output == "margin":
            return torch.sigmoid(-values).cpu().numpy()
        _, y = task.to_tensor(self.train.X, self.train.y)
        return (y.double().reshape(values.shape) - values).cpu().numpy()

    def _group_residuals(self, q: np.ndarray) -> np.ndarray:
        K = self.grouping.n_groups
        if self.residual_mode == "none":
            return np.ones(K)
        summed = np.bincount(self.grouping.labels, weights=q, minlength=K)
        return summed / self.grouping.sizes if self.residual_mode == "mean" else summed

    def _use_dual(self, K: int, k: int) -> bool:
        dual = self.solver == "dual" or (self.solver == "auto" and K < k)
        n = K if dual else k
        if n > self.max_dim:
            what = f"{K} groups" if dual else f"{k} projection dimensions"
            raise GGDAError(
                f"TRAK would factor a {n} x {n} matrix ({what}; over max_dim={self.max_dim}); lower proj_dim "
                "or use fewer groups (a random projection instead of identity), or raise max_dim."
            )
        return dual

    def _factorise(self, features: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
        """Cholesky factor of the ridge kernel, in the primal (k × k) or dual (K × K) form.

        (ΦᵀΦ + λI)⁻¹Φᵀ = Φᵀ(ΦΦᵀ + λI)⁻¹ (push-through identity), so with fewer groups than
        projection dimensions the K × K Gram matrix gives the same scores at O(K³) instead of O(k³):
        the kernel solve, too, gets GGDA's group speedup.
        """
        K, k = features.shape
        dual = self._use_dual(K, k)
        n = K if dual else k
        kernel = torch.zeros(n, n, dtype=torch.float64, device=features.device)
        step = self._chunk_rows(max(k, K), torch.float64)
        if dual:
            for start in range(0, k, step):
                F = features[:, start : start + step].double()
                kernel.addmm_(F, F.T)
        else:
            for start in range(0, K, step):
                F = features[start : start + step].double()
                kernel.addmm_(F.T, F)
        # relative ridge: ridge_rel × the mean *non-zero* eigenvalue (the kernel's rank is ≤ min(K, k))
        ridge = self.ridge if self.ridge is not None else self.ridge_rel * float(kernel.trace()) / min(K, k)
        kernel.diagonal().add_(ridge)
        chol, info = torch.linalg.cholesky_ex(kernel)
        if int(info) != 0:
            raise GGDAError(
                f"TRAK's kernel is singular (ridge {ridge:.3g}); pass a larger --opt ridge=... or ridge_rel=..."
            )
        return chol, float(ridge), dual

    def _kronecker_features(self, task: AttributionTask, m: int, params: Params):
        """Φ from layer factors with a per-layer Kronecker sketch (no gradient is ever formed)."""
        it = iter_projected_group_gradients(
            task,
            self.train.X,
            self.train.y,
            self.grouping,
            self.resolved_proj_dim(task, self.grouping.n_groups),
            seed=self._member_seed(m),
            fn=self.output_fn,
            params=params,
            max_batch=self.max_batch,
        )
        if it is None:
            raise GGDAError(
                "TRAK projection=kronecker needs a model made only of nn.Linear/Conv2d layers (and the fast "
                "gradient paths on, gradients='auto' on the task); use projection=gaussian for this model."
            )
        features, projector = None, None
        bar = Iterations(
            f"TRAK model {m + 1}: Kronecker-projected group gradients", self.grouping.n_groups, what="group"
        )
        for gids, phi, proj in it:
            bar.step(len(gids))
            if features is None:
                projector = KroneckerProjector(proj)
                self._use_dual(self.grouping.n_groups, projector.k)
                features = torch.zeros(
                    self.grouping.n_groups, projector.k, dtype=task.dtype, device=task.device
                )
            features[torch.as_tensor(gids, device=task.device)] = phi
        bar.close()
        return projector, features

    def _projectors(self, tasks: list[AttributionTask]) -> list[Projector]:
        """One projector per member: the *same object* for all (one seeded P, generated once) unless
        ``member_seeds``, where member m gets its own P (seed + m)."""
        if self.member_seeds:
            return [self._projector(t, m) for m, t in enumerate(tasks)]
        sizes = sorted({t.n_params for t in tasks})
        if len(sizes) > 1:
            raise GGDAError(
                f"TRAK's ensemble members share one projection, so they need the same number of parameters "
                f"(got {', '.join(map(str, sizes))}); pass member_seeds=true to give each member its own."
            )
        shared = self._projector(tasks[0], 0)
        return [shared] * len(tasks)

    def _dense_features(
        self,
        tasks: list[AttributionTask],
        params: list[Params],
        projectors: list[Projector],
        values: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """Φ_m of every member in one traversal of the groups.

        The members' group-gradient streams are interleaved chunk by chunk (same groups, same
        order) into one stage buffer, and a stage is projected with one GEMM when the members share
        P: the projection matrix is generated once and each pass over it (or regeneration of it,
        when it does not fit ``cache_mb``) serves all M members. Gradient flops and projection flops
        stay M × one model's; P's generation, streaming and the per-pass overheads do not grow with M.
        """
        K, M = self.grouping.n_groups, len(tasks)
        for proj in {id(pr): pr for pr in projectors}.values():
            self._use_dual(K, proj.k)  # refuse an oversized solve before the gradient pass
        features = [
            torch.zeros(K, pr.k, dtype=t.dtype, device=t.device)
            for t, pr in zip(tasks, projectors, strict=True)
        ]
        shared = all(pr is projectors[0] for pr in projectors)
        layer = self._shared_input_layer(tasks, params, projectors) if shared and M > 1 else None
        self.info["shared_input_layer"] = None if layer is None else layer[0][0].layers[layer[1]].weight
        if layer is not None:
            return self._features_sharing_input(tasks, params, projectors[0], layer, values)
        block_mb = min(256.0, self.memory_mb / 4)

        def sink(keys: list[tuple[int, np.ndarray]], G: torch.Tensor) -> None:
            out = projectors[keys[0][0]].project(G) if shared else None
            row = 0
            for m, gids in keys:
                rows = slice(row, row + len(gids))
                phi = out[rows] if shared else projectors[m].project(G[rows])
                features[m].index_copy_(0, torch.as_tensor(gids, device=phi.device), phi)
                row += len(gids)

        stages: dict[int, _Stage] = {}  # one per parameter count (members of one architecture share it)
        for t in tasks:
            if t.n_params not in stages:
                rows = max(128, int(block_mb * 2**20 // (t.n_params * torch.finfo(t.dtype).bits // 8)))
                stages[t.n_params] = _Stage(rows, t.n_params, t.dtype, t.device, sink)
        iters = [
            iter_group_gradients(
                t,
                self.train.X,
                self.train.y,
                self.grouping,
                fn=self.output_fn,
                params=params[m],
                max_batch=self.max_batch,
                memory_mb=min(256.0, self.memory_mb),
                block_mb=block_mb,  # tall blocks: fewer passes over P, faster projection GEMMs
                values_out=values[m],
                allocate=stages[t.n_params].allocate,  # blocks are written straight into the stage
            )
            for m, t in enumerate(tasks)
        ]
        what = "model" if M == 1 else f"{M} models"
        with Iterations(f"TRAK: projected group gradients ({what})", K * M, what="group") as bar:
            active = list(range(M))
            while active:  # round robin: each member's next block is added before the next member's
                for m in list(active):
                    block = next(iters[m], None)
                    if block is None:
                        active.remove(m)
                        continue
                    stages[tasks[m].n_params].add((m, block[0]), block[1])
                    bar.step(len(block[0]))
        for stage in stages.values():
            stage.flush()
        return features

    def _shared_input_layer(
        self, tasks: list[AttributionTask], params: list[Params], projectors: list[Projector]
    ) -> tuple[list[LayerPlan], int] | None:
        """The layer whose projection the members can share, when that is cheaper; else None.

        A ``nn.Linear`` layer that reads the model input x (an MLP's first layer) has per-example
        weight gradient δ_i^(m) xᵢᵀ in every member m: its projection Σ_o δ_io^(m) (xᵢᵀ P_o), with
        P_o the rows of the shared P for output unit o, needs xᵢᵀP_o — the same for all members —
        once, then d_out·k per example and member instead of d_in·d_out·k. The rest of the
        parameters are projected per member as usual, per example, then summed over each group.
        Used when all members have verified layer-factor plans, P is a dense sketch kept in memory
        (``cache_mb``), and the estimated multiply-adds, n·k·(d_in·d_out + M·(d_out + p − d_in·d_out)),
        are below those of projecting the M members' K group gradients, M·K·p·k (so never for
        M = 1, rarely for few large groups).
        """
        proj = projectors[0]
        if not isinstance(proj, RandomProjector) or not proj._cacheable:
            return None
        Xt, yt = tasks[0].to_tensor(self.train.X, self.train.y)
        if not isinstance(Xt, torch.Tensor) or len(yt) == 0:
            return None
        plans = [fast_plan(t, Xt, yt, self.output_fn, pm) for t, pm in zip(tasks, params, strict=True)]
        if any(plan is None for plan in plans):
            return None
        probe = Xt[:4]
        factors = layer_factors(tasks[0], plans[0], probe, yt[:4], self.output_fn, params[0])
        flat_x = probe.reshape(len(probe), -1)
        best, best_w = None, 0
        for i, (spec, a) in enumerate(zip(plans[0].layers, factors.A, strict=True)):
            w = spec.d_in * spec.d_out
            if (
                spec.kind == "linear"
                and spec.weight is not None
                and a.shape[1] == 1
                and a.shape[2] == flat_x.shape[1]
                and torch.equal(a[:, 0], flat_x.to(a.dtype))
                and w > best_w
            ):
                best, best_w = i, w
        if best is None:
            return None

        def where(plan: LayerPlan) -> tuple:
            spec = plan.layers[best] if best < len(plan.layers) else None
            return None if spec is None else (spec.weight, spec.d_in, spec.d_out, spec.kind, plan.slices)

        if any(
            where(plan) != where(plans[0]) for plan in plans[1:]
        ):  # same layer, same place in every member
            return None
        n, K, M, p, d_out = len(yt), self.grouping.n_groups, len(tasks), proj.p, plans[0].layers[best].d_out
        if n * (best_w + M * (d_out + p - best_w)) >= M * K * p:
            return None
        return plans, best

    def _features_sharing_input(
        self,
        tasks: list[AttributionTask],
        params: list[Params],
        projector: RandomProjector,
        shared: tuple[list[LayerPlan], int],
        values: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """Φ_m of every member with the input layer's projection shared (:meth:`_shared_input_layer`)."""
        plans, layer = shared
        spec, plan0 = plans[0].layers[layer], plans[0]
        K, M, k, p = self.grouping.n_groups, len(tasks), projector.k, projector.p
        w_rows = plan0.slices[spec.weight]
        # P's rows of the weight, (d_out·d_in, k) in row-major (o, j) order -> (d_in, d_out·k)
        Pw = projector.rows(w_rows.start, w_rows.stop)
        Pw = Pw.view(spec.d_out, spec.d_in, k).permute(1, 0, 2).reshape(spec.d_in, spec.d_out * k)
        rest = [(a, b) for a, b in ((0, w_rows.start), (w_rows.stop, p)) if b > a]
        P_rest = [projector.rows(a, b) for a, b in rest]
        task = tasks[0]
        Xt, yt = task.to_tensor(self.train.X, self.train.y)
        labels = torch.as_tensor(self.grouping.labels, device=task.device)
        features = [torch.zeros(K, k, dtype=t.dtype, device=t.device) for t in tasks]
        itemsize = torch.finfo(task.dtype).bits // 8
        budget = min(64.0, self.memory_mb / 4) * 2**20
        chunk = max(1, min(self.max_batch, int(budget // (itemsize * max(spec.d_out * k, p)))))
        # buffers reused by every chunk (fresh pages for each chunk's outputs cost more than the GEMMs)
        G = torch.empty(chunk, p, dtype=task.dtype, device=task.device)
        XP_buf = torch.empty(chunk, spec.d_out * k, dtype=task.dtype, device=task.device)
        PHI_buf = torch.empty(chunk, M, k, dtype=task.dtype, device=task.device)
        n = len(yt)
        with Iterations(
            f"TRAK: projected gradients ({M} models, shared input layer)", n * M, what="point"
        ) as bar:
            for start in range(0, n, chunk):
                rows = slice(start, min(n, start + chunk))
                B = rows.stop - rows.start
                fs = [
                    layer_factors(tasks[m], plans[m], Xt[rows], yt[rows], self.output_fn, params[m])
                    for m in range(M)
                ]
                XP = torch.mm(fs[0].A[layer][:, 0], Pw, out=XP_buf[:B])  # x_iᵀP_o, once for all members
                # Σ_o δ_io^(m) x_iᵀP_o for all members at once: per example an (M × d_out)(d_out × k) GEMM
                D = torch.cat([f.D[layer] for f in fs], 1)  # (B, M, d_out)
                PHI = torch.bmm(D, XP.view(B, spec.d_out, k), out=PHI_buf[:B])  # (B, M, k)
                for m, f in enumerate(fs):
                    phi = PHI[:, m].contiguous()
                    g = per_example_from_factors(plans[m], f, out=G[:B])
                    for (a, b), Pr in zip(rest, P_rest, strict=True):
                        phi.addmm_(g[:, a:b], Pr)
                    features[m].index_add_(0, labels[rows], phi)
                    values[m][rows] = f.values.to(values[m].dtype)
                    bar.step(B)
        return features

    def _cache(self) -> None:
        self.info = {}
        tasks: list[AttributionTask] = []
        kept: list[Params] = []
        skipped = 0
        for source in self.ensemble:
            task = self._member_task(source)
            params = task.params()
            if self.ensemble_mode == "auto" and _same_params(params, kept):
                skipped += 1  # e.g. the last checkpoint is the final model
                continue
            tasks.append(task)
            kept.append(params)
        n = len(self.train)
        values = [torch.full((n,), float("nan"), dtype=torch.float64, device=t.device) for t in tasks]
        if self.projection == "kronecker":
            built = [self._kronecker_features(t, m, kept[m]) for m, t in enumerate(tasks)]
        else:  # the gradient pass also records every point's output value (no second forward)
            projectors = self._projectors(tasks)
            built = list(zip(projectors, self._dense_features(tasks, kept, projectors, values), strict=True))
        self.members = []
        for m, (task, (projector, features)) in enumerate(zip(tasks, built, strict=True)):
            chol, ridge, dual = self._factorise(features)
            if bool(torch.isnan(values[m]).any()):
                q = self.point_residuals(task, kept[m])
            else:
                q = self.residuals_from_values(task, values[m])
            residual = self._group_residuals(q)
            self.members.append(_Member(task, projector, features, chol, ridge, dual, residual))
        self.info = {
            "shared_input_layer": self.info.get("shared_input_layer"),
            "ensemble": self.ensemble_mode,
            "members": len(self.members),
            "duplicates_skipped": skipped,
            "proj_dim": int(self.members[0].projector.k),
            "proj_dim_rule": "auto" if self.proj_dim is None and self.projection != "identity" else "given",
            "proj_seeds": [self._member_seed(m) for m in range(len(self.members))],
            "exact_features": isinstance(self.members[0].projector, IdentityProjector),
            "ridge": [m.ridge for m in self.members],
            "ridge_rel": None if self.ridge is not None else self.ridge_rel,
        }

    # -- target side --------------------------------------------------------------------------
    def target_mode(self, prop: Property) -> str:
        """``output`` or ``property``: how ψ(z) is formed for this property (module docstring)."""
        if self.target != "auto":
            return self.target
        if self.output == "margin" and isinstance(prop, (ExampleLoss, Margin)):
            return "output"
        return "property"

    def target_features(self, member: _Member, prop: Property) -> torch.Tensor:
        """(T, k) ψ in float64 of one member (:meth:`ensemble_target_features`)."""
        return self.ensemble_target_features(prop, [member])[0]

    def ensemble_target_features(
        self, prop: Property, members: list[_Member] | None = None
    ) -> list[torch.Tensor]:
        """(T, k) ψ_m in float64 per member: projected target gradients, oriented so positive = helpful.

        The members' target gradients go through one stage, so with a shared P a stage of all
        members' rows is projected in one pass over P (as on the training side).
        """
        members = self.members if members is None else members
        mode = self.target_mode(prop)
        if mode == "output":
            if isinstance(prop, MeanLoss):
                X, y, mean = prop.inner.X, prop.inner.y, True
            elif isinstance(prop, ExampleProperty):
                X, y, mean = prop.X, prop.y, False
            else:
                raise GGDAError(
                    "target=output needs target examples (test-loss, margin or mean-test-loss); "
                    "use target=property for this property."
                )
        shared = all(m.projector is members[0].projector for m in members)
        out: list[torch.Tensor | None] = [None] * len(members)

        def sink(keys: list[tuple[int, np.ndarray]], G: torch.Tensor) -> None:
            phi = members[keys[0][0]].projector.project(G).double() if shared else None
            row = 0
            for m, idx in keys:
                rows = slice(row, row + len(idx))
                part = phi[rows] if shared else members[m].projector.project(G[rows]).double()
                out[m][torch.as_tensor(idx, device=part.device)] = part
                row += len(idx)

        task0 = members[0].task
        stage = _Stage(
            self._chunk_rows(task0.n_params, task0.dtype), task0.n_params, task0.dtype, task0.device, sink
        )
        for m, member in enumerate(members):
            task = member.task
            if task.n_params != stage.p:  # members of another size (member_seeds): their own stage
                stage.flush()
                stage = _Stage(
                    self._chunk_rows(task.n_params, task.dtype), task.n_params, task.dtype, task.device, sink
                )
            chunk = self._chunk_rows(task.n_params, task.dtype)
            if mode == "output":
                out[m] = torch.zeros(len(y), member.projector.k, dtype=torch.float64, device=task.device)
                for rows, G in iter_per_example_gradients(task, X, y, fn=self.output_fn, chunk_size=chunk):
                    stage.add((m, np.arange(rows.start, rows.stop)), G)
            else:
                grads = prop.gradients(task)
                out[m] = torch.zeros(len(grads), member.projector.k, dtype=torch.float64, device=task.device)
                for s in range(0, len(grads), chunk):
                    stage.add((m, np.arange(s, min(s + chunk, len(grads)))), grads[s : s + chunk])
        stage.flush()
        if mode == "output":
            return [psi.mean(0, keepdim=True) if mean else psi for psi in out]
        return [-psi for psi in out]

    def unweighted_scores(self, member: _Member, prop: Property) -> torch.Tensor:
        """(T, K) ψᵀ(ΦᵀΦ + λI)⁻¹φ_j, before the residual weights."""
        psi = self.target_features(member, prop)
        return self._solve(psi, member.features, member.chol, member.dual)

    def _solve(self, psi: torch.Tensor, Phi: torch.Tensor, chol: torch.Tensor, dual: bool) -> torch.Tensor:
        """(T, K) ψᵀ(ΦᵀΦ + λI)⁻¹Φᵀ given the Cholesky factor of the primal or dual kernel."""
        K = Phi.shape[0]
        step = self._chunk_rows(Phi.shape[1], torch.float64)
        if dual:  # ψΦᵀ (ΦΦᵀ + λI)⁻¹
            B = torch.zeros(K, psi.shape[0], dtype=torch.float64, device=psi.device)
            for start in range(0, K, step):
                B[start : start + step] = Phi[start : start + step].double() @ psi.T
            return torch.cholesky_solve(B, chol).T
        W = torch.cholesky_solve(psi.T.contiguous(), chol)  # (ΦᵀΦ + λI)⁻¹ψᵀ, (k, T)
        out = torch.zeros(psi.shape[0], K, dtype=torch.float64, device=psi.device)
        for start in range(0, K, step):
            out[:, start : start + step] = (Phi[start : start + step].double() @ W).T
        return out

    def _attribute(self, prop: Property) -> np.ndarray:
        if not self.members:
            raise GGDAError("TRAK has no cached features; call cache(train, grouping) first.")
        psis = self.ensemble_target_features(prop)
        U = [
            self._solve(psi, m.features, m.chol, m.dual).cpu().numpy()
            for psi, m in zip(psis, self.members, strict=True)
        ]
        scores = self._combine(U)
        if self.agreement:
            self.info.update(self.seed_agreement(psis))
        return scores

    def _combine(self, U: list[np.ndarray]) -> np.ndarray:
        Q = [m.residual for m in self.members]
        if self.average == "trak":
            return np.mean(U, axis=0) * np.mean(Q, axis=0)[None, :]
        return np.mean([u * q[None, :] for u, q in zip(U, Q, strict=True)], axis=0)

    def seed_agreement(self, psis: list[torch.Tensor]) -> dict:
        """Per-target agreement of two independent projections, from the features already held.

        The k projection columns are i.i.d., so the even and the odd columns are two independent
        k/2-dimensional sketches of the same gradients. Each half gets its own kernel (same
        relative ridge) and ensemble scores; the Pearson correlation of the two halves' scores,
        per target over the groups, is reported (mean, min, median). It is the agreement of two
        projection seeds at *half* the size, so a lower bound on the full sketch's. Not defined
        for exact features (``identity``: 1.0) nor for structured sketches (``kronecker``,
        ``per_layer``), where columns are not exchangeable.
        """
        if isinstance(self.members[0].projector, IdentityProjector):
            return {"seed_agreement": 1.0, "seed_agreement_note": "exact features (no projection)"}
        if self.projection == "kronecker" or self.per_layer:
            kind = "per_layer" if self.per_layer else "kronecker"
            return {"seed_agreement_note": f"not estimated for {kind} sketches (columns not exchangeable)"}
        if self.grouping.n_groups < 3 or self.members[0].projector.k < 4:
            return {"seed_agreement_note": "too few groups or projection dimensions to estimate"}
        halves = []
        for start in (0, 1):
            U = []
            for psi, m in zip(psis, self.members, strict=True):
                Phi = m.features[:, start::2]
                chol, _, dual = self._factorise(Phi)
                U.append(self._solve(psi[:, start::2], Phi, chol, dual).cpu().numpy())
            halves.append(self._combine(U))
        r = _row_pearson(*halves)
        ok = r[np.isfinite(r)]
        if not len(ok):
            return {"seed_agreement_note": "scores are constant per target"}
        return {
            "seed_agreement": float(ok.mean()),
            "seed_agreement_min": float(ok.min()),
            "seed_agreement_median": float(np.median(ok)),
            "seed_agreement_dim": int(self.members[0].projector.k // 2),
        }
