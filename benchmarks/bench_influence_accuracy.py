"""Influence at equal accuracy: ggda IF-CG (each preconditioner) vs dattri 0.3.0's CG, both solved to
the same relative residual ‖b − (H + λI)x‖ / ‖b‖ ≤ tol (issue #20, item 1).

Workloads are those of ``bench_dattri.py`` (same data, trained models, targets and damping rule):
n training points of 784-d images, logistic regression 784→10 and the MLP 784-128-10 trained 3
epochs, H the exact mean training-loss Hessian (what dattri's autograd HVP computes), λ ggda's
default (1 % of λ_max from 30 power-iteration products, computed once and passed to both); the
MLP's exact Hessian is indefinite, so there λ adds 1.25 |λ_min| (smallest Ritz value of 80
Lanczos steps) and CG, which needs H + λI positive definite, applies to both libraries.

For every solver: wall time of the whole attribution (training side, target gradients, solve,
scores), the curvature products it used (one per vector; dattri's CG always runs ``max_iter``
iterations plus one product for its starting residual, x0 = b), the true relative residual of its
solutions measured here against the damped operator in float64 (independent of the solver's own
recurrence), and the score error against the reference solve (LR: the dense damped Hessian
inverted in float64; MLP: float64 EK-FAC-preconditioned CG to 1e-10).

dattri's ``max_iter`` is chosen by replaying its CG (same algorithm, same start) on ggda's
operator and taking the first iteration count whose residual is ≤ tol for every target; dattri
then runs once with that count, and its own solution's residual is measured as above (raised and
rerun if it misses). The fixed-10-iteration rows of ``bench_dattri.py`` are kept.

    python benchmarks/bench_influence_accuracy.py --mlp-targets 50     # LR (100 targets) + MLP (50 targets)
    python benchmarks/bench_influence_accuracy.py --models mlp-s --out influence_accuracy_mlp10
    python benchmarks/bench_influence_accuracy.py --models logreg --warm-start --no-dattri --out influence_accuracy_warm

The ``block`` row is ggda's default (``solver="auto"``: block CG over all targets, no
preconditioner); ``block + arnoldi`` adds the Arnoldi preconditioner to it. The per-target CG rows
(``solver="cg"``) follow: each preconditioner; ``arnoldi`` (block Arnoldi: 48 products in blocks of
8) was the default before block CG, the row after it the default before that (64 sequential
single-vector Arnoldi steps). The notes give each library's cost per vector product and its fixed
cost, fitted from its two runs (fixed iterations, to tol).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
from common import Table, image_data, save, trained_model

TOL = 1e-4


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="training points (default 5000, as bench_dattri)")
    ap.add_argument(
        "--targets",
        type=int,
        default=100,
        help="LR test targets, the first of bench_dattri's 500 (default 100: dattri's CG to 1e-4 on all 500 "
        "takes ~10 core-minutes)",
    )
    ap.add_argument(
        "--mlp-targets",
        type=int,
        default=10,
        help="MLP test targets, the first of the same test set (default 10: dattri's run on the MLP "
        "costs ~23 s fixed plus ~0.04 s per target per iteration on one idle core)",
    )
    ap.add_argument("--models", default="logreg,mlp-s", help="comma-separated subset of logreg,mlp-s")
    ap.add_argument("--tol", type=float, default=TOL, help="relative residual both libraries reach (1e-4)")
    ap.add_argument(
        "--preconditioners", default="none,kfac,ekfac,arnoldi", help="ggda if-cg preconditioners to run"
    )
    ap.add_argument(
        "--warm-start", action="store_true", help="add an EK-FAC row with warm starts (blocks of T/4)"
    )
    ap.add_argument("--no-dattri", action="store_true", help="ggda rows only")
    ap.add_argument(
        "--no-block", action="store_true", help="leave out the block CG rows (ggda's default solver)"
    )
    ap.add_argument("--out", default="influence_accuracy", help="results/NAME.{txt,json}")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    archs = [a.strip() for a in args.models.split(",") if a.strip()]
    use_dattri = not args.no_dattri
    if use_dattri:
        from bench_dattri import ensure_venv

        why = ensure_venv()
        if why:
            print(f"dattri unavailable ({why}); ggda rows only", file=sys.stderr, flush=True)
            use_dattri = False
    train, test = image_data(args.n, args.targets)
    tables = []
    for arch in archs:
        table = run_arch(arch, args, train, test, use_dattri)
        print(table.render(), flush=True)
        tables.append(table)
        print(save(args.out, tables), file=sys.stderr, flush=True)
    return 0


def run_arch(arch: str, args: argparse.Namespace, train, test, use_dattri: bool) -> Table:
    """The table of one model: ggda rows (each preconditioner) and dattri rows, alternated."""
    import torch

    from ggda.errors import GGDAError
    from ggda.methods import make_method
    from ggda.methods.curvature import TrainingCurvature
    from ggda.methods.influence import relative_damping
    from ggda.properties import ExampleLoss
    from ggda.task import AttributionTask

    if use_dattri:
        from bench_dattri import run_dattri
    n, T = args.n, args.targets
    pcs = [p.strip() for p in args.preconditioners.split(",") if p.strip()]
    Tm = T if arch == "logreg" else min(T, args.mlp_targets)
    model = trained_model(arch, train, epochs=3)
    task = AttributionTask(model)
    prop = ExampleLoss(test.X[:Tm], test.y[:Tm])
    curv = TrainingCurvature(task, train.X, train.y, "exact")
    lam_max = curv.top_eigenvalue()
    lam = relative_damping(lam_max, 0.0)  # ggda's default rule, once for everyone
    lam_min = smallest_eigenvalue(curv.matvec, curv.p)
    damping_rule = "1% of λ_max"
    # exact Hessian of a non-convex model: shift it positive definite for CG (both libraries)
    if lam_min < -1e-6 * lam_max:
        lam = lam - 1.25 * lam_min
        damping_rule = f"1% of λ_max + 1.25 |λ_min| (Lanczos λ_min ≈ {lam_min:.3g}: H is indefinite)"

    # float64 copy: the operator every residual is measured against, and the reference solve
    task64 = AttributionTask(copy.deepcopy(model).double())
    curv64 = TrainingCurvature(task64, train.X, train.y, "exact")
    B64 = prop.gradients(task64)
    t0 = time.perf_counter()
    if arch == "logreg":
        X_ref = curv64.inverse(lam).solve(B64)
        ref_what = "dense (H+λI)⁻¹ in float64"
    else:
        for _ in range(4):  # the Lanczos λ_min bounds the true one from above: shift more if CG meets it
            try:
                ref = make_method(
                    "if-cg",
                    task64,
                    damping=lam,
                    hessian="exact",
                    tol=1e-10,
                    max_iter=2000,
                    preconditioner="ekfac",
                ).cache(train)
                X_ref = ref.precondition(B64) * n
                break
            except GGDAError:
                lam *= 1.5
                damping_rule += ", x1.5 after CG met negative curvature"
        ref_what = (
            f"float64 EK-FAC {ref.info['solver_used']} PCG to 1e-10 ({ref.info['cg_iterations']} iterations)"
        )
    t_ref = time.perf_counter() - t0

    B32 = prop.gradients(task)

    def residual(X, B) -> float:
        """max over targets of ‖b − (H+λI)x‖/‖b‖ in float64, b the right-hand side the solver was
        given (its own float32 target gradients: for a well-fit target, 1 − p(y) in float32 carries
        a large relative error, which is not the solver's)."""
        X64 = torch.as_tensor(np.asarray(X), dtype=torch.float64)
        B = torch.as_tensor(np.asarray(B), dtype=torch.float64)
        return float(((B - curv64.matvec(X64) - lam * X64).norm(dim=1) / B.norm(dim=1)).max())

    # reference scores through ggda's own training side (same group gradients for every row)
    side = make_method("if-cg", task, damping=lam, hessian="exact").cache(train)
    s_ref = side.side.scores((X_ref / n).to(task.dtype))
    scale = float(np.abs(s_ref).max())

    def score_err(s, s_ref=s_ref, scale=scale) -> float:
        return float(np.abs(np.asarray(s) - s_ref).max() / scale)

    table = Table(
        f"IF-CG at equal accuracy (relative residual <= {args.tol:g}), {arch}",
        f"data={train.name}, n={n:,} train x T={Tm} test targets, d=784; {arch} p={task.n_params:,}; "
        f"H = exact mean Hessian, λ = {lam:.4g} ({damping_rule}); fp32, cpu, 1 thread; reference: "
        f"{ref_what}, {t_ref:.1f} s",
        [
            "solver",
            "stop",
            "iters",
            "CG products",
            "other products",
            "products/target",
            "seconds",
            "residual (fp64)",
            "score err",
            "dattri/this",
        ],
    )
    rows: dict[str, float] = {}

    def ggda_row(label, stop, **opts):
        t0 = time.perf_counter()
        m = make_method("if-cg", task, damping=lam, hessian="exact", **opts).cache(train)
        B = prop.gradients(task)
        Xn = m.precondition(B)
        s = m.side.scores(Xn)
        dt = time.perf_counter() - t0
        info = m.info
        table.add(
            label,
            stop,
            info["cg_iterations"],
            info["cg_products"],
            info["curvature_products"] - info["cg_products"],
            info["curvature_products"] / Tm,
            dt,
            residual(Xn * n, B),
            score_err(s),
            "",
        )
        rows[label] = dt
        print(" ", table.rows[-1], file=sys.stderr, flush=True)
        return table.rows[-1][7]

    def ggda_at_tol(label, **opts):
        """Solve to ``args.tol``; if the float64 residual misses it (float32 rounding of the
        operator), rerun at 0.8× the tolerance — the same rule as dattri's raised ``max_iter``."""
        tol = args.tol
        for _ in range(3):
            if ggda_row(label, f"tol {tol:.2g}", tol=tol, max_iter=5000, **opts) <= args.tol:
                return
            tol *= 0.8

    def dattri_row(label, stop, max_iter):
        job = {
            "method": "if-cg",
            "arch": arch,
            "Xtr": train.X,
            "ytr": train.y,
            "Xte": test.X[:Tm],
            "yte": test.y[:Tm],
            "train_bs": n,  # one training batch: dattri solves once (its most favourable setting)
            "test_bs": Tm,
            "regularization": lam,
            "max_iter": max_iter,
            "tol": 0.0,
            "proj_dim": 0,
            "capture_solution": 1,
        }
        job.update({f"param::{k}": v.detach().numpy() for k, v in model.state_dict().items()})
        d = run_dattri(job, timeout=3600)
        res = residual(d["solution"], d["rhs"])
        table.add(
            label,
            stop,
            max_iter,
            Tm * (max_iter + 1),
            0,
            max_iter + 1,
            d["seconds"],
            res,
            score_err(d["scores"].T / n),
            "",
        )
        rows[label] = d["seconds"]
        print(" ", table.rows[-1], file=sys.stderr, flush=True)
        return res

    print(f"{arch}: λ={lam:.4g}, reference in {t_ref:.1f} s", file=sys.stderr, flush=True)
    # fixed 10 iterations (bench_dattri's setting), ggda and dattri alternated
    cg = {"solver": "cg"}
    ggda_row("ggda if-cg, none", "10 iterations", max_iter=10, tol=1e-12, preconditioner="none", **cg)
    if use_dattri:
        dattri_row("dattri IFAttributorCG", "10 iterations", 10)
    ggda_row("ggda if-cg, ekfac", "10 iterations", max_iter=10, tol=1e-12, preconditioner="ekfac", **cg)
    # equal accuracy
    if not args.no_block:
        ggda_at_tol("ggda if-cg, block (default)")
        ggda_at_tol("ggda if-cg, block + arnoldi", solver="block", preconditioner="arnoldi")
    for pc in pcs:
        ggda_at_tol(f"ggda if-cg, {pc}", preconditioner=pc, **cg)
        if pc == "arnoldi":  # the previous default: 64 sequential single-vector Arnoldi steps
            ggda_at_tol(
                "ggda if-cg, arnoldi 64x1 (old default)",
                preconditioner="arnoldi",
                preconditioner_iterations=64,
                preconditioner_block=1,
                **cg,
            )
        if pc == "ekfac" and args.warm_start:
            ggda_at_tol(
                f"ggda if-cg, ekfac, warm start {max(1, Tm // 4)}",
                preconditioner="ekfac",
                warm_start=max(1, Tm // 4),
                **cg,
            )
    if use_dattri:
        k = dattri_iterations(curv.matvec, B32, lam, args.tol, 5000)
        print(f"  dattri's CG replayed: {k} iterations reach {args.tol:g}", file=sys.stderr, flush=True)
        for _ in range(3):
            if dattri_row("dattri IFAttributorCG", f"tol {args.tol:g}", k) <= args.tol:
                break
            k = int(np.ceil(1.3 * k))
    # dattri's seconds at the same stopping rule (its last row of each kind) over each row's
    dattri_at = {row[1].startswith("tol"): row[6] for row in table.rows if row[0].startswith("dattri")}
    for row in table.rows:
        base = dattri_at.get(row[1].startswith("tol"))
        if base is not None:
            row[-1] = base / row[6]
    # where each library's seconds go: per-vector product cost and fixed cost from its two runs
    # (fixed iterations and to tol), fitted over the products of the solve
    for who in ("ggda if-cg, none", "dattri IFAttributorCG"):
        pair = [r for r in table.rows if r[0] == who]
        if len(pair) >= 2 and pair[-1][3] != pair[0][3]:
            (_, _, _, p0, _, _, t0, *_), (_, _, _, p1, _, _, t1, *_) = pair[0], pair[-1]
            per = (t1 - t0) / (p1 - p0)
            table.notes.append(
                f"{who}: {1e3 * per:.1f} ms per vector product, {t0 - per * p0:.1f} s fixed (training side, "
                f"target gradients, scores), a two-point fit to its rows of {p0} and {p1} products (wall "
                "times: a negative fixed part means the fit is within the noise)"
            )
    table.notes += [
        "seconds: whole attribution (training side, target gradients, solve, all n scores); dattri: its "
        "cache + attribute inside the worker (imports and data transfer excluded). Wall times under "
        "contention (2 shared cores); ratios come from the same run.",
        "CG products: curvature-vector products of the solve, one per vector multiplied (per-target CG: one "
        "per target per iteration plus the final check; block CG: the vectors of each block, at most one "
        "per active target; dattri: max_iter + 1 per target, x0 = b); other products: those of the "
        "preconditioner's fit (Arnoldi); products/target: all curvature products over T; EK-FAC/K-FAC "
        "fits are 2/1 passes of per-example output gradients, not curvature products.",
        "residual (fp64): max over targets of ‖b − (H+λI)x‖/‖b‖ of the returned solution, H in float64, b the "
        "solver's own float32 target gradients (ggda's, or those dattri captured); "
        "score err: max |score − reference| / max |reference| over all n × T scores.",
        "dattri/this: dattri's seconds at the same stopping rule (its last row: 10 iterations, or the "
        "tolerance met) divided by this row's; the bar is >= 10x at equal accuracy.",
    ]
    return table


def smallest_eigenvalue(matvec, p: int, iterations: int = 80) -> float:
    """The smallest Ritz value of H from ``iterations`` Lanczos (Arnoldi) steps: an upper bound on
    λ_min that the extreme end of the spectrum reaches quickly."""
    from ggda.linalg.arnoldi import arnoldi

    eig = arnoldi(matvec, p, iterations, iterations, seed=1)
    return float(eig.values.min())


def dattri_iterations(matvec, B, lam: float, tol: float, cap: int) -> int:
    """Iterations dattri 0.3.0's CG (``dattri.func.hessian.ihvp_at_x_cg``: x0 = b, no stopping
    rule) needs until ‖r‖/‖b‖ ≤ tol for every column, replayed on the same operator."""
    import torch

    def op(V: torch.Tensor) -> torch.Tensor:
        return matvec(V) + lam * V

    X = B.clone()
    G = B - op(X)
    D = G.clone()
    gg = (G * G).sum(1)
    bn = B.norm(dim=1)
    for k in range(1, cap + 1):
        AD = op(D)
        alpha = gg / (D * AD).sum(1)
        X += alpha[:, None] * D
        G = G - alpha[:, None] * AD
        gg_new = (G * G).sum(1)
        D = G + (gg_new / gg)[:, None] * D
        gg = gg_new
        if float((gg.sqrt() / bn).max()) <= tol:
            return k
    return cap


if __name__ == "__main__":
    sys.exit(main())
