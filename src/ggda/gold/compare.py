"""How well each attribution method approximates the further-training gold standard (NOTES B6).

For every recorded amount of further training e and target t, the similarity is taken over the
left-out set I (gotcha 6): ``cos(gold[e, t, :], scores[t, :])`` and the Spearman rank correlation.
Reported as mean ± SEM over targets (SEM = std/√T, FiMODA's convention). The gold vector is
averaged over seeds *before* the cosine (gotcha 5); the seed-window study repeats FiMODA's
analysis: for k seeds, average non-overlapping windows of k seeds, compute the mean cosine of each
window, average over windows, and report the max over epochs.

Method scores use the library's convention (positive = helpful), the same sign as the gold
standard, so no sign fixes are applied here.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from ggda.data.dataset import Dataset
from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.io import atomic_open, save_csv, save_json, save_npz
from ggda.properties import Property
from ggda.task import AttributionTask


def cosine(gold: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(E, T) cosine over units between ``gold`` (E, T, U) and ``scores`` (T, U); NaN if a norm is 0."""
    num = np.einsum("etu,tu->et", gold, scores)
    den = np.linalg.norm(gold, axis=-1) * np.linalg.norm(scores, axis=-1)[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def spearman(gold: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(E, T) Spearman correlation over units (Pearson of average ranks; ties share ranks)."""
    rg = rankdata(gold, axis=-1)
    rs = rankdata(scores, axis=-1)
    return cosine(rg - rg.mean(-1, keepdims=True), rs - rs.mean(-1, keepdims=True))


def mean_sem(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SEM over the last axis (targets), ignoring NaN."""
    count = np.sum(np.isfinite(values), axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=-1)
        sem = np.nanstd(values, axis=-1) / np.sqrt(np.maximum(count, 1))
    return mean, sem


def seed_window_study(
    diffs: np.ndarray, scores: np.ndarray, windows: list[int] | None = None
) -> dict[int, dict[str, float | list[float]]]:
    """FiMODA's seed-count study for one method.

    Args:
        diffs: (S, E, T, U) per-seed gold terms (``GoldResult.seed_diffs()``).
        scores: (T, U) method scores.
        windows: window sizes k (default 1, 2, 5, 10, 20, 50, 100 up to S).

    Returns:
        ``{k: {"curve": mean cosine per epoch averaged over windows, "max": max over epochs,
        "windows": number of windows}}``.
    """
    S = diffs.shape[0]
    windows = windows or [k for k in (1, 2, 5, 10, 20, 50, 100) if k <= S]
    out: dict[int, dict] = {}
    for k in windows:
        if not 1 <= k <= S:
            continue
        curves = [mean_sem(cosine(diffs[w * k : (w + 1) * k].mean(0), scores))[0] for w in range(S // k)]
        curve = np.mean(curves, axis=0)
        out[k] = {"curve": curve.tolist(), "max": float(np.nanmax(curve)), "windows": S // k}
    return out


def method_scores(
    name: str,
    task: AttributionTask,
    train: Dataset,
    grouping: Grouping,
    prop: Property,
    unit_ids: np.ndarray,
    options: dict | None = None,
    run=None,
) -> np.ndarray:
    """(T, U) scores of method ``name`` for the left-out units (columns of the full grouping).

    The method sees the whole training set and grouping (curvature, normalisers and TRAK's
    features are training-set quantities); only the left-out units' columns are kept. With a
    :class:`~ggda.runs.Run`, the method is built by ``run.method`` (the run's weight decay and
    checkpoints offered; ``options`` override them).
    """
    from ggda.methods import make_method

    if run is not None:
        attributor = run.method(name, task, **(options or {}))
    else:
        attributor = make_method(name, task, **(options or {}))
    scores = attributor.cache(train, grouping).attribute(prop)
    return np.asarray(scores, dtype=np.float64)[:, np.asarray(unit_ids)]


@dataclass
class Comparison:
    """Similarity of each method to the gold standard (``E`` = recorded amounts of training)."""

    epochs: np.ndarray
    cos: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (E, T)
    spearman: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    seed_study: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def table(self) -> list[dict]:
        """Long-format rows: method, epoch, metric, mean, sem."""
        rows = []
        for metric, data in (("cosine", self.cos), ("spearman", self.spearman)):
            for name, values in data.items():
                mean, sem = mean_sem(values)
                for e, ep in enumerate(self.epochs):
                    rows.append(
                        {
                            "method": name,
                            "epoch": float(ep),
                            "metric": metric,
                            "mean": float(mean[e]),
                            "sem": float(sem[e]),
                        }
                    )
        return rows

    def save(self, out: str | Path) -> Path:
        import pandas as pd

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_csv(out / "compare.csv", pd.DataFrame(self.table()))
        save_npz(
            out / "similarity.npz",
            epochs=self.epochs,
            **{f"cos__{k}": v for k, v in self.cos.items()},
            **{f"spearman__{k}": v for k, v in self.spearman.items()},
        )
        summary = {
            "epochs": self.epochs.tolist(),
            "methods": {
                name: {
                    "cosine_mean": mean_sem(self.cos[name])[0].tolist(),
                    "cosine_sem": mean_sem(self.cos[name])[1].tolist(),
                    "spearman_mean": mean_sem(self.spearman[name])[0].tolist(),
                    "spearman_sem": mean_sem(self.spearman[name])[1].tolist(),
                    "seconds": self.seconds.get(name),
                }
                for name in self.cos
            },
            "seed_study": {m: {str(k): v for k, v in d.items()} for m, d in self.seed_study.items()},
            "failed": self.failed,
            **self.meta,
        }
        save_json(out / "compare.json", summary, default=float)
        if self.seed_study:
            rows = [
                {"method": m, "seeds": k, "max_mean_cosine": v["max"], "windows": v["windows"]}
                for m, d in self.seed_study.items()
                for k, v in d.items()
            ]
            save_csv(out / "seed_study.csv", pd.DataFrame(rows))
        self.plot(out / "compare.png")
        return out

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Cosine and Spearman vs amount of further training, one line per method, ±SEM bands."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
        for ax, (label, data) in zip(
            axes, (("cosine similarity", self.cos), ("Spearman", self.spearman)), strict=True
        ):
            for name, values in data.items():
                mean, sem = mean_sem(values)
                line = ax.plot(
                    self.epochs, mean, marker="o" if len(self.epochs) <= 30 else None, ms=3, label=name
                )
                ax.fill_between(self.epochs, mean - sem, mean + sem, alpha=0.2, color=line[0].get_color())
            ax.axhline(0.0, color="grey", lw=0.6)
            ax.set_xlabel("further-training epochs")
            ax.set_ylabel(f"{label} to gold (mean ± SEM over targets)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(title or self.meta.get("title", "Methods vs further-training gold standard"))
        fig.tight_layout()
        try:
            with atomic_open(path) as fh:
                fig.savefig(fh, format="png", dpi=120)
        finally:
            plt.close(fig)
        return Path(path)


def compare_methods(
    gold,
    task: AttributionTask,
    train: Dataset,
    grouping: Grouping,
    prop: Property,
    methods: list[str],
    options: dict[str, dict] | None = None,
    center_scores: bool = False,
    seed_windows: list[int] | None = None,
    strict: bool = False,
    variant: str = "config",
    run=None,
    scores: dict[str, np.ndarray] | None = None,
) -> Comparison:
    """Score each method on the gold standard's units and compare (see the module docstring).

    Args:
        gold: a :class:`~ggda.gold.GoldResult`.
        grouping: the grouping the gold's unit ids refer to (singleton for points).
        methods: registered method names; names not registered are recorded as failed.
        options: per-method keyword options for ``make_method``.
        run: the :class:`~ggda.runs.Run` the gold was computed on; methods are then built by
            ``run.method`` (its weight decay and checkpoints offered, ``options`` override).
        center_scores: subtract each target's mean score over I before comparing (off: FiMODA
            compares raw scores to the centred gold).
        strict: raise instead of recording a method's failure.
        variant: ``config`` (the gold as computed), ``centred`` (eq. 13) or ``raw`` (eq. 17).
        scores: method name -> (T, U) scores already computed for these units and targets (e.g.
            by :func:`method_scores`); such methods are compared without scoring again. Method
            scores depend on θ^f only, not on how the gold was further-trained, so one scoring
            serves every optimiser and variant (FiMODA compares the same scores to its SGD and
            Adam gold standards). A missing name is scored here and added to the dict.
    """
    from ggda.methods import METHODS

    if gold.gold.shape[1] != prop.n_targets:
        raise GGDAError(
            f"The gold standard has {gold.gold.shape[1]} targets but the property has {prop.n_targets}; "
            "use the same targets."
        )
    if gold.unit_ids.max(initial=-1) >= grouping.n_groups:
        raise GGDAError(
            "The gold standard's units do not exist in this grouping; use the grouping it was made with."
        )
    variants = {
        "config": (gold.gold, None),
        "centred": (gold.gold_centred, True),
        "raw": (gold.gold_raw, False),
    }
    if variant not in variants:
        raise GGDAError(f"Unknown gold variant '{variant}'; choose config, centred or raw.")
    target, center = variants[variant]
    comp = Comparison(epochs=np.asarray(gold.epochs, dtype=float), meta={"gold_variant": variant})
    diffs = gold.seed_diffs(center) if gold.loo.shape[0] > 1 else None
    for name in methods:
        if name not in METHODS:
            comp.failed[name] = "not registered in ggda.methods"
            continue
        if scores is not None and name in scores:
            s = np.asarray(scores[name], dtype=np.float64)
            if s.shape != target.shape[1:]:
                raise GGDAError(
                    f"The given scores of '{name}' have shape {s.shape}; the gold standard needs "
                    f"(targets, units) = {target.shape[1:]}."
                )
        else:
            t0 = time.perf_counter()
            try:
                s = method_scores(
                    name, task, train, grouping, prop, gold.unit_ids, (options or {}).get(name), run
                )
            except Exception as exc:  # one failing method must not lose the others
                if strict:
                    raise
                comp.failed[name] = f"{type(exc).__name__}: {exc}"
                continue
            comp.seconds[name] = time.perf_counter() - t0
            if scores is not None:
                scores[name] = s
        if center_scores:
            s = s - s.mean(axis=1, keepdims=True)
        comp.cos[name] = cosine(target, s)
        comp.spearman[name] = spearman(target, s)
        if diffs is not None:
            comp.seed_study[name] = seed_window_study(diffs, s, seed_windows)
    return comp
