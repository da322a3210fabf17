"""Vectorised path: R further-training runs as one stacked model (``torch.func``).

Parameters are stacked along a leading run dimension; ``vmap(grad(objective))`` gives every run's
gradient in one call. In ``mask`` and ``weight`` mode all runs read the *same* mini-batch, so the
inputs are passed unbatched (``in_dims=None``) and the first layer of every run is one matrix
product against the shared batch; only the per-run sample weights differ. In ``sampler`` mode each
run gets its own (R, B) batch. Optimiser updates are the functional equivalents of torch.optim
(:mod:`ggda.gold.optim`).

Why: a small model's sequential step is dominated by per-operator overhead; stacking turns R small
matrix products into a few large ones (see ``benchmarks/bench_gold.py`` for measured figures).

Gradient kernels (``GoldConfig.kernel``, or ``kernel=`` here): ``auto`` (default)
uses the hand-written stacked forward/backward of :mod:`ggda.gold.stacked_mlp` when the model is a
plain ``nn.Sequential`` chain of ``nn.Linear`` layers and elementwise activations with the built-in
loss, and ``vmap(grad(objective))`` otherwise; ``mlp`` insists on the former, ``vmap`` forces the
latter. Both compute the same objective's gradient; everything else (plan, optimiser, forking,
recording, divergence) is shared.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import grad, vmap

from ggda.errors import GGDAError
from ggda.gold.config import KERNELS
from ggda.gold.objective import diverged, objective
from ggda.gold.optim import StackedOptimizer
from ggda.gold.problem import GoldProblem
from ggda.gold.removal import extra_terms, fork_steps, plan
from ggda.gold.stacked_mlp import StackedMLP, ineligible_reason


def stack_params(problem: GoldProblem, R: int) -> dict[str, torch.Tensor]:
    """R copies of θ^f's attributed parameters, stacked (each run starts from the final model)."""
    return {
        k: v.detach().unsqueeze(0).repeat(R, *([1] * v.ndim)).clone()
        for k, v in problem.task.params().items()
    }


def resolve_kernel(problem: GoldProblem, kernel: str | None = None) -> str:
    """``mlp`` or ``vmap``: the gradient kernel ``train_vectorised`` uses for ``problem``."""
    kernel = kernel or problem.config.kernel
    if kernel not in KERNELS:
        raise GGDAError(f"Unknown gold kernel '{kernel}'; choose one of {', '.join(KERNELS)}.")
    if kernel == "vmap":
        return kernel
    flat = isinstance(problem.X, torch.Tensor) and problem.X.ndim == 2
    why = ineligible_reason(problem.task) if flat else "inputs are not one flat (n, d) matrix"
    if why is None:
        return "mlp"
    if kernel == "mlp":
        raise GGDAError(f"The stacked-MLP gold kernel cannot run this model: {why}; use kernel=auto.")
    return "vmap"


