"""Grad-Dot under Adam's diagonal preconditioning: the first-order method of Adam further training.

FiMODA's unified view (NOTES B3) maps further training to a gradient method: a short stretch of
SGD from θ^f moves the parameters by −η Σ_t ∇R_t, so removing z_i changes f by ≈ η·t/n ·
∇fᵀ∇ℓ_i — Grad-Dot. Adam with a fresh state moves them by −η Σ_t m̂_t / (√v̂_t + ε); once v̂ has
settled (its bias-corrected value is a weighted average of squared mini-batch gradients from the
first step on), Adam is SGD preconditioned by P = diag(1/(√v + ε)), and the same linearisation
gives

    score_j = ∇f(θ^f)ᵀ P g_{S_j},   P = diag(1 / (√v + ε)),

with v the second moment a fresh Adam state builds from mini-batches of size B drawn without
replacement from the training set (one epoch's batches are such draws). Its expectation has a
closed form in the per-example gradients g_i (mean ḡ, mean square m₂ = (1/n) Σ g_i ⊙ g_i):

    v = E_B[ḡ_B ⊙ ḡ_B] = ḡ ⊙ ḡ + (n − B) / (B (n − 1)) · (m₂ − ḡ ⊙ ḡ),

the squared mean plus the without-replacement variance of a batch mean, so the preconditioner is
one pass over the per-example gradients, with no sampling noise. At B = 1 it is the diagonal
empirical Fisher m₂ (RMSProp/Adam with single-example steps), at B = n the squared full gradient.

What it leaves out (first order, like Grad-Dot): the change of v itself when z_i is removed
(O(1/n) of every coordinate's denominator), the momentum's lag, and the curvature of the loss.
The paper's own Adam figures (Figs 4 and 8) compare the *unpreconditioned* methods to Adam
further training; this method is ggda's addition, to test whether matching the optimiser's
geometry is what Adam-trained gold standards need (docs/gold.md, "Adam").

Linear in the group gradient, so a group's score is the sum of its members' scores.
"""

from __future__ import annotations

import torch

from ggda.errors import GGDAError
from ggda.gradients.per_example import iter_per_example_gradients
from ggda.methods.base import InnerProductAttributor, register
from ggda.options import COUNT, POSITIVE
from ggda.progress import Iterations
from ggda.task import AttributionTask


def adam_second_moment(mean: torch.Tensor, mean_sq: torch.Tensor, n: int, batch_size: int) -> torch.Tensor:
    """E[ḡ_B ⊙ ḡ_B] over size-``batch_size`` batches drawn without replacement from ``n`` points
    whose per-example gradients have mean ``mean`` and mean square ``mean_sq`` (module docstring).
    ``batch_size`` ≥ n means full-batch steps (the variance term vanishes)."""
    B = min(int(batch_size), n)
    if n <= 1 or B >= n:
        return mean * mean
    var = (mean_sq - mean * mean).clamp_min(0.0)  # population variance of each coordinate
    return mean * mean + (n - B) / (B * (n - 1)) * var


@register("grad-dot-adam")
class GradDotAdam(InnerProductAttributor):
    """score_j = ∇fᵀ diag(1/(√v + ε)) g_{S_j}, v the expected second moment of a fresh Adam state
    on mini-batches of size ``batch_size`` (closed form; see the module docstring).

    Args:
        batch_size: mini-batch size of the further training whose Adam state is modelled
            (default 128, ``ggda gold``'s and FiMODA's).
        eps: Adam's ε (default 1e-8, ``torch.optim.Adam``'s).
        chunk_size: training points per per-example-gradient chunk.
        **options: ``aggregate``, ``max_batch``, ``memory_mb``.
    """

    preconditioned = True
    option_specs = {**InnerProductAttributor.option_specs, "batch_size": COUNT, "eps": POSITIVE}

    def __init__(
        self,
        task: AttributionTask,
        batch_size: int = 128,
        eps: float = 1e-8,
        chunk_size: int = 256,
        **options,
    ) -> None:
        super().__init__(task, **options)
        if batch_size < 1 or not eps > 0:
            raise GGDAError("grad-dot-adam needs batch_size ≥ 1 and eps > 0.")
        self.batch_size, self.eps, self.chunk_size = int(batch_size), float(eps), int(chunk_size)
        self.info: dict = {}

    def _cache(self) -> None:
        super()._cache()
        n, p = len(self.train), self.task.n_params
        total = torch.zeros(p, dtype=self.task.dtype, device=self.task.device)
        total_sq = torch.zeros_like(total)
        with Iterations("grad-dot-adam second moments", n, what="row") as bar:
            for rows, G in iter_per_example_gradients(
                self.task, self.train.X, self.train.y, chunk_size=self.chunk_size
            ):
                total += G.sum(0)
                total_sq += (G * G).sum(0)
                bar.step(rows.stop - rows.start)
        v = adam_second_moment(total / n, total_sq / n, n, self.batch_size)
        self.second_moment = v
        self.scale = 1.0 / (v.sqrt() + self.eps)
        self.info.update(
            batch_size=min(self.batch_size, n),
            eps=self.eps,
            sqrt_v_median=float(v.sqrt().median()),
            sqrt_v_max=float(v.sqrt().max()),
        )

    def precondition(self, target_grads: torch.Tensor) -> torch.Tensor:
        return target_grads * self.scale.to(target_grads.dtype)
