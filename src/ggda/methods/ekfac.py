"""EK-FAC influence (George et al. 2018; Grosse et al. 2023): eigenvalue-corrected Kronecker factors.

The Gauss–Newton matrix of the mean training loss is approximated block-diagonally, one block
per ``nn.Linear`` / ``nn.Conv2d`` layer. For a layer with inputs a (bias appended as a constant 1;
Conv2d inputs unfolded into patches, one row per output location) and output gradients ds:

1. K-FAC factors A = Σ a aᵀ and S = Σ ds dsᵀ over examples (and locations), and their
   eigenbases Q_A, Q_S;
2. eigenvalue correction: Λ*_{kl} = (1/n) Σ_i Σ_c ((Q_Sᵀ DW_{ic} Q_A)_{kl})², the exact diagonal of
   the layer's Gauss–Newton block in the Kronecker eigenbasis (DW_{ic} = Σ_t ds_t a_tᵀ is the
   example's weight-gradient matrix for output cotangent c);
3. (G_l + λI)⁻¹ V = Q_S [(Q_Sᵀ V Q_A) / (Λ* + λ + wd)] Q_Aᵀ.

Output cotangents: with ``fisher="expected"`` (default) the per-example loss Hessian ∇²_z ℓ_i is
factorised as Σ_c u_c u_cᵀ (eigendecomposition, any loss), so Σ_c DW_{ic} DW_{ic}ᵀ-type sums are the
*exact* Gauss–Newton (= true Fisher for cross-entropy) rather than a sampled estimate; for a
one-layer model with squared error the result equals the exact GN inverse. ``fisher="empirical"``
uses the loss gradient at the true labels instead (the empirical Fisher, one cotangent per example).

Scores follow the IF family (:mod:`ggda.methods.influence`): ∇fᵀ (G + λI)⁻¹ g_S / n, positive =
helpful, damping by the IF family's rule (λ_max here is the largest corrected eigenvalue).
"""

from __future__ import annotations

import warnings

import torch

from ggda.errors import GGDAError
from ggda.methods.base import register
from ggda.methods.influence import InfluenceFunction
from ggda.methods.kronecker import FISHERS, KroneckerFactors, KroneckerLayer, kronecker_layers
from ggda.models.analysis import analyse
from ggda.task import AttributionTask

__all__ = [
    "EKFAC",
    "FISHERS",
    "KroneckerLayer",
    "kronecker_layers",
    "skipped_layers_notice",
    "supported_task",
]


def skipped_layers_notice(task: AttributionTask, missing: list[str], shown: int = 20) -> str:
    """One line naming the layers (module name and type) whose parameters EK-FAC leaves out."""
    modules = dict(task.model.named_modules())
    layers: dict[str, str] = {}
    for name in missing:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        module = modules.get(owner)
        layers.setdefault(owner or name, type(module).__name__ if module is not None else "parameter")
    names = [f"{layer} ({kind})" for layer, kind in layers.items()]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    kept = len(task.param_names) - len(missing)
    return (
        f"ggda: EK-FAC skips {len(layers)} layer(s) outside nn.Linear/nn.Conv2d: {', '.join(names[:shown])}{more} "
        f"({len(missing)} parameter tensors, as Kronfluence does); its scores cover the other {kept}."
    )


def supported_task(task: AttributionTask) -> AttributionTask:
    """The task restricted to its Linear/Conv2d parameters, with a notice naming what is skipped
    (normalisation layers, embeddings: Kronfluence skips them the same way)."""
    missing = analyse(task).unsupported
    if not missing:
        return task
    if len(missing) == len(task.param_names):
        raise GGDAError(
            "EK-FAC covers nn.Linear and nn.Conv2d parameters only and the task attributes none; "
            "use --method if-cg."
        )
    warnings.warn(skipped_layers_notice(task, missing), RuntimeWarning, stacklevel=3)
    return task.with_params([n for n in task.param_names if n not in missing])


@register("ekfac")
class EKFAC(InfluenceFunction):
    """EK-FAC influence: block-diagonal, Kronecker-factored, eigenvalue-corrected Gauss–Newton.

    Args:
        fisher: ``"expected"`` (exact GN through the loss-Hessian factorisation, default) or
            ``"empirical"`` (gradients at the true labels).
        **options: the IF options of :class:`~ggda.methods.influence.InfluenceFunction`
            (``damping``, ``damping_scale``, ``weight_decay``, ``chunk_size``, ...). The Hessian
            is always Gauss–Newton here; ``hessian="exact"`` is refused.
    """

    def __init__(self, task: AttributionTask, fisher: str = "expected", **options) -> None:
        if options.get("hessian", "gn") != "gn":
            raise GGDAError(
                "EK-FAC approximates the Gauss-Newton matrix only; drop --opt hessian or use if-cg."
            )
        options["hessian"] = "gn"
        super().__init__(supported_task(task), **options)
        if fisher not in FISHERS:
            raise GGDAError(f"Unknown fisher '{fisher}'; choose expected or empirical.")
        self.fisher = fisher
        self.layers = kronecker_layers(self.task)

    # -- training side ------------------------------------------------------------------------
    def _prepare(self) -> None:  # the factors do not depend on λ
        self.factors = KroneckerFactors(self.task, self.layers, self.fisher, self.progress)
        self.factors.fit(self.curvature.Xt, self.curvature.yt, self.chunk_size, corrected=True)
        self.info.update(layers=[ly.name for ly in self.layers])

    def _top_eigenvalue(self) -> float:
        """The largest corrected eigenvalue (+ wd): λ_max of EK-FAC's own curvature."""
        return self.factors.top_eigenvalue() + self.weight_decay

    # -- property side ------------------------------------------------------------------------
    def _solve(self, B: torch.Tensor) -> torch.Tensor:
        return self.factors.solve(B, self.lambda_ + self.weight_decay)
