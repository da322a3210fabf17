"""Kronecker-factored curvature of Linear/Conv2d layers (K-FAC, and EK-FAC's eigenvalue correction).

Why a module of its own: the same factors serve two users — the ``ekfac`` method, which inverts
them as *the* curvature (George et al. 2018; Grosse et al. 2023), and ``if-cg``, which uses them as
a *preconditioner* for conjugate gradient on the exact operator (Martens & Grosse 2015 use K-FAC the
same way), where they only change how fast CG converges, not its answer.

For a layer with inputs a (bias appended as a constant 1; Conv2d inputs unfolded into patches) and
output gradients ds over the output cotangents of every example:

1. K-FAC factors A = Σ a aᵀ and S = Σ ds dsᵀ, and their eigenbases Q_A, Q_S;
2. K-FAC eigenvalues (eig(S)/n) ⊗ (eig(A)/n) (``corrected=False``: one data pass), or EK-FAC's
   corrected Λ*_{kl} = (1/n) Σ_i Σ_c ((Q_Sᵀ DW_{ic} Q_A)_{kl})² (a second pass: the exact diagonal of
   the layer's Gauss–Newton block in the Kronecker eigenbasis);
3. (G_l + λI)⁻¹ V = Q_S [(Q_Sᵀ V Q_A) / (Λ + λ)] Q_Aᵀ per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, vmap

from ggda.errors import GGDAError
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


class KroneckerFactors:
    """The fitted Kronecker blocks of one task over one training set.

    Args:
        task: the attribution task (its Linear/Conv2d layers are factored).
        layers: the blocks (:func:`kronecker_layers`).
        fisher: ``"expected"`` (output cotangents factorise the loss Hessian: the exact Gauss–Newton)
            or ``"empirical"`` (the loss gradient at the true labels).
        progress: report the data passes.
    """

    def __init__(
        self,
        task: AttributionTask,
        layers: list[KroneckerLayer],
        fisher: str = "expected",
        progress: bool | None = None,
    ) -> None:
        if fisher not in FISHERS:
            raise GGDAError(f"Unknown fisher '{fisher}'; choose expected or empirical.")
        self.task, self.layers, self.fisher, self.progress = task, layers, fisher, progress

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

    def _passes(self, Xc: torch.Tensor, yc: torch.Tensor):
        """Yield (layer index, a (B,L,in_aug), ds (B,L,out)) for every cotangent of one data chunk."""
        task = self.task
        params = {k: v.detach().clone().requires_grad_(True) for k, v in task.params().items()}
        with Capture([layer.module for layer in self.layers]) as cap, torch.enable_grad():
            z = task.forward(params, Xc)
        acts = [self.layers[i].inputs(cap.last(i).input) for i in range(len(self.layers))]
        outs = [cap.last(i).output for i in range(len(self.layers))]
        for u in self._cotangents(z, yc):
            grads = torch.autograd.grad(z, outs, grad_outputs=u.reshape(z.shape), retain_graph=True)
            for i, (layer, ds) in enumerate(zip(self.layers, grads, strict=True)):
                yield i, acts[i], layer.output_grads(ds)

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, Xt: torch.Tensor, yt: torch.Tensor, chunk_size: int = 512, corrected: bool = True) -> None:
        """Factors over all rows of (Xt, yt); EK-FAC's eigenvalue correction when ``corrected``
        (a second data pass), else K-FAC's Kronecker-product eigenvalues."""
        dtype, device = self.task.dtype, self.task.device
        n = len(yt)
        chunks = [slice(s, s + chunk_size) for s in range(0, n, chunk_size)]
        A = [torch.zeros(ly.in_aug, ly.in_aug, dtype=dtype, device=device) for ly in self.layers]
        S = [torch.zeros(ly.out_features, ly.out_features, dtype=dtype, device=device) for ly in self.layers]
        passes = 2 if corrected else 1
        bar = Iterations(
            f"{'EK-FAC' if corrected else 'K-FAC'} fit ({len(self.layers)} layers, {passes} pass(es) x "
            f"{len(chunks)} chunks)",
            passes * len(chunks),
            self.progress,
        )
        for rows in chunks:  # pass 1: Kronecker factors
            seen = set()
            for i, a, ds in self._passes(Xt[rows], yt[rows]):
                if i not in seen:  # activations are the same for every cotangent
                    A[i] += torch.einsum("bli,blj->ij", a, a)
                    seen.add(i)
                S[i] += torch.einsum("blo,blq->oq", ds, ds)
            bar.step(stage="Kronecker factors")
        for layer, Ai, Si in zip(self.layers, A, S, strict=True):
            eA, layer.QA = _symmetric_eigh(Ai)
            eS, layer.QS = _symmetric_eigh(Si)
            if corrected:
                layer.eigenvalues = torch.zeros(layer.out_features, layer.in_aug, dtype=dtype, device=device)
            else:  # E[ds dsᵀ ⊗ a aᵀ] ≈ E[ds dsᵀ] ⊗ E[a aᵀ] (exact scale for one position per example)
                layer.eigenvalues = eS.clamp_min(0)[:, None] * eA.clamp_min(0)[None, :] / n
        if corrected:
            for rows in chunks:  # pass 2: eigenvalue correction
                # Linear layers (one position): DW is rank one, so its square factorises, and (a Q_A)²
                # is the same for every cotangent — sum the (ds Q_S)² over cotangents, then one product
                rotated: dict[int, torch.Tensor] = {}
                out_sq: dict[int, torch.Tensor] = {}
                for i, a, ds in self._passes(Xt[rows], yt[rows]):
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
            layer.eigenvalues /= n

    def top_eigenvalue(self) -> float:
        """The largest eigenvalue of the factored curvature (without damping)."""
        return max(float(ly.eigenvalues.max()) for ly in self.layers)

    def solve(self, B: torch.Tensor, shift: float, rest: float | None = None) -> torch.Tensor:
        """(G + shift·I)⁻¹ B for B (T, p), block by block. Coordinates outside every block are
        divided by ``rest`` (default: the shift plus the mean factored eigenvalue, a typical
        curvature; only a preconditioner has such coordinates, the ``ekfac`` method restricts
        its task to the blocks)."""
        covered = torch.zeros(B.shape[1], dtype=torch.bool, device=B.device)
        out = torch.empty_like(B)
        for layer in self.layers:
            M = layer.QS.T @ layer.to_matrix(B) @ layer.QA
            M = M / (layer.eigenvalues + shift)
            layer.write(layer.QS @ M @ layer.QA.T, out)
            for s in (layer.weight, layer.bias):
                if s is not None:
                    covered[s] = True
        if not bool(covered.all()):
            if rest is None:
                mean = torch.cat([ly.eigenvalues.reshape(-1) for ly in self.layers]).mean()
                rest = float(shift + mean)
            out[:, ~covered] = B[:, ~covered] / rest
        return out


def _symmetric_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a symmetrised Kronecker factor, computed in float64 and
    returned in M's dtype. Why: float32 LAPACK ``eigh`` fails to converge ("ill-conditioned or too
    many repeated eigenvalues") on factors such as the input patches of a conv layer on images with
    constant borders (a residual CNN); float64 does not, and costs little at factor sizes."""
    evals, evecs = torch.linalg.eigh(0.5 * (M + M.T).double())
    return evals.to(M.dtype), evecs.to(M.dtype)
