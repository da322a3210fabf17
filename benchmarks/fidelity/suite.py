"""Methods × option sets × settings, scored against retraining truth.

Metrics (all per target, then averaged over the targets):

* ``pearson`` / ``spearman`` — of a target's scores against its truth over the evaluated units
  (60 leave-one-out points, 50 groups);
* ``ratio`` — median over (target, group) of score / actual change (1 = right scale; first-order
  influence under-estimates group effects);
* ``lds`` — linear datamodeling score: Spearman over half-size subsets S between Σ_{i∈S} τ_i and
  the negated retrained target loss (positive = helpful, so more kept helpfulness = lower loss).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from scipy.stats import rankdata
from settings import Setting

from ggda.gradients.per_example import per_example_sq_norms
from ggda.groups import Grouping
from ggda.methods import METHODS, make_method
from ggda.methods.base import method_options

IF_FAMILY = ("if-explicit", "if-cg", "if-lissa", "if-arnoldi", "ekfac")
METHOD_ORDER = (*IF_FAMILY, "datainf", "if-group-fisher", "grad-dot", "tracin")


def _rowcorr(a: np.ndarray, b: np.ndarray) -> float:
    out = []
    for x, y in zip(a, b, strict=True):
        if np.std(x) == 0 or np.std(y) == 0:
            out.append(0.0)
        else:
            out.append(float(np.corrcoef(x, y)[0, 1]))
    return float(np.mean(out))


def pearson(s: np.ndarray, t: np.ndarray) -> float:
    return _rowcorr(s, t)


def spearman(s: np.ndarray, t: np.ndarray) -> float:
    return _rowcorr(rankdata(s, axis=1), rankdata(t, axis=1))


def ratio(s: np.ndarray, t: np.ndarray) -> float:
    return float(np.median(s / t))


def lds(per_point: np.ndarray, subsets: list[np.ndarray], values: np.ndarray) -> float:
    pred = np.stack([per_point[:, idx].sum(1) for idx in subsets], 1)  # (T, M)
    return spearman(pred, -values)


def legacy_damping(setting: Setting) -> float:
    """Today's (pre-#18) default λ = 100 × mean_i ‖∇ℓ_i‖² / p (here over all rows)."""
    sq = per_example_sq_norms(setting.task, setting.train.X, setting.train.y)
    return 100.0 * float(sq.mean()) / setting.task.n_params


def accepts(method: str, option: str) -> bool:
    return option in method_options(METHODS[method])


def options_for(method: str, config: str, setting: Setting, lam_legacy: float) -> dict | None:
    """Options of ``method`` under option set ``config`` (None: not applicable)."""
    opts: dict = {}
    if accepts(method, "weight_decay"):
        opts["weight_decay"] = setting.weight_decay  # what a run trained with wd passes
    if method == "tracin" and setting.checkpoints:
        opts["checkpoints"] = setting.checkpoints
    if config == "default":
        return opts
    if config == "legacy":
        if method in IF_FAMILY or method == "if-group-fisher":
            return {**opts, "damping": lam_legacy}
        return None
    if config in ("second-order", "order-5"):
        order = 2 if config == "second-order" else 5
        return {**opts, "order": order} if accepts(method, "order") else None
    if config == "tuned":
        tuned = TUNED.get(setting.name, {}).get(method)
        return None if tuned is None else {**opts, **tuned}
    raise ValueError(config)


# Best options found (docs/fidelity.md): on the convex case λ = 0 (weight decay conditions H) with
# converged solvers; on the MLP the damping sweep's best floor (damping_rel 0.015) with converged
# solvers / larger ranks.
TUNED: dict[str, dict[str, dict]] = {
    "lr": {
        "if-explicit": {"damping": 0.0},
        "if-cg": {"damping": 0.0, "tol": 1e-10, "max_iter": 2000},
        "if-lissa": {"batch_size": None},
        "if-arnoldi": {"damping": 0.0, "rank": 650, "iterations": 650},
        "ekfac": {"damping": 0.0},
        "if-group-fisher": {"damping": 0.0},
    },
    "mlp": {
        "if-explicit": {"damping_rel": 0.015},
        "if-cg": {"damping_rel": 0.015, "tol": 1e-8, "max_iter": 1000},
        "if-lissa": {"damping_rel": 0.015, "batch_size": None},
        "if-arnoldi": {"damping_rel": 0.015, "rank": 400, "iterations": 800},
        "ekfac": {"damping_rel": 0.015},
    },
}
TUNED["cnn"] = TUNED["mlp"]


def run_method(setting: Setting, method: str, options: dict, grouping: Grouping | None):
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = make_method(method, setting.task, **options).cache(setting.train, grouping)
        scores = m.attribute(setting.prop)
    info = dict(getattr(m, "info", {}) or {})
    info = {k: v for k, v in info.items() if isinstance(v, int | float | bool)}
    info["warnings"] = sorted({str(w.message)[:80] for w in caught})
    return scores, time.perf_counter() - t0, info


def evaluate(
    setting: Setting, method: str, options: dict, per_point: bool = True, groups: bool = True, only=None
) -> dict:
    """Every metric of one method/options on one setting."""
    res: dict = {"options": {k: v for k, v in options.items() if k != "checkpoints"}}
    if "checkpoints" in options:
        res["options"]["checkpoints"] = len(options["checkpoints"])
    if per_point and options.get("order", 1) == 1:
        try:
            s, sec, info = run_method(setting, method, options, None)
        except Exception as exc:  # noqa: BLE001  (a failing method is a result)
            res["error"] = f"{type(exc).__name__}: {exc}"[:200]
            return res
        res["time_point"], res["info_point"] = sec, info
        if setting.loo_idx is not None:
            t = setting.truth["loo"]
            sl = s[:, setting.loo_idx]
            res["loo"] = {"pearson": pearson(sl, t), "spearman": spearman(sl, t)}
        if setting.lds_subsets is not None:
            res["lds"] = lds(s, setting.lds_subsets, setting.lds_values)
    if groups:
        for gname, g in setting.groupings.items():
            if only is not None and gname not in only:
                continue
            try:
                s, sec, info = run_method(setting, method, options, g)
            except Exception as exc:  # noqa: BLE001
                res[gname] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                continue
            t = setting.truth[gname]
            res[gname] = {
                "pearson": pearson(s, t),
                "spearman": spearman(s, t),
                "ratio": ratio(s, t),
                "time": sec,
                "info": info,
            }
    return res


TUNED["mlp-nowd"] = TUNED["mlp"]
