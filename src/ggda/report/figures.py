"""The experiment report's figures (matplotlib, Agg backend), one function per figure.

Each function takes the results dict of :func:`ggda.applications.experiment.run_experiment`, writes
one PNG into ``out`` and returns its file name, or ``None`` when the experiment has no data for it.
Colours identify attribution methods, markers identify grouping methods, throughout.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ggda.io import atomic_open  # noqa: E402

MARKERS = {
    "singleton": "*",
    "random": "o",
    "kmeans": "s",
    "repr-kmeans": "^",
    "grad-kmeans": "D",
    "given": "P",
}
DPI = 110


def _yerr(results: dict, values) -> np.ndarray | None:
    """Error bars only when they mean something: SEM over at least 3 retraining seeds."""
    return np.asarray(values, dtype=float) if int(results.get("config", {}).get("seeds", 0)) >= 3 else None


def _seed_note(results: dict) -> str:
    seeds = int(results.get("config", {}).get("seeds", 0))
    return "" if seeds >= 3 else f" (n={seeds} seeds, no error bar)"


def _log_x(ax) -> None:
    """A log x axis whose tick labels cannot collide: labels at 1-2-5 steps only, no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    lo, hi = ax.get_xlim()
    if hi / max(lo, 1e-300) > 1e3:  # wide range: decades only
        ax.xaxis.set_major_locator(LogLocator(base=10, numticks=12))
    ax.tick_params(axis="x", labelsize=8)


def _annotate_sparse(ax, points: list[tuple[float, float, str]], pad: float = 2.0) -> None:
    """Label points without overlaps: each label tries a few offsets around its point and is kept
    at the first where its drawn box (padded by ``pad`` pixels) meets no label already placed;
    where none fits the point stays unlabelled (its marker and the table carry K)."""
    fig = ax.figure
    fig.canvas.draw()  # final limits, scales and a renderer
    renderer = fig.canvas.get_renderer()
    placed = []
    offsets = [(4, 3), (4, -9), (-4, 3), (-4, -9), (0, 8), (0, -14)]
    for x, y, text in points:
        for dx, dy in offsets:
            label = ax.annotate(
                text,
                (x, y),
                fontsize=7,
                xytext=(dx, dy),
                textcoords="offset points",
                ha="left" if dx >= 0 else "right",
            )
            box = label.get_window_extent(renderer).expanded(1.0, 1.0).padded(pad)
            inside = ax.get_window_extent(renderer)
            if box.x0 >= inside.x0 and box.x1 <= inside.x1 and not any(box.overlaps(q) for q in placed):
                placed.append(box)
                break
            label.remove()


def _suptitle(fig, text: str) -> None:
    """A figure title wrapped to the figure's width (a one-panel figure cuts a long title off)."""
    import textwrap

    width = max(30, int(fig.get_figwidth() * 11))
    fig.suptitle(textwrap.fill(text, width), fontsize=10)


def _colors(methods) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(sorted(set(methods)))}


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    try:
        with atomic_open(Path(out) / name) as fh:  # a full disk leaves no truncated figure
            fig.savefig(fh, format="png", dpi=DPI, bbox_inches="tight")  # keeps a legend below the panels
    finally:
        plt.close(fig)
    return name


def _baselines(ax, frame: pd.DataFrame, fraction: float, none_acc: float | None) -> None:
    rnd = frame[(frame["label"] == "random") & np.isclose(frame["fraction"], fraction)]
    if len(rnd):
        ax.axhline(float(rnd["acc_mean"].iloc[0]), color="grey", ls="--", lw=1, label="random removal")
    if none_acc is not None:
        ax.axhline(none_acc, color="black", ls=":", lw=1, label="no removal")


