"""Compact before/after tables for docs/fidelity.md from the suite's result files.

    .venv/bin/python benchmarks/fidelity/report.py --before before-lr,before-mlp \\
        --after after-lr,after-mlp,after-mlp-nowd --sweeps after-lr,after-mlp,after-mlp-nowd,sweep-cnn

Each name is a ``benchmarks/results/fidelity-<name>.json`` written by ``run.py --tag <name>``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
ORDER = (
    "if-explicit",
    "if-cg",
    "if-lissa",
    "if-arnoldi",
    "ekfac",
    "datainf",
    "if-group-fisher",
    "grad-dot",
    "tracin",
)


def load(names: str) -> dict:
    out: dict = {}
    for name in filter(None, names.split(",")):
        data = json.loads((RESULTS / f"fidelity-{name}.json").read_text())
        for setting, rec in data["settings"].items():
            out.setdefault(setting, {}).update(rec)
    return out


def f(v, digits=3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def pair(res: dict, key: str) -> str:
    v = res.get(key)
    if not isinstance(v, dict) or "pearson" not in v:
        return "—"
    return f"{v['pearson']:.3f} / {v['spearman']:.3f}"


def method_table(setting: str, before: dict, after: dict) -> str:
    convex = setting == "lr"
    head = (
        ["method", "options"] + (["LOO P / S"] if convex else []) + ["random P / S", "coherent P / S", "LDS"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(method, label, res):
        if "error" in res:
            return f"| {method} | {label} | {res['error'][:70]} |" + " |" * (len(head) - 3)
        cells = [method, label] + ([pair(res, "loo")] if convex else [])
        cells += [pair(res, "random"), pair(res, "coherent"), f(res.get("lds"))]
        return "| " + " | ".join(cells) + " |"

    if "exact" in after.get(setting, {}):
        lines.append(row("if-explicit", "exact, λ = 0", after[setting]["exact"]))
    for m in ORDER:
        b = before.get(setting, {}).get("methods", {}).get(m, {})
        a = after.get(setting, {}).get("methods", {}).get(m, {})
        if "default" in b:
            lines.append(row(m, "**before** (default until #18)", b["default"]))
        elif "legacy" in a:
            lines.append(row(m, "before: λ = 100·λ₀ (legacy)", a["legacy"]))
        if "default" in a:
            lines.append(row(m, "**after** (new default)", a["default"]))
        if "tuned" in a:
            opts = {k: v for k, v in a["tuned"]["options"].items() if k != "weight_decay"}
            lines.append(row(m, f"tuned {opts}", a["tuned"]))
    return "\n".join(lines)


def ratio_table(after: dict) -> str:
    head = ["setting", "method", "order", "random P", "random ratio", "coherent P", "coherent ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, rec in after.items():
        for m in ORDER:
            by = rec.get("methods", {}).get(m, {})
            for label, cfg in (("1", "default"), ("2", "second-order"), ("5", "order-5")):
                res = by.get(cfg)
                if not res or "random" not in res or "ratio" not in res.get("random", {}):
                    continue
                r, c = res["random"], res["coherent"]
                lines.append(
                    f"| {setting} | {m} | {label} | {f(r.get('pearson'))} | {f(r.get('ratio'), 2)} | "
                    f"{f(c.get('pearson'))} | {f(c.get('ratio'), 2)} |"
                )
    return "\n".join(lines)


def sweep_table(sweeps: dict) -> str:
    labels: list[str] = []
    for rec in sweeps.values():
        for k in rec.get("sweep", {}):
            if k not in labels:
                labels.append(k)
    cols = []
    for setting, rec in sweeps.items():
        if not rec.get("sweep"):
            continue
        if setting == "lr":
            cols.append((setting, "loo", "LOO P"))
        cols += [(setting, "random", "random P"), (setting, "lds", "LDS"), (setting, "cg", "CG it.")]
    head = ["λ"] + [f"{s} {name}" for s, _, name in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        cells = [label]
        for setting, key, _ in cols:
            res = sweeps[setting]["sweep"].get(label)
            if res is None:
                cells.append("—")
            elif key == "lds":
                cells.append(f(res.get("lds")))
            elif key == "cg":
                cells.append(str(res.get("cg_iterations", "—")))
            else:
                v = res.get(key)
                cells.append(f(v.get("pearson")) if isinstance(v, dict) and "pearson" in v else "err")
        lines.append("| " + " | ".join(cells) + " |")
    lmax = ", ".join(
        f"{s}: λ₀ = {rec['lambda0']:.3g}, λ_max = {rec.get('lambda_max', float('nan')):.3g}"
        for s, rec in sweeps.items()
        if rec.get("sweep")
    )
    return "\n".join(lines) + f"\n\n({lmax})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="before-lr,before-mlp")
    ap.add_argument("--after", default="after-lr,after-mlp,after-mlp-nowd")
    ap.add_argument("--sweeps", default="after-lr,after-mlp,after-mlp-nowd,sweep-cnn")
    args = ap.parse_args(argv)
    before, after, sweeps = load(args.before), load(args.after), load(args.sweeps)
    parts = []
    for setting in after:
        parts += [f"#### {setting}\n", method_table(setting, before, after), ""]
    parts += ["#### second order\n", ratio_table(after), ""]
    parts += ["#### damping sweep (if-explicit; CG iterations of if-cg, tol 1e-5)\n", sweep_table(sweeps), ""]
    print("\n".join(parts))


if __name__ == "__main__":
    main()
