"""The three settings of the fidelity suite and their ground truth (cached on disk).

* ``lr``  — digits, multinomial logistic regression (650 parameters), wd = 1e-3, fitted by Newton
  to ‖∇‖ < 1e-11 (float64). Truth: exact leave-one-out of ``loo`` training points, exact
  leave-group-out of 50 random and 50 class-coherent groups, LDS over ``lds`` half-size subsets.
* ``mlp`` — digits, MLP 64-32-10 (2,410 parameters), SGD + momentum, wd = 1e-3, float32.
  Truth: paired-seed leave-group-out (``seeds`` seeds) of the same groups; LDS over half-size
  subsets (``lds_seeds`` paired seeds).
* ``mlp-nowd`` — the same MLP trained without weight decay (damping is then the only
  regulariser of the inverse; behind ``--settings``).
* ``cnn`` — digits 8×8, Conv(1→8, 3×3) → ReLU → Conv(8→8, 3×3) → ReLU → Linear(128→10) (1,986
  parameters), the MLP protocol (behind ``--cnn``).

Class-coherent groups: within each class, points sorted along the class's first principal
component and cut into 5 consecutive chunks (equal size, each a contiguous region of the class).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from truth import LogReg, paired_seed_truth, removal_truth, stacked_train, subset_values

from ggda.data.dataset import Dataset
from ggda.groups import Grouping, random_grouping
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask

CACHE = Path(__file__).resolve().parents[2] / "runs" / "fidelity-cache"
WD = 1e-3


@dataclass
class Setting:
    name: str
    task: AttributionTask
    train: Dataset
    prop: ExampleLoss
    groupings: dict[str, Grouping]
    truth: dict[str, np.ndarray]  # "random" / "coherent": (T, K); "loo": (T, len(loo_idx))
    loo_idx: np.ndarray | None = None
    lds_subsets: list[np.ndarray] | None = None
    lds_values: np.ndarray | None = None  # (T, M) target losses after retraining on each subset
    weight_decay: float = WD
    meta: dict = field(default_factory=dict)
    checkpoints: list | None = None  # (state_dict, lr) pairs for TracIn


def coherent_grouping(train: Dataset, per_class: int = 5) -> Grouping:
    labels = np.empty(len(train), dtype=np.int64)
    X = np.asarray(train.X, dtype=np.float64)
    g = 0
    for c in np.unique(train.y):
        idx = np.flatnonzero(train.y == c)
        Xc = X[idx] - X[idx].mean(0)
        v = np.linalg.svd(Xc, full_matrices=False)[2][0]
        order = idx[np.argsort(Xc @ v, kind="stable")]
        for chunk in np.array_split(order, per_class):
            labels[chunk] = g
            g += 1
    return Grouping(labels, method="coherent")


def _key(**kw) -> str:
    return hashlib.sha1(json.dumps(kw, sort_keys=True).encode()).hexdigest()[:12]


def _cached(name: str, key: str, compute):
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}-{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=True) as z:
            return {k: z[k] for k in z.files}
    out = compute()
    np.savez(path, **out)
    return out


def digits(n_targets: int):
    from ggda.data.spec import DataSpec, prepare_data

    train, test, _ = prepare_data(DataSpec("digits"))
    rng = np.random.default_rng(0)
    targets = np.sort(rng.choice(len(test), n_targets, replace=False))
    return train, test.subset(targets)


def groupings_for(train: Dataset, k: int = 50) -> dict[str, Grouping]:
    return {"random": random_grouping(len(train), k, seed=0), "coherent": coherent_grouping(train, k // 10)}


def lds_subsets(n: int, m: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n, n // 2, replace=False)) for _ in range(m)]


# -- convex ---------------------------------------------------------------------------------
def lr_setting(n_targets: int = 30, n_loo: int = 60, n_lds: int = 50) -> Setting:
    train, test = digits(n_targets)
    X = np.asarray(train.X, dtype=np.float64)
    lr = LogReg(X, train.y, 10, WD)
    W, iters, gnorm = lr.fit()
    groupings = groupings_for(train)
    loo_idx = np.sort(np.random.default_rng(0).choice(len(train), n_loo, replace=False))
    subsets = lds_subsets(len(train), n_lds)

    def compute():
        out, meta = {}, {}
        out["loo"], meta["loo"] = removal_truth(lr, W, [np.array([i]) for i in loo_idx], test.X, test.y)
        for gname, g in groupings.items():
            out[gname], meta[gname] = removal_truth(lr, W, g.member_lists(), test.X, test.y)
        out["lds"] = subset_values(lr, W, subsets, test.X, test.y)
        out["meta"] = np.array(json.dumps(meta))
        return out

    key = _key(kind="lr", wd=WD, T=n_targets, loo=n_loo, lds=n_lds, v=1)
    truth = _cached("lr", key, compute)
    model = lr.module(W)
    task = AttributionTask(model)
    meta = json.loads(str(truth["meta"]))
    meta.update(fit_iterations=iters, fit_grad_norm=gnorm, n=len(train), p=task.n_params)
    return Setting(
        "lr",
        task,
        train,
        ExampleLoss(test.X, test.y),
        groupings,
        {k: truth[k] for k in ("loo", "random", "coherent")},
        loo_idx=loo_idx,
        lds_subsets=subsets,
        lds_values=truth["lds"],
        meta=meta,
    )


# -- non-convex -----------------------------------------------------------------------------
def make_mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def make_cnn():
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10),
    )


TRAIN = {"epochs": 40, "lr": 0.05, "batch_size": 64, "wd": WD}
N_CHECKPOINTS = 5


DEEP = {"mlp": (make_mlp, WD), "mlp-nowd": (make_mlp, 0.0), "cnn": (make_cnn, WD)}


def deep_setting(
    kind: str, n_targets: int = 30, seeds: int = 10, lds_seeds: int = 3, n_lds: int = 50, dtype=torch.float32
) -> Setting:
    """``mlp``, ``mlp-nowd`` (trained without weight decay) or ``cnn`` (module docstring)."""
    make, wd = DEEP[kind]
    train_cfg = {**TRAIN, "wd": wd}
    train, test = digits(n_targets)
    groupings = groupings_for(train)
    groups = groupings["random"].member_lists() + groupings["coherent"].member_lists()
    K = groupings["random"].n_groups
    subsets = lds_subsets(len(train), n_lds)
    X, y = np.asarray(train.X, np.float32), train.y

    def compute():
        diffs, fulls, base = paired_seed_truth(make, X, y, test.X, test.y, groups, seeds, **train_cfg)
        out = {"diffs": diffs, "base": base}
        out.update({f"full_{k}": np.stack([f[k].numpy() for f in fulls]) for k in fulls[0]})
        # LDS: every subset trained with paired seeds, values averaged over seeds
        vals = []
        for s in range(lds_seeds):
            models = stacked_train(make, X, y, list(subsets), seed=100 + s, **train_cfg)
            from truth import target_losses_of

            vals.append(np.stack([target_losses_of(make, p, test.X, test.y) for p in models], 1))
        out["lds"] = np.mean(vals, 0)
        # TracIn checkpoints of seed 0's full model: retrain it alone, saving every few epochs
        ckpts = stacked_train(make, X, y, [None], seed=0, checkpoints=N_CHECKPOINTS, **train_cfg)
        for c, state in enumerate(ckpts):
            for k, v in state.items():
                out[f"ckpt{c}_{k}"] = v.numpy()
        return out

    key = _key(kind=kind, T=n_targets, seeds=seeds, lds_seeds=lds_seeds, lds=n_lds, train=train_cfg, v=1)
    truth = _cached(kind, key, compute)
    diffs = truth["diffs"]  # (S, T, 2K)
    model = make()
    state = {k[len("full_") :]: torch.as_tensor(v[0]) for k, v in truth.items() if k.startswith("full_")}
    model.load_state_dict(state)
    model = model.to(dtype)
    task = AttributionTask(model)
    half = seeds // 2
    mean = diffs.mean(0)
    rep = [
        _mean_pearson(diffs[:half].mean(0)[:, sl], diffs[half:].mean(0)[:, sl])
        for sl in (slice(0, K), slice(K, 2 * K))
    ]
    checkpoints = []
    c = 0
    while any(k.startswith(f"ckpt{c}_") for k in truth):
        st = {
            k[len(f"ckpt{c}_") :]: torch.as_tensor(v).to(dtype)
            for k, v in truth.items()
            if k.startswith(f"ckpt{c}_")
        }
        checkpoints.append((st, TRAIN["lr"]))
        c += 1
    meta = {
        "n": len(train),
        "p": task.n_params,
        "seeds": seeds,
        "split_half_pearson_random": rep[0],
        "split_half_pearson_coherent": rep[1],
        "seed0_vs_mean_pearson_random": _mean_pearson(diffs[0][:, :K], mean[:, :K]),
        "seed0_vs_mean_pearson_coherent": _mean_pearson(diffs[0][:, K:], mean[:, K:]),
        "test_loss": float(truth["base"].mean()),
    }
    return Setting(
        kind,
        task,
        train,
        ExampleLoss(test.X, test.y),
        groupings,
        {"random": mean[:, :K], "coherent": mean[:, K:]},
        lds_subsets=subsets,
        lds_values=truth["lds"],
        weight_decay=wd,
        meta=meta,
        checkpoints=checkpoints,
    )


def _mean_pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True)]))
