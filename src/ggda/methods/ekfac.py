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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, vmap

from ggda.errors import GGDAError
from ggda.methods.base import register
from ggda.methods.influence import InfluenceFunction
from ggda.models.analysis import analyse, conv_padding
from ggda.models.capture import Capture
from ggda.progress import Iterations
from ggda.task import AttributionTask

FISHERS = ("expected", "empirical")


@dataclass
class KroneckerLayer:
    """One supported layer: where its parameters sit in the flat vector, and its factors."""

    name: str
    module: nn.Module
    weight: slice | None
    bias: slice | None
    out_features: int
    in_features: int  # of the weight matrix (Cin·kh·kw for Conv2d); 0 if the weight is not attributed
    QA: torch.Tensor | None = None
    QS: torch.Tensor | None = None
    eigenvalues: torch.Tensor | None = None  # (out, in_aug) corrected Λ*
    stats: dict = field(default_factory=dict)

    @property
    def in_aug(self) -> int:
        return self.in_features + (1 if self.bias is not None else 0)

    def to_matrix(self, V: torch.Tensor) -> torch.Tensor:
        """(T, p) flat vectors -> (T, out, in_aug) layer matrices [W | b]."""
        parts = []
        if self.weight is not None:
            parts.append(V[:, self.weight].reshape(len(V), self.out_features, -1))
        if self.bias is not None:
            parts.append(V[:, self.bias][..., None])
        return torch.cat(parts, dim=-1)

    def write(self, M: torch.Tensor, out: torch.Tensor) -> None:
        """Scatter (T, out, in_aug) matrices back into flat vectors ``out``."""
        if self.weight is not None:
            out[:, self.weight] = M[..., : self.in_features].reshape(len(M), -1)
        if self.bias is not None:
            out[:, self.bias] = M[..., -1]

    def inputs(self, a: torch.Tensor) -> torch.Tensor:
        """Layer input -> (B, L, in_aug) rows (patches for Conv2d, bias column appended)."""
        B = a.shape[0]
        if isinstance(self.module, nn.Conv2d):
            m = self.module
            cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=conv_padding(m), stride=m.stride)
            a = cols.transpose(1, 2)
        else:
            a = a.reshape(B, -1, a.shape[-1])
        parts = [a] if self.weight is not None else []
        if self.bias is not None:
            parts.append(torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device))
        return torch.cat(parts, dim=-1)

    def output_grads(self, ds: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the layer output -> (B, L, out)."""
        B = ds.shape[0]
        if isinstance(self.module, nn.Conv2d):
            return ds.reshape(B, ds.shape[1], -1).transpose(1, 2)
        return ds.reshape(B, -1, ds.shape[-1])


def kronecker_layers(task: AttributionTask) -> list[KroneckerLayer]:
    """The Kronecker blocks of the task's attributed Linear/Conv2d layers (the model analysis of
    :mod:`ggda.models.analysis` decides which modules qualify)."""
    slices = task.layer_slices()
    layers = []
    for ly in analyse(task).factor_layers:
        weight = ly.module.weight
        layers.append(
            KroneckerLayer(
                name=ly.name,
                module=ly.module,
                weight=slices[ly.weight] if ly.weight else None,
                bias=slices[ly.bias] if ly.bias else None,
                out_features=weight.shape[0],
                in_features=weight[0].numel() if ly.weight else 0,
            )
        )
    if not layers:
        raise GGDAError(
            "EK-FAC covers nn.Linear and nn.Conv2d parameters only and the task attributes none; "
            "use --method if-cg."
        )
    return layers


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

    # -- per-chunk passes ---------------------------------------------------------------------
    def _cotangents(self, z: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Output cotangents u with Σ_c u_c u_cᵀ = ∇²_z ℓ (expected) or u = ∇_z ℓ (empirical)."""
        loss_fn, shape = self.task.loss_fn, z.shape[1:]
        zf = z.detach().reshape(len(z), -1)
        if self.fisher == "empirical":
            zr = zf.clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(loss_fn(zr.reshape(z.shape), y).sum(), zr)
            return [g]

        def one(zi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return loss_fn(zi.reshape(1, *shape), yi[None])[0]

        HL = vmap(hessian(one))(zf, y)  # (B, C, C)
        evals, evecs = torch.linalg.eigh(0.5 * (HL + HL.transpose(1, 2)))
        tiny = 1e-10 * evals.abs().amax(-1, keepdim=True)
        evals = torch.where(evals > tiny, evals, torch.zeros_like(evals))
        U = evecs * evals.sqrt()[:, None, :]
        keep = (evals > 0).any(0)
        return [U[:, :, c] for c in range(U.shape[-1]) if bool(keep[c])]

    def _passes(self, rows: slice):
        """Yield (layer index, a (B,L,in_aug), ds (B,L,out)) for every cotangent of one data chunk."""
        task = self.task
        Xc, yc = self.curvature.Xt[rows], self.curvature.yt[rows]
        params = {k: v.detach().clone().requires_grad_(True) for k, v in task.params().items()}
        with Capture([layer.module for layer in self.layers]) as cap, torch.enable_grad():
            z = task.forward(params, Xc)
        acts = [self.layers[i].inputs(cap.last(i).input) for i in range(len(self.layers))]
        outs = [cap.last(i).output for i in range(len(self.layers))]
        for u in self._cotangents(z, yc):
            grads = torch.autograd.grad(z, outs, grad_outputs=u.reshape(z.shape), retain_graph=True)
            for i, (layer, ds) in enumerate(zip(self.layers, grads, strict=True)):
                yield i, acts[i], layer.output_grads(ds)

    def _chunks(self):
        for start in range(0, self.n, self.chunk_size):
            yield slice(start, start + self.chunk_size)

    # -- training side ------------------------------------------------------------------------
    def _prepare(self) -> None:  # the factors do not depend on λ
        dtype, device = self.task.dtype, self.task.device
        A = [torch.zeros(ly.in_aug, ly.in_aug, dtype=dtype, device=device) for ly in self.layers]
        S = [torch.zeros(ly.out_features, ly.out_features, dtype=dtype, device=device) for ly in self.layers]
        chunks = len(range(0, self.n, self.chunk_size))
        bar = Iterations(
            f"EK-FAC fit ({len(self.layers)} layers, 2 passes x {chunks} chunks)", 2 * chunks, self.progress
        )
        for rows in self._chunks():  # pass 1: Kronecker factors
            seen = set()
            for i, a, ds in self._passes(rows):
                if i not in seen:  # activations are the same for every cotangent
                    A[i] += torch.einsum("bli,blj->ij", a, a)
                    seen.add(i)
                S[i] += torch.einsum("blo,blq->oq", ds, ds)
            bar.step(stage="Kronecker factors")
        for layer, Ai, Si in zip(self.layers, A, S, strict=True):
            layer.QA, layer.QS = _eigenvectors(Ai), _eigenvectors(Si)
            layer.eigenvalues = torch.zeros(layer.out_features, layer.in_aug, dtype=dtype, device=device)
        for rows in self._chunks():  # pass 2: eigenvalue correction
            # Linear layers (one position): DW is rank one, so its square factorises, and (a Q_A)² is
            # the same for every cotangent — sum the (ds Q_S)² over cotangents, then one product
            rotated: dict[int, torch.Tensor] = {}
            out_sq: dict[int, torch.Tensor] = {}
            for i, a, ds in self._passes(rows):
                layer = self.layers[i]
                if a.shape[1] == 1:
                    if i not in rotated:
                        rotated[i] = (a[:, 0] @ layer.QA) ** 2
                        out_sq[i] = (ds[:, 0] @ layer.QS) ** 2
                    else:
                        out_sq[i] += (ds[:, 0] @ layer.QS) ** 2
                    continue
                DW = torch.einsum("blo,bli->boi", ds, a)
                layer.eigenvalues += ((layer.QS.T @ DW @ layer.QA) ** 2).sum(0)
            for i, r in rotated.items():
                self.layers[i].eigenvalues += out_sq[i].T @ r
            bar.step(stage="eigenvalue correction")
        bar.close()
        for layer in self.layers:
            layer.eigenvalues /= self.n
        self.info.update(layers=[ly.name for ly in self.layers])

    def _top_eigenvalue(self) -> float:
        """The largest corrected eigenvalue (+ wd): λ_max of EK-FAC's own curvature."""
        return max(float(ly.eigenvalues.max()) for ly in self.layers) + self.weight_decay

    # -- property side ------------------------------------------------------------------------
    def _solve(self, B: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(B)
        for layer in self.layers:
            M = layer.QS.T @ layer.to_matrix(B) @ layer.QA
            M = M / (layer.eigenvalues + self.lambda_ + self.weight_decay)
            layer.write(layer.QS @ M @ layer.QA.T, out)
        return out


def _eigenvectors(M: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetrised Kronecker factor, computed in float64 and returned in M's
    dtype. Why: float32 LAPACK ``eigh`` fails to converge ("ill-conditioned or too many repeated
    eigenvalues") on factors such as the input patches of a conv layer on images with constant
    borders (a residual CNN on digits); float64 does not, and costs little at factor sizes."""
    return torch.linalg.eigh(0.5 * (M + M.T).double())[1].to(M.dtype)