def score_vs_time(results: dict, out: Path) -> str | None:
    """Retraining score (accuracy after removal; lower = better) vs attribution time, per fraction."""
    frame = pd.DataFrame(results["retraining"])
    if frame.empty:
        return None
    fractions = sorted(frame["fraction"].unique())
    ranked = frame[frame["label"] != "random"]
    colors = _colors(ranked["method"])
    cols = min(2, len(fractions))
    rows = int(np.ceil(len(fractions) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.2 * rows), squeeze=False)
    for ax, f in zip(axes.flat, fractions, strict=False):
        sub = ranked[np.isclose(ranked["fraction"], f)]
        labels = []
        for _, r in sub.iterrows():
            ax.errorbar(
                r["seconds"],
                r["acc_mean"],
                yerr=None if _yerr(results, [r["acc_sem"]]) is None else r["acc_sem"],
                fmt=MARKERS.get(r["grouping"], "o"),
                color=colors[r["method"]],
                ms=9 if r["grouping"] == "singleton" else 6,
                alpha=0.85,
            )
            if r["grouping"] != "singleton":
                labels.append((r["seconds"], r["acc_mean"], f"K={r['K']}"))
        _baselines(ax, frame, f, results["no_removal"]["acc_mean"])
        _log_x(ax)
        _annotate_sparse(ax, labels)
        ax.set_title(f"remove top {f:.0%} most helpful points")
        ax.set_xlabel("attribution time, grouping included (s)")
        ax.set_ylabel("test accuracy after retraining\n(lower = more faithful)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(fractions) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=m) for m, c in colors.items()]
    handles += [
        plt.Line2D([], [], color="k", marker=MARKERS.get(g, "o"), ls="", label=g)
        for g in sorted(ranked["grouping"].unique())
    ]
    handles += [
        plt.Line2D([], [], color="grey", ls="--", label="random removal"),
        plt.Line2D([], [], color="k", ls=":", label="no removal"),
    ]
    # below the panels: inside one it hides points
    fig.legend(
        handles=handles,
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(len(handles), 5 if cols == 1 else 9),
    )
    _suptitle(fig, "Retraining score vs attribution time (labels: K, where they fit)" + _seed_note(results))
    return _save(fig, out, "score_vs_time.png")


def grouping_ablation(results: dict, out: Path, fraction: float | None = None) -> str | None:
    """GGDA Figure 1: accuracy after removing the top fraction, bars per grouping method × K, per method."""
    frame = pd.DataFrame(results["retraining"])
    if frame.empty:
        return None
    fraction = fraction if fraction is not None else float(frame["fraction"].max())
    sub = frame[np.isclose(frame["fraction"], fraction) & (frame["label"] != "random")]
    methods = sorted(sub["method"].unique())
    per_method = max(int(sub.groupby("method").size().max()), 1)
    fig, axes = plt.subplots(
        1, len(methods), figsize=(len(methods) * max(4.0, 0.45 * per_method + 1.5), 4.4), squeeze=False
    )
    for ax, method in zip(axes.flat, methods, strict=False):
        m = sub[sub["method"] == method].sort_values(
            ["grouping", "K"],
            key=lambda c: c.map(lambda v: (v != "singleton", v)) if c.name == "grouping" else c,
        )
        labels = [
            ("per-point" if g == "singleton" else f"{g}\nK={k}")
            for g, k in zip(m["grouping"], m["K"], strict=False)
        ]
        colors = [plt.cm.tab10(list(MARKERS).index(g) % 10) if g in MARKERS else "C7" for g in m["grouping"]]
        x = np.arange(len(m))
        ax.bar(x, m["acc_mean"], yerr=_yerr(results, m["acc_sem"]), color=colors, capsize=3)
        _baselines(ax, frame, fraction, results["no_removal"]["acc_mean"])
        lo = min(m["acc_mean"].min(), results["no_removal"]["acc_mean"]) - 0.05
        ax.set_ylim(max(0.0, lo), 1.0)
        ax.set_xticks(x, labels, rotation=60, fontsize=7, ha="right")
        ax.set_title(method)
        ax.set_ylabel(f"accuracy after removing top {fraction:.0%}")
        ax.grid(alpha=0.3, axis="y")
    axes.flat[0].legend(fontsize=7)
    _suptitle(
        fig, "Grouping ablation (lower = grouping keeps the attribution faithful)" + _seed_note(results)
    )
    return _save(fig, out, "grouping_ablation.png")


def removal_curves(results: dict, out: Path, key: str = "retraining") -> str | None:
    """GGDA Figure 2 (``retraining``) or pruning (``pruning``): accuracy vs fraction removed.

    With a single fraction there is no curve: each ranking becomes one bar (a line plot would
    draw a lone x value on a meaningless ±1.5 axis).
    """
    frame = pd.DataFrame(results[key])
    if frame.empty:
        return None
    ranked = frame[frame["label"] != "random"]
    methods = sorted(ranked["method"].unique())
    rnd = frame[frame["label"] == "random"].sort_values("fraction")
    none_acc = results["no_removal"]["acc_mean"]
    order = "(most helpful first)" if key == "retraining" else "(least valuable first)"
    fractions = sorted(frame["fraction"].unique())
    if len(fractions) == 1:
        return _removal_bars(results, out, key, frame, fractions[0], order)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.8 * len(methods), 4.2), squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, methods, strict=False):
        m = ranked[ranked["method"] == method]
        for _label, curve in m.groupby("label"):
            curve = curve.sort_values("fraction")
            g = curve["grouping"].iloc[0]
            ax.errorbar(
                curve["fraction"] * 100,
                curve["acc_mean"],
                yerr=_yerr(results, curve["acc_sem"]),
                marker=MARKERS.get(g, "o"),
                lw=2.2 if g == "singleton" else 1,
                label="per-point" if g == "singleton" else f"{g} K={curve['K'].iloc[0]}",
                capsize=2,
            )
        ax.errorbar(
            rnd["fraction"] * 100,
            rnd["acc_mean"],
            yerr=_yerr(results, rnd["acc_sem"]),
            color="grey",
            ls="--",
            label="random",
            capsize=2,
        )
        ax.axhline(none_acc, color="black", ls=":", lw=1, label="no removal")
        ax.set_xticks([f * 100 for f in fractions], [f"{f:.0%}" for f in fractions])
        ax.set_title(method)
        ax.set_xlabel(f"training points removed {order}")
        ax.set_ylabel("test accuracy after retraining")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    title = "Accuracy after removing the most helpful points" if key == "retraining" else "Dataset pruning"
    _suptitle(fig, title + _seed_note(results))
    return _save(fig, out, f"{key}_curves.png")


