"""The text application (issue #9): train the MiniLM review classifier and run the
quality-bar experiment on it. ``ggda text-train`` and ``ggda text-bench`` only parse and call.

``train_text_model`` tokenises the clothing reviews, trains the MiniLM classifier (mode
``frozen``: linear probe on cached embeddings; mode ``finetune``: probe, then fine-tune the last
encoder layer(s) + head) and reports held-out accuracy against the majority class.

``run_text_benchmark`` is the quality-bar experiment: on the fine-tune mode it times per-point vs
group attribution (Grad-K-Means or random groups, K = n/100) and measures fidelity (rank agreement
with per-point scores, and the retraining score: remove the most helpful training points as ranked
by each attribution, retrain with the same recipe and seed, report the test-accuracy/loss change).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ggda.errors import GGDAError
from ggda.io import save_json


def load_text_setup(
    target, n, balanced, max_len, test_fraction, seed, model_path, train_layers, head, device
):
    from ggda.data.text import clothing_reviews, split_corpus, token_dataset
    from ggda.models.text import TextClassifier, load_encoder, load_tokenizer

    corpus = clothing_reviews(target=target, n=n, balanced=balanced, seed=seed)
    train_c, test_c = split_corpus(corpus, test_fraction, seed)
    tok = load_tokenizer(model_path)
    train = token_dataset(train_c, tok, max_len)
    test = token_dataset(test_c, tok, max_len)
    clf = TextClassifier(load_encoder(model_path), corpus.n_classes, train_layers, head=head, seed=seed).to(
        device
    )
    return corpus, train, test, clf


def train_text_model(
    out: Path,
    target: str = "sentiment",
    n: int | None = None,
    balanced: bool = False,
    mode: str = "finetune",
    train_layers: int = 1,
    head: str = "linear",
    max_len: int = 128,
    lp_epochs: int = 30,
    ft_epochs: int = 3,
    ft_lr: float = 1e-4,
    test_fraction: float = 0.2,
    seed: int = 0,
    model_path: Path | None = None,
    device: str = "cpu",
    log=print,
) -> dict:
    """Train the MiniLM review classifier (``ggda text-train``) and save it as a run directory
    (:meth:`ggda.runs.Run.record`: ``run.json``, ``split.npz``, ``model.pt``) that ``ggda
    attribute``, ``group``, ``gold`` and ``evaluate`` read like any other; returns the metrics
    (held-out accuracy and loss, majority class; also in ``run.json``)."""
    from dataclasses import replace

    from ggda.models.text import (
        TextTrainConfig,
        evaluate,
        prefix_dataset,
        text_model_spec,
        train_text_classifier,
    )
    from ggda.models.training import resolve_device
    from ggda.models.zoo import build_model
    from ggda.runs import DataSpec, Run, prepare_data

    if mode not in ("frozen", "finetune"):
        raise GGDAError(f"Unknown mode '{mode}'; choose frozen or finetune.")
    out = Path(out)
    dev = resolve_device(device)
    layers = train_layers if mode == "finetune" else 0
    options = {"n": n, "balanced": balanced, "seed": seed, "max_len": max_len}
    if model_path is not None:
        options["model_path"] = str(model_path)
    data = DataSpec(
        source="reviews",
        label=target,
        test_fraction=test_fraction,
        split_seed=seed,
        standardize=False,  # token ids
        options=options,
    )
    train, test, _ = prepare_data(data)  # the split Run.load rebuilds
    spec = text_model_spec(train.n_classes, max_len, layers, head, model_path=model_path)
    clf = build_model(spec, seed=seed).to(dev)
    log(f"data  {train.name}: train {len(train)}, test {len(test)}, classes {np.bincount(train.y).tolist()}")
    cfg = TextTrainConfig(
        lp_epochs=lp_epochs, ft_epochs=ft_epochs if mode == "finetune" else 0, ft_lr=ft_lr, seed=seed
    )
    t0 = time.perf_counter()
    prefix = prefix_dataset(clf, train, device=dev) if layers > 0 else None
    probe = replace(cfg, ft_epochs=0)
    train_text_classifier(clf, train, probe, device=dev, prefix=prefix)
    metrics: dict = {"mode": mode}
    if layers > 0 and cfg.ft_epochs > 0:  # report the linear probe (mode a) too, then fine-tune from it
        probed = evaluate(clf, test, dev)
        metrics.update(probe_accuracy=probed["accuracy"], probe_loss=probed["loss"])
        train_text_classifier(clf, train, replace(cfg, lp_epochs=0), device=dev, prefix=prefix)
    metrics.update(train_seconds=time.perf_counter() - t0, **evaluate(clf, test, dev))
    metrics["test_accuracy"] = metrics["accuracy"]  # the name `ggda train` runs record it under
    # the last stage that trained the model, as the run's training recipe (further training in
    # `ggda gold` continues with it); the whole two-stage recipe is kept under "text"
    if layers > 0 and cfg.ft_epochs > 0:
        last = cfg.fine_tune_config(checkpoint_every=0)
    else:
        last = cfg.probe_config(epochs=max(1, cfg.lp_epochs))
    Run.record(
        out,
        data,
        clf,
        last.to_dict(),
        train,
        test,
        metrics,
        text={**cfg.to_dict(), "mode": mode, "train_layers": layers, "head": head},
    )
    return metrics


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json(path, obj)


# -- the benchmark -------------------------------------------------------------------------------
def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def removal_mask(point_scores: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Weights with the ``budget`` highest-scoring points removed (random tie-breaking)."""
    order = np.lexsort((rng.random(len(point_scores)), -point_scores))
    w = np.ones(len(point_scores), dtype=np.float32)
    w[order[:budget]] = 0.0
    return w


