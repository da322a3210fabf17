"""Fidelity suite (``make fidelity``): every attribution method against retraining truth.

    .venv/bin/python benchmarks/fidelity/run.py                 # lr + mlp, default set (< 10 min)
    .venv/bin/python benchmarks/fidelity/run.py --cnn           # + the small CNN
    .venv/bin/python benchmarks/fidelity/run.py --sweep         # + damping sweep (λ/λ₀, λ/λ_max grids)
    .venv/bin/python benchmarks/fidelity/run.py --heavy         # + order=5 and the slow LiSSA variants
    .venv/bin/python benchmarks/fidelity/run.py --settings mlp-nowd   # MLP trained without weight decay
    .venv/bin/python benchmarks/fidelity/run.py --settings lr --methods if-cg,if-explicit
    .venv/bin/python benchmarks/fidelity/run.py --tag before    # results/fidelity-before.{json,md}

Settings and truth: :mod:`settings` (truth is computed once and cached under
``runs/fidelity-cache``). Metrics: :mod:`suite`. Option sets per method: ``default`` (the
library's defaults, as ``ggda attribute`` uses them, with the run's weight decay), ``legacy``
(λ = 100·λ₀, the default before issue #18), ``tuned`` (best options found), ``second-order``
(default + ``order=2``, group rows only), ``order-5`` (five terms of the same expansion). The ``exact`` reference is if-explicit with
λ = 0 (GN + wd·I, the damping-free IF).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from settings import deep_setting, lr_setting  # noqa: E402
from suite import METHOD_ORDER, evaluate, legacy_damping, options_for  # noqa: E402

from ggda.gradients.per_example import per_example_sq_norms  # noqa: E402

torch.set_num_threads(1)
RESULTS = Path(__file__).resolve().parents[1] / "results"
CONFIGS = ("default", "legacy", "tuned", "second-order")
HEAVY_CONFIGS = ("order-5",)
# minutes on the MLP at default settings: behind --heavy
HEAVY = {("if-lissa", "tuned"), ("if-lissa", "second-order"), ("if-lissa", "order-5")}
SWEEP_LAMBDA0 = (0.0, 0.1, 1.0, 3.0, 10.0, 100.0)  # λ / λ₀ (mean squared gradient entry)
SWEEP_LMAX = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # λ / λ_max(H + wd·I)


def build(name: str, args) -> object:
    t0 = time.perf_counter()
    if name == "lr":
        s = lr_setting(n_targets=args.targets)
    else:
        s = deep_setting(name, n_targets=args.targets, seeds=args.cnn_seeds if name == "cnn" else args.seeds)
    print(f"[{name}] setting ready in {time.perf_counter() - t0:.1f}s: {s.meta}", flush=True)
    return s


def run(args) -> dict:
    out: dict = {"args": vars(args), "settings": {}}
    for name in args.settings:
        setting = build(name, args)
        lam_legacy = legacy_damping(setting)
        sq = per_example_sq_norms(setting.task, setting.train.X, setting.train.y)
        lam0 = float(sq.mean()) / setting.task.n_params
        rec: dict = {"meta": setting.meta, "lambda0": lam0, "methods": {}, "sweep": {}}
        if setting.weight_decay > 0:  # without weight decay H can be singular: no damping-free IF
            exact = evaluate(setting, "if-explicit", {"damping": 0.0, "weight_decay": setting.weight_decay})
            rec["exact"] = exact
            print(f"[{name}] exact IF (λ=0): {_brief(exact)}", flush=True)
        for method in args.methods:
            for config in args.configs:
                opts = options_for(method, config, setting, lam_legacy)
                if opts is None:
                    continue
                if method in ("grad-dot",) and config != "default":
                    continue
                if (method, config) in HEAVY and not args.heavy:
                    continue
                per_point = config not in ("second-order", "order-5")
                res = evaluate(setting, method, opts, per_point=per_point)
                rec["methods"].setdefault(method, {})[config] = res
                print(f"[{name}] {method:16s} {config:12s} {_brief(res)}", flush=True)
        if args.sweep:
            lmax = top_eigenvalue(setting)
            rec["lambda_max"] = lmax
            grid = [(f"{c:g}·λ₀", c * lam0) for c in SWEEP_LAMBDA0] + [
                (f"{c:g}·λmax", c * lmax) for c in SWEEP_LMAX
            ]
            for label, lam in grid:
                opts = {"damping": lam, "weight_decay": setting.weight_decay}
                res = evaluate(setting, "if-explicit", opts)
                cg = evaluate(setting, "if-cg", opts, per_point=False, only=("random",))
                res["cg_iterations"] = cg.get("random", {}).get("info", {}).get("cg_iterations")
                res["cg_random_pearson"] = cg.get("random", {}).get("pearson")
                res["lambda"] = lam
                rec["sweep"][label] = res
                print(
                    f"[{name}] sweep λ={label} ({lam:.2e}) {_brief(res)} cg_it={res['cg_iterations']}",
                    flush=True,
                )
        out["settings"][name] = rec
    return out


def top_eigenvalue(setting) -> float:
    """λ_max of the Gauss–Newton + wd·I (float64, 100 power iterations)."""
    from ggda.methods.curvature import TrainingCurvature
    from ggda.task import AttributionTask

    task = setting.task
    if task.dtype != torch.float64:
        import copy

        task = AttributionTask(copy.deepcopy(task.model).double())
    curv = TrainingCurvature(task, setting.train.X, setting.train.y, "gn", setting.weight_decay)
    return curv.top_eigenvalue(iterations=100)


def _brief(res: dict) -> str:
    if "error" in res:
        return "ERROR " + res["error"]
    parts = []
    if "loo" in res:
        parts.append(f"loo {res['loo']['pearson']:.3f}/{res['loo']['spearman']:.3f}")
    for g in ("random", "coherent"):
        if g in res and "pearson" in res[g]:
            parts.append(f"{g} {res[g]['pearson']:.3f}/{res[g]['spearman']:.3f} r={res[g]['ratio']:.2f}")
        elif g in res:
            parts.append(f"{g} ERROR {res[g]['error'][:60]}")
    if "lds" in res:
        parts.append(f"lds {res['lds']:.3f}")
    t = res.get("time_point", 0.0) + sum(res[g].get("time", 0.0) for g in ("random", "coherent") if g in res)
    parts.append(f"{t:.1f}s")
    return "  ".join(parts)


# -- markdown ---------------------------------------------------------------------------------
def _cell(res: dict, key: str, sub: str | None = None) -> str:
    v = res.get(key)
    if v is None:
        return "—"
    if isinstance(v, dict):
        if "error" in v:
            return "err"
        v = v.get(sub)
    return "—" if v is None else f"{v:.2f}" if sub == "ratio" else f"{v:.3f}"


def markdown(out: dict) -> str:
    lines = []
    for name, rec in out["settings"].items():
        lines.append(
            f"### {name} (n={rec['meta'].get('n')}, p={rec['meta'].get('p')}, λ₀={rec['lambda0']:.3g})\n"
        )
        head = "| method | options | LOO P | LOO S | random P | random S | random ratio | coherent P | coherent S | coherent ratio | LDS | time (s) |"
        lines += [head, "|" + "---|" * 12]
        rows = [("if-explicit", "exact (λ=0)", rec["exact"])] if "exact" in rec else []
        for method in METHOD_ORDER:
            for config, res in rec["methods"].get(method, {}).items():
                rows.append((method, config, res))
        for method, config, res in rows:
            if "error" in res:
                lines.append(f"| {method} | {config} | {res['error'][:60]} |" + " |" * 10)
                continue
            t = res.get("time_point", 0.0) + sum(
                res[g].get("time", 0.0) for g in ("random", "coherent") if isinstance(res.get(g), dict)
            )
            cells = [
                _cell(res, "loo", "pearson"),
                _cell(res, "loo", "spearman"),
                _cell(res, "random", "pearson"),
                _cell(res, "random", "spearman"),
                _cell(res, "random", "ratio"),
                _cell(res, "coherent", "pearson"),
                _cell(res, "coherent", "spearman"),
                _cell(res, "coherent", "ratio"),
                _cell(res, "lds"),
                f"{t:.1f}",
            ]
            lines.append(f"| {method} | {config} | " + " | ".join(cells) + " |")
        if rec["sweep"]:
            lines.append("")
            lines.append(f"Damping sweep (if-explicit; λ_max = {rec.get('lambda_max', float('nan')):.3g}):\n")
            lines.append(
                "| λ | value | LOO P | random P | random ratio | coherent P | coherent ratio | LDS | if-cg iterations | if-cg random P |"
            )
            lines.append("|" + "---|" * 10)
            for label, res in rec["sweep"].items():
                cgp = res.get("cg_random_pearson")
                lines.append(
                    f"| {label} | {res['lambda']:.2e} | {_cell(res, 'loo', 'pearson')} | {_cell(res, 'random', 'pearson')} | "
                    f"{_cell(res, 'random', 'ratio')} | {_cell(res, 'coherent', 'pearson')} | "
                    f"{_cell(res, 'coherent', 'ratio')} | {_cell(res, 'lds')} | {res.get('cg_iterations')} | "
                    f"{'—' if cgp is None else f'{cgp:.3f}'} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="lr,mlp", help="comma list of lr, mlp, cnn")
    ap.add_argument("--cnn", action="store_true", help="add the CNN setting")
    ap.add_argument("--methods", default=",".join(METHOD_ORDER))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--sweep", action="store_true", help="damping sweep of if-explicit and if-cg")
    ap.add_argument("--heavy", action="store_true", help="add order-5 and the slow LiSSA variants")
    ap.add_argument("--targets", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=10, help="paired seeds of the MLP/CNN truth")
    ap.add_argument("--cnn-seeds", type=int, default=6, help="paired seeds of the CNN truth")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--cache", default=None, help="truth cache directory (default runs/fidelity-cache)")
    args = ap.parse_args(argv)
    args.settings = [s for s in args.settings.split(",") if s] + (["cnn"] if args.cnn else [])
    args.methods = [m for m in args.methods.split(",") if m]
    if args.cache:
        import settings

        settings.CACHE = Path(args.cache)
    args.configs = [c for c in args.configs.split(",") if c] + (list(HEAVY_CONFIGS) if args.heavy else [])
    t0 = time.perf_counter()
    out = run(args)
    out["seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(exist_ok=True)
    stem = "fidelity" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1, default=_json))
    md = markdown(out)
    (RESULTS / f"{stem}.md").write_text(md)
    print(md)
    print(f"total {out['seconds']:.0f}s -> {RESULTS / stem}.json/.md")


def _json(o):
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


if __name__ == "__main__":
    main()
