"""The experiment report: one self-contained ``index.html`` next to its PNG figures.

The page leads with the numbers a reader checks first (no-removal accuracy, the per-point vs
random gap at the largest removal fraction, the best grouping at each K), then one section per
evaluation with its figure, a short note on how to read it and the table behind it.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from ggda.io import write_text
from ggda.report import figures

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee} .note{color:#555;font-size:14px}
.fail{color:#a00}
"""


def _table(frame: pd.DataFrame, floats: str = "{:.4f}") -> str:
    return frame.to_html(index=False, float_format=lambda v: floats.format(v), border=0, escape=True)


def _e(value) -> str:
    """A user-controlled value (method, grouping, data set or label name) as HTML text."""
    return html.escape(str(value), quote=True)


def _pm(mean: float, sem: float) -> str:
    return f"{mean:.3f} ± {sem:.3f}"


def headline(results: dict) -> list[str]:
    """Plain-language findings computed from the results (what the GGDA story predicts)."""
    lines = []
    frame = pd.DataFrame(results["retraining"])
    if frame.empty:
        return lines
    f = float(frame["fraction"].max())
    at = frame[np.isclose(frame["fraction"], f)]
    rnd = at[at["label"] == "random"]
    none = results["no_removal"]["acc_mean"]
    lines.append(
        f"No-removal test accuracy {_pm(none, results['no_removal']['acc_sem'])} over {_e(results['config']['seeds'])} seeds."
    )
    if len(rnd):
        r = rnd.iloc[0]
        lines.append(f"Random removal of {f:.0%}: accuracy {_pm(r['acc_mean'], r['acc_sem'])}.")
    for _, p in at[at["grouping"] == "singleton"].iterrows():
        gap = (float(rnd["acc_mean"].iloc[0]) - p["acc_mean"]) if len(rnd) else float("nan")
        lines.append(
            f"Per-point {_e(p['method'])}: removing the top {f:.0%} gives {_pm(p['acc_mean'], p['acc_sem'])} "
            f"({gap * 100:.1f} points below random removal) in {p['seconds']:.2f}s."
        )
        grouped = at[(at["method"] == p["method"]) & (at["grouping"] != "singleton")]
        for K, g in grouped.groupby("K"):
            best = g.sort_values("acc_mean").iloc[0]
            parts = [
                f"best {_e(best['grouping'])} {_pm(best['acc_mean'], best['acc_sem'])} ({best['seconds']:.2f}s)"
            ]
            for name in ("grad-kmeans", "random"):
                row = g[g["grouping"] == name]
                if len(row) and name != best["grouping"]:
                    parts.append(f"{_e(name)} {row['acc_mean'].iloc[0]:.3f} ({row['seconds'].iloc[0]:.2f}s)")
            lines.append(
                f"&nbsp;&nbsp;groups K={_e(K)}: " + "; ".join(parts) + f" — per-point {p['acc_mean']:.3f}."
            )
    noisy = pd.DataFrame(results.get("noisy", []))
    if not noisy.empty:
        best = noisy.sort_values("auc", ascending=False).iloc[0]
        lines.append(
            f"Noisy labels ({_e(results['noisy_info'].get('n_flipped'))} flipped, {_e(results['noisy_info'].get('model'))}): best AUC "
            f"{best['auc']:.3f} ({_e(best['label'])}, {_e(best['ranking'])})."
        )
    return lines


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
        f"(per-point always included). {results['retrains']['distinct']} distinct retrains "
        f"({results['retrains']['ran']} run now, {results['retrains']['seconds']:.0f}s); total {results['seconds']:.0f}s.</p>"
    )
    parts.append(
        "<h2>Findings</h2><ul>" + "".join(f"<li>{line}</li>" for line in headline(results)) + "</ul>"
    )

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
            acc=[_pm(m, s) for m, s in zip(retraining["acc_mean"], retraining["acc_sem"], strict=False)]
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
        "points means a more faithful attribution; further left means cheaper. Error bars: SEM over retraining seeds.",
        table,
    )
    section(
        "Grouping ablation (GGDA Figure 1)",
        figures.grouping_ablation(results, out),
        "Accuracy after removing the top fraction, by grouping method and K. Gradient-aware groupings should stay close "
        "to per-point attribution; random groups should lose most of the signal.",
    )
    section(
        "Accuracy after removing 1/5/10/20% (GGDA Figure 2)",
        figures.removal_curves(results, out, "retraining"),
        "Removal curves per method with the random-removal and no-removal baselines.",
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
    if results.get("failures"):
        items = "".join(f"<li>{html.escape(str(f))}</li>" for f in results["failures"])
        parts.append(f"<h2>Skipped</h2><ul class='fail'>{items}</ul>")
    parts.append(
        "<p class='note'>Tables as CSV next to this page; all numbers in results.json.</p></body></html>"
    )
    return write_text(out / "index.html", "\n".join(parts))