def train_vectorised(
    problem: GoldProblem,
    seed: int,
    runs: list[np.ndarray | None],
    labels: list[str],
    fork: bool = True,
    kernel: str | None = None,
) -> np.ndarray:
    """(n_records, T, R): f after every recorded step of R runs trained together.

    Row 0 of the stack is the seed's full run (a job of full runs only trains just those). With ``fork`` (mask/sampler), a left-out run joins
    the stack only at its first differing step, as a copy of row 0 (:func:`fork_steps`); until then
    its recorded values are the full run's. ``kernel``: see :func:`resolve_kernel`.
    """
    task, config = problem.task, problem.config
    dev = task.device
    only_full = all(r is None for r in runs)
    all_runs = list(runs) if only_full else [None, *runs]
    all_labels = list(labels) if only_full else ["full", *labels]
    total = len(all_runs)
    start = fork_steps(problem.n, all_runs, config, seed) if fork else [1] * total
    start[0] = 1
    live = [r for r in range(total) if start[r] <= 1]
    # every run's rows are reserved up front; the live stack is the leading ``len(live)`` rows
    # (contiguous views), so runs that join later are copied in place, never concatenated
    store = stack_params(problem, total)
    params = {k: v[: len(live)] for k, v in store.items()}
    optimizer = StackedOptimizer(config, params, capacity=total)
    extra = extra_terms(all_runs, config, problem.n, task.dtype)

    def loss_and_obj(p, X, y, w, d, Xe=None, ye=None, coef=None):
        obj = objective(task, p, X, y, w, d, Xe, ye, coef)
        return obj, obj.detach()

    def values(p):
        return problem.prop.values(task, p)

    evaluate = vmap(values)
    mlp = StackedMLP(task, capacity=total) if resolve_kernel(problem, kernel) == "mlp" else None
    grad_fns: dict[bool, object] = {}
    extra_all: tuple = ()
    extra_dims: tuple = ()
    if extra is not None:
        eidx = extra[0].to(dev)
        extra_all = (problem.X[eidx], problem.y[eidx], extra[1].to(dev))
        extra_dims = (0, 0, 0)
    # divergence flags and last finite objectives in *stack* order (row i = run live[i])
    bad = torch.zeros(total, dtype=torch.bool, device=dev)
    last_obj = torch.zeros(total, dtype=task.dtype, device=dev)
    joins: dict[int, list[int]] = {}
    for r in range(total):
        if start[r] > 1:
            joins.setdefault(start[r], []).append(r)
    records = []
    rows = torch.as_tensor(live, device=dev)
    rows_cpu = rows.cpu()
    extra_args = tuple(t[rows] for t in extra_all)
    for step in plan(problem.n, all_runs, config, seed, task.dtype):
        joining = joins.get(step.step, []) if step.step > 1 else []
        if joining:  # runs that first differ here start from the full run's current state
            L = len(live)
            for v in store.values():
                v[L : L + len(joining)] = v[:1]
            params = {k: v[: L + len(joining)] for k, v in store.items()}
            optimizer.fork(0, len(joining))
            live += joining
            rows = torch.as_tensor(live, device=dev)
            rows_cpu = rows.cpu()
            extra_args = tuple(t[rows] for t in extra_all)
        L = len(live)
        shared = step.shared
        if mlp is not None:
            grad_fns[shared] = mlp
        elif shared not in grad_fns:
            xd = None if shared else 0
            grad_fns[shared] = vmap(grad(loss_and_obj, has_aux=True), in_dims=(0, xd, xd, 0, 0, *extra_dims))
        idx = (step.idx if shared else step.idx[rows_cpu]).to(dev)
        grads, obj = grad_fns[shared](
            params,
            problem.X[idx],
            problem.y[idx],
            step.weight[rows_cpu].to(dev),
            step.divisor[rows_cpu].to(dev),
            *extra_args,
        )
        active = None if step.active is None else step.active[rows_cpu].to(dev)
        finite = torch.isfinite(obj) if active is None else torch.isfinite(obj) | ~active
        bad[:L] |= ~finite
        torch.where(finite, last_obj[:L], obj, out=last_obj[:L])
        optimizer.step(params, grads, active, scratch=True)
        if step.record:
            vals = evaluate(params)  # (live, T)
            bad[:L] |= ~torch.isfinite(vals).all(dim=1)
            if bool(bad.any()):
                in_runs = torch.zeros(total, dtype=torch.bool, device=dev)
                in_runs[rows] = bad[:L]
                r = int(torch.nonzero(in_runs)[0])  # the lowest diverged run, as labelled
                i = live.index(r)
                raise diverged(all_labels[r], seed, step.epoch, float(last_obj[i]), config.lr)
            full_vals = vals[:1].expand(total, -1).clone()  # not-yet-joined runs equal the full run
            full_vals[rows] = vals
            records.append(full_vals.to(torch.float64).cpu())
    values = torch.stack(records) if only_full else torch.stack(records)[:, 1:]
    return values.permute(0, 2, 1).numpy()