def _removal_bars(
    results: dict, out: Path, key: str, frame: pd.DataFrame, fraction: float, order: str
) -> str:
    """One fraction: a bar per ranking (per method), random removal as a grey bar, no removal as a line."""
    ranked = frame[frame["label"] != "random"]
    methods = sorted(ranked["method"].unique())
    rnd = frame[frame["label"] == "random"]
    widest = max(int(ranked.groupby("method").size().max()), 1) + 1
    fig, axes = plt.subplots(
        1,
        len(methods),
        figsize=(len(methods) * max(4.0, 0.45 * widest + 1.5), 4.4),
        squeeze=False,
        sharey=True,
    )
    for ax, method in zip(axes.flat, methods, strict=False):
        m = ranked[ranked["method"] == method].sort_values(
            ["grouping", "K"],
            key=lambda c: c.map(lambda v: (v != "singleton", v)) if c.name == "grouping" else c,
        )
        labels = [
            "per-point" if g == "singleton" else f"{g}\nK={k}"
            for g, k in zip(m["grouping"], m["K"], strict=False)
        ]
        colors = [plt.cm.tab10(list(MARKERS).index(g) % 10) if g in MARKERS else "C7" for g in m["grouping"]]
        means, sems = list(m["acc_mean"]), list(m["acc_sem"])
        if len(rnd):
            labels.append("random\nremoval")
            colors.append("lightgrey")
            means.append(float(rnd["acc_mean"].iloc[0]))
            sems.append(float(rnd["acc_sem"].iloc[0]))
        x = np.arange(len(means))
        ax.bar(x, means, yerr=_yerr(results, sems), color=colors, capsize=3)
        ax.axhline(results["no_removal"]["acc_mean"], color="black", ls=":", lw=1, label="no removal")
        lo = min(min(means), results["no_removal"]["acc_mean"]) - 0.05
        ax.set_ylim(max(0.0, lo), 1.0)
        ax.set_xticks(x, labels, rotation=60, fontsize=7, ha="right")
        ax.set_title(method)
        ax.set_ylabel(f"test accuracy after removing {fraction:.0%}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    title = "Accuracy after removing the most helpful points" if key == "retraining" else "Dataset pruning"
    _suptitle(fig, f"{title}: {fraction:.0%} removed {order}" + _seed_note(results))
    return _save(fig, out, f"{key}_curves.png")


def lds_bars(results: dict, out: Path) -> str | None:
    """LDS per method × grouping × K (higher = the scores predict retraining outcomes better)."""
    frame = pd.DataFrame(results["lds"])
    if frame.empty:
        return None
    colors = _colors(frame["method"])
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for _, r in frame.iterrows():
        ax.errorbar(
            r["seconds"],
            r["lds"],
            yerr=r["lds_sem"],
            fmt=MARKERS.get(r["grouping"], "o"),
            color=colors[r["method"]],
            ms=7,
        )
    ax.axhline(0, color="grey", lw=0.6)
    _log_x(ax)
    _annotate_sparse(
        ax,
        [
            (r["seconds"], r["lds"], f"K={r['K']}")
            for _, r in frame.iterrows()
            if r["grouping"] != "singleton"
        ],
    )
    ax.set_xlabel("attribution time, grouping included (s)")
    ax.set_ylabel("LDS (Spearman, mean ± SEM over test points)")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=m) for m, c in colors.items()]
    handles += [
        plt.Line2D([], [], color="k", marker=MARKERS.get(g, "o"), ls="", label=g)
        for g in sorted(frame["grouping"].unique())
    ]
    ax.legend(handles=handles, fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("Linear datamodeling score (subsets drawn over each grouping's units)")
    return _save(fig, out, "lds.png")


def noisy_curves(results: dict, out: Path, ranking: str = "self-influence") -> str | None:
    """Fraction of flipped labels found vs fraction of the data inspected, per method."""
    curves = {k: v for k, v in results.get("noisy_curves", {}).items() if k.endswith(f"|{ranking}")}
    if not curves:
        return None
    rows = pd.DataFrame(results["noisy"])
    rows = rows[rows["ranking"] == ranking].set_index("label")
    methods = sorted({k.split("|")[0] for k in curves})
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 4.2), squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, methods, strict=False):
        for key, c in curves.items():
            if key.split("|")[0] != method:
                continue
            label = key.rsplit("|", 1)[0]
            g = label.split("|")[1]
            auc = rows.loc[label, "auc"] if label in rows.index else float("nan")
            name = "per-point" if g == "singleton" else g.replace(":", " K=")
            ax.plot(
                np.asarray(c["inspected"]) * 100,
                np.asarray(c["found"]) * 100,
                lw=2.2 if g == "singleton" else 1,
                label=f"{name} (AUC {auc:.3f})",
            )
        ax.plot([0, 100], [0, 100], color="grey", ls="--", lw=1, label="random order")
        ax.set_title(f"{method} ({ranking})")
        ax.set_xlabel("% of training data inspected")
        ax.set_ylabel("% of flipped labels found")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    info = results.get("noisy_info", {})
    _suptitle(
        fig,
        f"Noisy-label detection: {info.get('n_flipped', '?')} flipped labels, model {info.get('model', '?')}",
    )
    return _save(fig, out, f"noisy_{ranking}.png")


def gold_similarity(results: dict, out: Path) -> str | None:
    """Cosine similarity to the further-training gold standard vs further-training epochs."""
    frame = pd.DataFrame(results.get("gold", []))
    if frame.empty:
        return None
    metrics = [m for m in ("cosine", "spearman") if m in set(frame["metric"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for method, m in frame[frame["metric"] == metric].groupby("method"):
            m = m.sort_values("epoch")
            line = ax.plot(m["epoch"], m["mean"], marker="o", ms=3, label=method)
            ax.fill_between(
                m["epoch"], m["mean"] - m["sem"], m["mean"] + m["sem"], alpha=0.2, color=line[0].get_color()
            )
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("further-training epochs")
        ax.set_ylabel(f"{metric} to gold (mean ± SEM)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _suptitle(fig, "Similarity to the further-training gold standard")
    return _save(fig, out, "gold_similarity.png")
