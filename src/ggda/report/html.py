"""The experiment report: one self-contained ``index.html`` next to its PNG figures.

The page leads with findings computed from the measured numbers (no canned narrative), then the
data (test points next to their most helpful/harmful training examples, a group gallery, flagged
noisy labels; :mod:`ggda.report.examples`), one section per evaluation with its figure, a note
on how to read it and the table behind it, and a configuration and provenance block (every
option, the options each method ran with, seeds, package versions, the regenerating command).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from ggda.io import write_text
from ggda.report import examples, figures

STYLE = (
    """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee} .note{color:#555;font-size:14px}
.fail{color:#a00} pre{background:#f6f6f6;padding:6px;white-space:pre-wrap;font-size:12px}
h3{font-size:15px;margin:.8em 0 .2em}
"""
    + examples.STYLE
)


def _table(frame: pd.DataFrame, floats: str = "{:.4f}") -> str:
    return frame.to_html(index=False, float_format=lambda v: floats.format(v), border=0, escape=True)


def _e(value) -> str:
    """A user-controlled value (method, grouping, data set or label name) as HTML text."""
    return html.escape(str(value), quote=True)


def _seeds(results: dict) -> int:
    try:
        return int(results.get("config", {}).get("seeds", 0))
    except (TypeError, ValueError):
        return 0


def _pm(mean: float, sem: float, seeds: int = 3) -> str:
    """``mean ± SEM`` with at least 3 seeds; with fewer, the mean and how many seeds (an SEM of
    two seeds is not an error bar worth printing)."""
    if seeds >= 3 and sem == sem:
        return f"{mean:.3f} ± {sem:.3f}"
    return f"{mean:.3f} (n={seeds} seed{'s' if seeds != 1 else ''}, no error bar)"


def _compare(a: float, b: float, sem_a: float, sem_b: float, seeds: int) -> str:
    """'better than' / 'worse than' / 'within noise of' for accuracies after removal (lower = better)."""
    noise = float(np.hypot(sem_a, sem_b)) if seeds >= 3 and sem_a == sem_a and sem_b == sem_b else 0.0
    diff = a - b
    if abs(diff) <= max(noise, 5e-4):
        return "within noise of" if noise > 0 else "tied with"
    return "better than" if diff < 0 else "worse than"


def findings(results: dict) -> list[str]:
    """Findings sentences (HTML, user strings escaped), every one computed from the measured
    numbers on this page; no sentence is written that the numbers could contradict.

    Lower accuracy after removing the top-ranked (most helpful) points = a more faithful ranking.
    """
    lines: list[str] = []
    seeds = _seeds(results)
    frame = pd.DataFrame(results.get("retraining", []))
    none = results.get("no_removal", {})
    if "acc_mean" in none:
        lines.append(f"No-removal test accuracy {_pm(none['acc_mean'], none.get('acc_sem', 0.0), seeds)}.")
    if frame.empty or "fraction" not in frame:
        return lines + _other_findings(results)
    f = float(frame["fraction"].max())
    at = frame[np.isclose(frame["fraction"], f)]
    baseline = at[at["label"] == "random"]
    ranked = at[at["label"] != "random"]
    r_acc = float(baseline["acc_mean"].iloc[0]) if len(baseline) else None
    r_sem = float(baseline["acc_sem"].iloc[0]) if len(baseline) else 0.0
    if r_acc is not None:
        lines.append(
            f"Removing a random {f:.0%} of the training points: accuracy {_pm(r_acc, r_sem, seeds)}."
        )
    lines.append(
        f"Below, removal means the top {f:.0%} most helpful points (or groups) by each ranking; lower accuracy "
        "after removal = a more faithful ranking."
    )
    for method in ranked["method"].dropna().unique():
        m = ranked[ranked["method"] == method]
        point = m[m["grouping"] == "singleton"]
        p_acc = float(point["acc_mean"].iloc[0]) if len(point) else None
        if p_acc is not None and r_acc is not None:
            p_sem = float(point["acc_sem"].iloc[0])
            verdict = _compare(p_acc, r_acc, p_sem, r_sem, seeds)
            lines.append(
                f"Per-point {_e(method)}: {_pm(p_acc, p_sem, seeds)}, {abs(r_acc - p_acc) * 100:.1f} points "
                f"{'below' if p_acc < r_acc else 'above'} random removal ({verdict} random removal)."
            )
        grouped = m[(m["grouping"] != "singleton") & m["K"].notna()]
        for K, g in grouped.groupby("K"):
            rnd = g[g["grouping"] == "random"]
            parts = []
            for _, row in g.sort_values("acc_mean").iterrows():
                text = f"{_e(row['grouping'])} {row['acc_mean']:.3f}"
                if len(rnd) and row["grouping"] != "random":
                    verdict = _compare(
                        row["acc_mean"],
                        float(rnd["acc_mean"].iloc[0]),
                        row["acc_sem"],
                        float(rnd["acc_sem"].iloc[0]),
                        seeds,
                    )
                    text += f" ({verdict} random groups)"
                parts.append(text)
            tail = ""
            if p_acc is not None:
                best = g.sort_values("acc_mean").iloc[0]
                gap = float(best["acc_mean"]) - p_acc
                tail = (
                    f"; the best grouping, {_e(best['grouping'])}, is {abs(gap) * 100:.1f} points "
                    f"{'above' if gap > 0 else 'below'} per-point ({p_acc:.3f})"
                )
            lines.append(f"{_e(method)}, K={_e(int(K))}: " + "; ".join(parts) + tail + ".")
    return lines + _other_findings(results)


def _other_findings(results: dict) -> list[str]:
    lines = []
    seeds = _seeds(results)
    prune = pd.DataFrame(results.get("pruning", []))
    none = results.get("no_removal", {}).get("acc_mean")
    if not prune.empty and none is not None and {"fraction", "acc_mean", "grouping"} <= set(prune):
        f = float(prune["fraction"].max())
        at = prune[np.isclose(prune["fraction"], f)]
        rnd = at[at["label"] == "random"]
        for _, p in at[at["grouping"] == "singleton"].iterrows():
            text = (
                f"Pruning {f:.0%} (least valuable first by per-point {_e(p['method'])}): accuracy "
                f"{p['acc_mean']:.3f}, {'above' if p['acc_mean'] > none else 'at or below'} no removal ({none:.3f})"
            )
            if len(rnd):
                r = float(rnd["acc_mean"].iloc[0])
                verdict = _compare(-p["acc_mean"], -r, p["acc_sem"], float(rnd["acc_sem"].iloc[0]), seeds)
                text += f"; {verdict} random pruning ({r:.3f})"
            lines.append(text + ".")
    lds = pd.DataFrame(results.get("lds", []))
    if not lds.empty and "lds" in lds:
        best, worst = lds.sort_values("lds").iloc[-1], lds.sort_values("lds").iloc[0]
        lines.append(
            f"Highest LDS {best['lds']:.3f} ({_e(best['label'])}); lowest {worst['lds']:.3f} ({_e(worst['label'])})."
        )
    noisy = pd.DataFrame(results.get("noisy", []))
    if not noisy.empty and "auc" in noisy:
        best = noisy.sort_values("auc", ascending=False).iloc[0]
        info = results.get("noisy_info", {})
        lines.append(
            f"Noisy labels ({_e(info.get('n_flipped'))} flipped, model {_e(info.get('model'))}): best AUC "
            f"{best['auc']:.3f} ({_e(best['label'])}, {_e(best['ranking'])}); 0.5 = random order."
        )
    return lines


headline = findings  # the former name


def _dl(items: dict) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items.items())
        + "</table>"
    )


def provenance_section(results: dict) -> str:
    """Every experiment option, the options each method actually ran with, seeds, package
    versions and the command that regenerates the page."""
    cfg = results.get("config", {})
    prov = results.get("provenance") or {}
    parts = ["<h2>Configuration and provenance</h2>"]
    if prov.get("command"):
        parts.append(f"<p>Regenerate this page with:</p><pre>{_e(prov['command'])}</pre>")
    parts.append("<h3>Experiment options</h3>" + _dl({k: json_text(v) for k, v in cfg.items()}))
    for method, rec in (prov.get("methods") or {}).items():
        parts.append(
            f"<h3>Method {_e(method)}: options used</h3>"
            + _dl({k: json_text(v) for k, v in rec.get("options", {}).items()})
        )
        extra = dict(rec.get("info", {}))
        if "resolved_damping" in rec:
            extra["resolved damping λ"] = rec["resolved_damping"]
        if extra:
            parts.append(
                "<p class='note'>Recorded while it ran:</p>"
                + _dl({k: json_text(v) for k, v in extra.items()})
            )
    if prov.get("seeds"):
        parts.append("<h3>Seeds behind each number</h3>" + _dl(prov["seeds"]))
    if prov.get("versions"):
        parts.append("<h3>Package versions</h3>" + _dl(prov["versions"]))
    return "\n".join(parts) if len(parts) > 1 else ""


def json_text(value) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value, default=str)


def _error_note(results: dict) -> str:
    seeds = _seeds(results)
    if seeds >= 3:
        return f"Error bars: SEM over {seeds} retraining seeds."
    return f"n={seeds} seed{'s' if seeds != 1 else ''}, no error bar (an SEM needs at least 3)."


def write_report(results: dict, out: str | Path, title: str | None = None) -> Path:
    """Render figures and ``index.html`` into ``out``; returns the index path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, ref = results["config"], results["reference"]
    title = title or f"ggda experiment: {cfg['data']}, {cfg['model']}"
    parts = [
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
    ]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    parts.append(
        f"<p>n_train={_e(ref['n_train'])}, n_test={_e(ref['n_test'])}, reference model test accuracy {ref['test_accuracy']:.4f}. "
        f"Methods: {_e(', '.join(map(str, cfg['methods'])))}; groupings: {_e(', '.join(map(str, cfg['groupings'])))} at K = {_e(', '.join(map(str, cfg['ks'])))} "
        f"(per-point always included). {results['retrains']['distinct']} distinct retrains; the latest invocation "
        f"ran {results['retrains']['ran']} of them ({results['retrains']['seconds']:.0f}s) and loaded the rest from the "
        f"stores in this folder; it took {results['seconds']:.0f}s in all.</p>"
    )
    parts.append(
        "<h2>Findings</h2><p class='note'>Each sentence is computed from the numbers below.</p><ul>"
        + "".join(f"<li>{line}</li>" for line in findings(results))
        + "</ul>"
    )
    data_views = examples.data_sections(out)
    if data_views:
        parts.append(data_views)

    def section(name: str, image: str | None, note: str, table: str = "") -> None:
        if image is None:
            return
        parts.append(
            f"<h2>{html.escape(name)}</h2><p class='note'>{note}</p><p><img src='{_e(image)}'></p>{table}"
        )

    retraining = pd.DataFrame(results["retraining"])
    table = ""
    if not retraining.empty:
        cells = retraining.assign(
            acc=[
                _pm(m, s, _seeds(results))
                for m, s in zip(retraining["acc_mean"], retraining["acc_sem"], strict=False)
            ]
        )
        pivot = cells.pivot_table(index="label", columns="fraction", values="acc", aggfunc="first")
        pivot.columns = [f"top {c:.0%}" for c in pivot.columns]
        times = pd.DataFrame(results["attributions"]).set_index("label")[["K", "seconds"]]
        joined = pivot.join(times)
        joined["K"] = joined["K"].astype("Int64").astype(str).replace("<NA>", "")
        joined["seconds"] = joined["seconds"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
        table = _table(joined.reset_index())
    section(
        "Retraining score vs attribution time",
        figures.score_vs_time(results, out),
        "Each point is one method × grouping × K (stars: per-point). Lower accuracy after removing the most helpful "
        "points means a more faithful attribution; further left means cheaper. " + _error_note(results),
        table,
    )
    section(
        "Grouping ablation (GGDA Figure 1)",
        figures.grouping_ablation(results, out),
        "Accuracy after removing the top fraction, by grouping method and K (lower = the grouping keeps the "
        "attribution faithful); compare each bar with per-point and with random groups at the same K. "
        + _error_note(results),
    )
    section(
        "Accuracy after removing 1/5/10/20% (GGDA Figure 2)",
        figures.removal_curves(results, out, "retraining"),
        "Removal curves per method with the random-removal and no-removal baselines. " + _error_note(results),
    )
    pruning = pd.DataFrame(results["pruning"])
    section(
        "Dataset pruning",
        figures.removal_curves(results, out, "pruning"),
        "Least valuable (most harmful) points removed first; a good valuation stays at or above the no-removal line longer "
        "than random pruning.",
        _table(pruning[["label", "fraction", "n_removed", "acc_mean", "acc_sem"]])
        if not pruning.empty
        else "",
    )
    lds = pd.DataFrame(results["lds"])
    section(
        "Linear datamodeling score",
        figures.lds_bars(results, out),
        f"{_e(cfg['lds_subsets'])} random subsets keeping {cfg['lds_alpha']:.0%} of each grouping's units, one retrain each; "
        "Spearman between predicted and actual test loss per test point, averaged.",
        _table(lds[["label", "K", "seconds", "lds", "lds_sem"]]) if not lds.empty else "",
    )
    noisy = pd.DataFrame(results.get("noisy", []))
    for ranking in ("self-influence", "test-harm"):
        section(
            f"Noisy-label detection ({ranking})",
            figures.noisy_curves(results, out, ranking),
            "Points ranked by self-influence (own-loss attribution, divided by group size)"
            if ranking == "self-influence"
            else "Points ranked by harm to the mean test loss (−score / group size)",
            _table(noisy[noisy["ranking"] == ranking].drop(columns=["ranking"])) if not noisy.empty else "",
        )
    section(
        "Similarity to the further-training gold standard",
        figures.gold_similarity(results, out),
        f"From <code>{html.escape(str(cfg.get('gold_compare')))}</code> (ggda compare): similarity of each method's scores "
        "to the gold standard as further training grows.",
    )
    prov = provenance_section(results)
    if prov:
        parts.append(prov)
    if results.get("failures"):
        items = "".join(f"<li>{html.escape(str(f))}</li>" for f in results["failures"])
        parts.append(f"<h2>Skipped</h2><ul class='fail'>{items}</ul>")
    parts.append(
        "<p class='note'>Tables as CSV next to this page; all numbers in results.json.</p></body></html>"
    )
    return write_text(out / "index.html", "\n".join(parts))