def run_text_benchmark(
    n: int | None = None,
    max_len: int = 128,
    train_layers: int = 1,
    methods: tuple[str, ...] = ("grad-dot",),
    fractions: tuple[float, ...] = (0.05, 0.1, 0.2),
    group_sizes: tuple[int, ...] = (100,),
    seeds: tuple[int, ...] = (0,),
    ft_epochs: int = 3,
    ft_lr: float = 1e-4,
    device: str = "auto",
    model_path: Path | None = None,
    memory_mb: float = 4096.0,
    max_batch: int = 512,
    log=print,
    save=None,
    checkpoint_dir: str | Path | None = None,
) -> dict:
    """The issue-#9 quality-bar experiment; returns a JSON-able dict of every measured figure.

    ``save(result)`` (optional) is called after each stage, so a cut-off run keeps what it measured.
    The fine-tuning checkpoints (TracIn) go to ``checkpoint_dir``, by default a temporary
    directory removed at the end.
    """
    if checkpoint_dir is None:
        with tempfile.TemporaryDirectory(prefix="ggda-text-ckpt-") as tmp:
            return run_text_benchmark(
                n, max_len, train_layers, methods, fractions, group_sizes, seeds, ft_epochs, ft_lr,
                device, model_path, memory_mb, max_batch, log, save, checkpoint_dir=tmp,
            )  # fmt: skip
    import torch

    from ggda.data.grouping import Grouping
    from ggda.methods import METHODS, make_method
    from ggda.models.text import (
        TextTrainConfig,
        evaluate,
        prefix_dataset,
        tail_embeddings,
        train_text_classifier,
    )
    from ggda.models.training import resolve_device
    from ggda.properties import MeanLoss
    from ggda.runs import offered_options
    from ggda.task import TextClassificationTask

    dev = resolve_device(device)
    result: dict = {"device": str(dev), "torch": torch.__version__}
    if dev.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(dev)
    corpus, train, test, clf = load_text_setup(
        "sentiment", n, True, max_len, 0.2, 0, model_path, train_layers, "linear", dev
    )
    result["data"] = {
        "corpus": corpus.name,
        "n_train": len(train),
        "n_test": len(test),
        "max_len": max_len,
        "truncated_fraction": train.meta["truncated"],
        "balanced": True,
    }
    log(f"data: train {len(train)}, test {len(test)}, L={max_len}")
    tail = clf.tail()
    init_state = {k: v.detach().clone() for k, v in tail.state_dict().items()}
    P, t_prefix = timed(lambda: prefix_dataset(clf, train, device=dev))
    P_test = prefix_dataset(clf, test, device=dev)
    E = tail_embeddings(clf, P, device=dev)  # frozen-encoder embeddings, from the cached prefix
    result["prep_seconds"] = {"prefix": t_prefix}

    def retrain(weights=None, seed=0):
        tail.load_state_dict(init_state)
        cfg = TextTrainConfig(lp_epochs=30, ft_epochs=ft_epochs, ft_lr=ft_lr, seed=seed)
        res = train_text_classifier(clf, train, cfg, dev, sample_weight=weights, embeddings=E, prefix=P)
        return res

    # Mode (a) alone (linear probe on the frozen encoder), then mode (b).
    tail.load_state_dict(init_state)
    train_text_classifier(clf, train, TextTrainConfig(lp_epochs=30, ft_epochs=0), dev, embeddings=E, prefix=P)
    result["frozen_probe"] = evaluate(tail, P_test, dev)
    ckdir = Path(checkpoint_dir)
    tail.load_state_dict(init_state)
    cfg = TextTrainConfig(lp_epochs=30, ft_epochs=ft_epochs, ft_lr=ft_lr, seed=0)
    ft, t_train = timed(
        lambda: train_text_classifier(clf, train, cfg, dev, embeddings=E, prefix=P, checkpoint_dir=ckdir)
    )
    base = evaluate(tail, P_test, dev)
    full = evaluate(clf, test, dev)  # the same model on raw tokens (sanity: equals the tail on prefix)
    result["finetuned"] = {**base, "train_seconds": t_train, "token_path_accuracy": full["accuracy"]}
    log(
        f"frozen probe acc {result['frozen_probe']['accuracy']:.4f}; fine-tuned acc {base['accuracy']:.4f} "
        f"(tokens path {full['accuracy']:.4f}); majority {base['majority']:.3f}"
    )
    final_state = {k: v.detach().clone() for k, v in tail.state_dict().items()}
    save and save(result)

    task = TextClassificationTask(tail, device=dev)
    prop = MeanLoss(P_test.X, P_test.y)
    groupings: dict[str, Grouping] = {"per-point": Grouping.singleton(len(train))}
    try:
        from ggda.groups import make_grouping
    except ImportError:
        make_grouping = None
        log("ggda.groups.make_grouping not available; using random groups only")
    for size in group_sizes:
        K = max(1, len(train) // size)
        if make_grouping is not None:
            g, t = timed(lambda K=K: make_grouping("grad-kmeans", P, n_groups=K, task=task, seed=0))
            g.seconds = t
            groupings[f"grad-kmeans-K{K}"] = g
        rand = Grouping(np.random.default_rng(0).permutation(len(train)) % K, method="random")
        groupings[f"random-K{K}"] = rand
    result["attribution"] = {}
    # Warm-up (kernel selection, allocator) so the first timed method is not charged for it.
    make_method("grad-dot", task, max_batch=max_batch).cache(P.subset(np.arange(min(64, len(P))))).attribute(
        prop
    )
    point_scores: dict[str, np.ndarray] = {}
    for method in methods:
        if method not in METHODS:
            log(f"method {method} is not registered here; skipped")
            continue
        # what the fine-tuned model provides (checkpoints, weight decay), as for a run directory
        provided = {"checkpoints": ft.checkpoints or None, "weight_decay": cfg.weight_decay or None}
        opts = offered_options(method, provided, {"max_batch": max_batch, "memory_mb": memory_mb})
        for gname, grouping in groupings.items():
            tail.load_state_dict(final_state)
            attributor = make_method(method, task, **opts)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            scores = attributor.cache(P, grouping).attribute(prop)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            key = f"{method}/{gname}"
            point_scores[key] = grouping.expand(scores[0])
            result["attribution"][key] = {
                "seconds": seconds,
                "grouping_seconds": grouping.seconds,
                "K": grouping.n_groups,
            }
            log(f"{key}: {seconds:.2f}s (+ grouping {grouping.seconds:.2f}s)")
        ref = point_scores.get(f"{method}/per-point")
        if ref is None:
            continue
        from scipy.stats import pearsonr, spearmanr

        for gname in groupings:
            if gname == "per-point":
                continue
            key = f"{method}/{gname}"
            entry = result["attribution"][key]
            total = entry["seconds"] + entry["grouping_seconds"]
            entry["speedup_vs_per_point"] = result["attribution"][f"{method}/per-point"]["seconds"] / total
            entry["spearman_vs_per_point"] = float(spearmanr(point_scores[key], ref).statistic)
            entry["pearson_vs_per_point"] = float(pearsonr(point_scores[key], ref).statistic)
        save and save(result)

    # Retraining score: remove the top-f most helpful points by each ranking, retrain, evaluate.
    rng = np.random.default_rng(0)
    rankings = dict(point_scores)
    rankings["random-removal"] = rng.random(len(train))
    result["retraining"] = {"baseline": {}, "removed": {}}
    for seed in seeds:
        retrain(None, seed)
        result["retraining"]["baseline"][str(seed)] = evaluate(tail, P_test, dev)
    for frac in fractions:
        budget = int(round(frac * len(train)))
        for name, s in rankings.items():
            rows = []
            for seed in seeds:
                w = removal_mask(s, budget, np.random.default_rng(seed))
                retrain(w, seed)
                ev = evaluate(tail, P_test, dev)
                b = result["retraining"]["baseline"][str(seed)]
                rows.append(
                    {"accuracy_drop": b["accuracy"] - ev["accuracy"], "loss_rise": ev["loss"] - b["loss"]}
                )
            agg = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            agg.update({f"{k}_std": float(np.std([r[k] for r in rows])) for k in rows[0]})
            result["retraining"]["removed"][f"{name}@{frac}"] = agg
            log(
                f"remove top {frac:.0%} by {name}: acc drop {agg['accuracy_drop']:+.4f}, loss rise {agg['loss_rise']:+.4f}"
            )
            save and save(result)
    return result
