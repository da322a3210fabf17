"""Randomly projected group gradients from layer factors (LoGra-style Kronecker projections).

TRAK-style methods need features ``Pᵀ g_S`` with P a (p × k) random projection. Projecting a
materialised gradient costs p·k per row (for n = 20,000 rows, p = 10⁵, k = 512: 2·10¹² FLOPs).
With a per-layer *Kronecker* projection ``P_l = P_out ⊗ P_in`` the projection commutes with the
factor structure of Linear/Conv2d gradients:

    P_lᵀ vec(Σ_{i∈S} Σ_l δ_{i,l} a_{i,l}ᵀ) = vec(Σ_{i∈S} Σ_l (P_outᵀ δ_{i,l})(P_inᵀ a_{i,l})ᵀ),

so the factors are projected first (n·(d_in·k_in + d_out·k_out)) and the group sums are formed
in the small (k_out × k_in) space — the gradient is never formed (Choe et al., 2024, "LoGra").
The bias is handled as an extra input column of ones. Entries are N(0, 1/k_in) and
N(0, 1/k_out), so E[P Pᵀ] = I and inner products are preserved in expectation, like a dense
Gaussian sketch, but with a different (structured) distribution.

This is a building block for projection-based methods; it needs the fast plan
(:func:`ggda.gradients.fast_factors.fast_plan`) and returns ``None`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ggda.data.grouping import Grouping
from ggda.gradients.fast_factors import ExampleFn, Factors, LayerPlan, LayerSpec, fast_plan, layer_factors
from ggda.gradients.fast_group import scatter_groups
from ggda.task import AttributionTask, Params


@dataclass
class KroneckerProjection:
    """Per-layer (P_out, P_in) pairs and where each layer's k_out·k_in features go."""

    plan: LayerPlan
    P_out: list[torch.Tensor]
    P_in: list[torch.Tensor]
    feature_plan: LayerPlan  # the projected "layers" in feature space, for the segment sums

    @property
    def dim(self) -> int:
        return self.feature_plan.n_params


def _split(k_layer: int, d_out: int, d_in: int) -> tuple[int, int]:
    k_in = max(1, min(d_in, round(math.sqrt(k_layer * d_in / max(d_out, 1)))))
    k_out = max(1, min(d_out, math.ceil(k_layer / k_in)))
    return k_out, k_in


def kronecker_projection(
    plan: LayerPlan, proj_dim: int, seed: int = 0, dtype=torch.float32, device="cpu"
) -> KroneckerProjection:
    """Draw the per-layer projections; ``proj_dim`` is shared among layers in proportion to size."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    sizes = []
    for spec in plan.layers:
        d_in = (spec.d_in if spec.weight else 0) + (1 if spec.bias else 0)
        sizes.append((spec.d_out, d_in))
    total = sum(o * i for o, i in sizes)
    P_out, P_in, specs, slices, start = [], [], [], {}, 0
    for li, (d_out, d_in) in enumerate(sizes):
        k_layer = max(1, round(proj_dim * d_out * d_in / total))
        k_out, k_in = _split(k_layer, d_out, d_in)
        P_out.append((torch.randn(d_out, k_out, generator=gen) / math.sqrt(k_out)).to(device, dtype))
        P_in.append((torch.randn(d_in, k_in, generator=gen) / math.sqrt(k_in)).to(device, dtype))
        name = f"layer{li}"
        specs.append(LayerSpec(plan.layers[li].module, "projected", name, None, k_in, k_out))
        slices[name] = slice(start, start + k_out * k_in)
        start += k_out * k_in
    return KroneckerProjection(plan, P_out, P_in, LayerPlan(specs, slices, start))


def project_factors(proj: KroneckerProjection, factors: Factors) -> Factors:
    """(B, L, k_in) and (B, L, k_out) projected factors; the bias is an input column of ones."""
    A, D = [], []
    for spec, a, d, Po, Pi in zip(proj.plan.layers, factors.A, factors.D, proj.P_out, proj.P_in, strict=True):
        parts = ([a] if spec.weight else []) + ([a.new_ones(*a.shape[:2], 1)] if spec.bias else [])
        a_aug = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
        A.append(a_aug @ Pi)
        D.append(d @ Po)
    return Factors(A, D)


def iter_projected_group_gradients(
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    grouping: Grouping,
    proj_dim: int,
    seed: int = 0,
    fn: ExampleFn | None = None,
    params: Params | None = None,
    max_batch: int = 2048,
) -> Iterator[tuple[np.ndarray, torch.Tensor, KroneckerProjection]] | None:
    """Yield ``(group_ids, Φ (k, D), projection)`` with Φ = Pᵀ g_S, or return None (no fast plan).

    One forward/backward per chunk of rows; D ≈ ``proj_dim``.
    """
    fn = fn or task.loss_fn
    params = task.params() if params is None else params
    Xt, yt = task.to_tensor(X, y)
    plan = fast_plan(task, Xt, yt, fn, params)
    if plan is None:
        return None
    proj = kronecker_projection(plan, proj_dim, seed, task.dtype, task.device)

    def gen():
        sizes = grouping.sizes
        members = grouping.member_lists()
        order = np.argsort(sizes, kind="stable")
        cap = min(max_batch, plan.max_rows())
        i = 0
        while i < len(order):
            if sizes[order[i]] > cap:  # one large group over several row chunks
                gid, m = order[i], members[order[i]]
                phi = torch.zeros(1, proj.dim, dtype=task.dtype, device=task.device)
                for s in range(0, len(m), cap):
                    rows = torch.as_tensor(m[s : s + cap], device=task.device)
                    f = project_factors(
                        proj,
                        layer_factors(
                            task, plan, Xt.index_select(0, rows), yt.index_select(0, rows), fn, params
                        ),
                    )
                    flat = Factors(
                        [a.reshape(1, -1, a.shape[-1]) for a in f.A],
                        [d.reshape(1, -1, d.shape[-1]) for d in f.D],
                    )
                    part = torch.empty_like(phi)
                    scatter_groups(proj.feature_plan, flat, np.array([1]), part)
                    phi += part
                yield np.array([gid]), phi, proj
                i += 1
                continue
            total, j = 0, i
            while j < len(order) and total + sizes[order[j]] <= cap:
                total += sizes[order[j]]
                j += 1
            chunk = order[i:j]
            rows = torch.as_tensor(np.concatenate([members[g] for g in chunk]), device=task.device)
            f = project_factors(
                proj,
                layer_factors(task, plan, Xt.index_select(0, rows), yt.index_select(0, rows), fn, params),
            )
            phi = torch.empty(len(chunk), proj.dim, dtype=task.dtype, device=task.device)
            scatter_groups(proj.feature_plan, f, sizes[chunk], phi)
            yield chunk, phi, proj
            i = j

    return gen()


def dense_equivalent(proj: KroneckerProjection, G: torch.Tensor) -> torch.Tensor:
    """Pᵀ g for materialised flat gradients G (k, p) — the reference the factor path must match."""
    out = []
    for spec, Po, Pi in zip(proj.plan.layers, proj.P_out, proj.P_in, strict=True):
        cols = []
        if spec.weight:
            cols.append(G[:, proj.plan.slices[spec.weight]].reshape(len(G), spec.d_out, spec.d_in))
        if spec.bias:
            cols.append(G[:, proj.plan.slices[spec.bias]].reshape(len(G), spec.d_out, 1))
        W = torch.cat(cols, -1)
        out.append((Po.T @ W @ Pi).reshape(len(G), -1))
    return torch.cat(out, 1)
