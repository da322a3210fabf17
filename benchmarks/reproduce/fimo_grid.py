"""Final-model-only grid (issue #21, FiMODA, NOTES B): every method vs the further-training gold
standard per further-training epoch, for SGD and Adam further training, eq. 17 (raw) and eq. 13
(centred), on tabular (Adult, MLP in-128-128-2), image (Fashion-MNIST, the zoo ``cnn``) and text
(clothing reviews, the packaged MiniLM) data.

    python benchmarks/reproduce/fimo_grid.py --data adult --profile quick
    python benchmarks/reproduce/fimo_grid.py --data all --profile full --backend ray

Per data set D the steps are, each resumable (rerun the same command to continue):

1. the final model θ^f: ``ggda train`` (or ``ggda text-train``) into ``OUT/D-PROFILE/run``;
2. the gold standard for each further-training optimiser: ``ggda gold`` into
   ``OUT/D-PROFILE/gold-OPT-LR`` (paired seeds, ``mask`` removal, float64; both eq. 17 and eq. 13
   are stored by every gold run);
3. every registered method scored once on θ^f with ggda's defaults (``run.method``: the run's
   weight decay and checkpoints offered, nothing tuned) and compared with each gold standard in
   both variants (``compare_methods(..., scores=...)``: the scores depend on θ^f only, as in
   FiMODA's notebooks, which load one ``grad_dot.pt`` for their SGD and Adam figures);
   ``OUT/D-PROFILE/compare-OPT-LR-VARIANT/`` holds ``compare.csv/json/png``;
4. ``benchmarks/results/reproduce/fimo_D.json`` + ``.md``: cosine mean ± SEM per epoch, method,
   optimiser and variant, with the settings, wall times and the machine's load.

Learning rates (NOTES B5): FiMODA further-trains tabular classifiers with SGD lr 1e-4 and Adam
lr 1e-6 (100:1) after final training at SGD lr 1e-2; here the final model is trained at lr 1e-2
(momentum 0.9) and further-trained with SGD lr 2e-3 (ggda's Adult setting, docs/gold.md) and
Adam at the paper's 100:1 ratio, lr 2e-5. The ``full`` profile adds Adam lr 1e-4 (the issue's
first look) as a sensitivity check.

Text runs further-train (and are scored) through their tail on cached prefix states
(:mod:`ggda.gold.prefix`, exact): the frozen MiniLM layers never change.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "reproduce"
VARIANTS = ("raw", "centred")  # eq. 17, eq. 13


@dataclass
class Setting:
    """One data set's workload under one profile."""

    train: list[str]  # arguments of `ggda train` / `ggda text-train` (without --out)
    units: int
    targets: int
    seeds: int
    epochs: int
    optimizers: list[tuple[str, float]]
    batch_size: int = 128
    methods: list[str] = field(default_factory=list)  # empty: every registered method
    notes: str = ""


ADULT_TRAIN = ["train", "--data", "adult", "--model", "mlp-m", "--epochs", "30", "--lr", "0.01"]
ADULT_TRAIN += ["--momentum", "0.9", "--batch-size", "128"]
FASHION_TRAIN = ["train", "--data", "fashion-mnist", "--model", "cnn", "--lr", "0.01", "--momentum", "0.9"]
FASHION_TRAIN += ["--batch-size", "128"]
TEXT_TRAIN = ["text-train", "--balanced", "--max-len", "64"]

SGD, ADAM, ADAM_HI = ("sgd", 2e-3), ("adam", 2e-5), ("adam", 1e-4)

PROFILES: dict[str, dict[str, Setting]] = {
    "quick": {
        "adult": Setting(
            ADULT_TRAIN + ["--max-train", "4000"],
            units=50,
            targets=50,
            seeds=20,
            epochs=10,
            optimizers=[SGD, ADAM],
            notes="4,000 training points (of 32,561); 50 left-out points, 50 targets, 20 seeds",
        ),
        "fashion": Setting(
            FASHION_TRAIN + ["--max-train", "1000", "--epochs", "10"],
            units=15,
            targets=20,
            seeds=2,
            epochs=2,
            optimizers=[SGD, ADAM],
            notes="1,000 training images (of 60,000), cnn; 15 left-out points, 20 targets, 2 seeds",
        ),
        "text": Setting(
            TEXT_TRAIN + ["--mode", "frozen", "--n", "600", "--head", "mlp"],
            units=30,
            targets=30,
            seeds=5,
            epochs=5,
            optimizers=[SGD, ADAM],
            notes="600 balanced reviews (480 train), frozen MiniLM + MLP head; 30 points, 30 targets, 5 seeds",
        ),
    },
    "full": {
        "adult": Setting(
            ADULT_TRAIN,
            units=100,
            targets=100,
            seeds=20,
            epochs=25,
            optimizers=[SGD, ADAM, ADAM_HI],
            notes="all 32,561 training points, 100 points, 100 targets, 20 seeds (FiMODA: 100), 25 epochs",
        ),
        "fashion": Setting(
            FASHION_TRAIN + ["--max-train", "5000", "--epochs", "20"],
            units=30,
            targets=30,
            seeds=5,
            epochs=5,
            optimizers=[SGD, ADAM, ADAM_HI],
            notes="5,000 training images, cnn; 30 points, 30 targets, 5 seeds, 5 epochs",
        ),
        "text": Setting(
            TEXT_TRAIN + ["--mode", "finetune", "--n", "1000"],
            units=30,
            targets=30,
            seeds=5,
            epochs=2,
            optimizers=[SGD, ADAM],
            notes="1,000 balanced reviews, MiniLM with the last layer fine-tuned; 30 points, 30 targets, 5 seeds",
        ),
    },
}


def ggda(args: list[str], log) -> float:
    """Run one ggda command (the CLI next to this interpreter); returns its wall time."""
    exe = Path(sys.executable).with_name("ggda")
    cmd = [str(exe), *args]
    log(f"$ ggda {' '.join(args)}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def gold_dir(base: Path, opt: str, lr: float) -> Path:
    return base / f"gold-{opt}-{lr:g}"


def run_data(name: str, setting: Setting, base: Path, args, log) -> dict:
    import numpy as np

    base.mkdir(parents=True, exist_ok=True)
    record: dict = {
        "data": name,
        "profile": args.profile,
        "settings": {k: v for k, v in setting.__dict__.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_before": loadavg()},
        "wall_seconds": {},
    }
    run = base / "run"
    if not (run / "run.json").exists():
        record["wall_seconds"]["train"] = ggda([*setting.train, "--out", str(run)], log)
    executor = ["--backend", args.backend] if args.backend else []
    executor += ["--workers", str(args.workers)] if args.workers else []
    for opt, lr in setting.optimizers:
        out = gold_dir(base, opt, lr)
        cmd = ["gold", "--run", str(run), "--units", "points", "--n-units", str(setting.units)]
        cmd += ["--targets", str(setting.targets), "--epochs", str(setting.epochs)]
        cmd += ["--seeds", str(setting.seeds), "--optimizer", opt, "--lr", f"{lr:g}"]
        cmd += ["--batch-size", str(setting.batch_size), "--removal", "mask", "--out", str(out)]
        record["wall_seconds"][f"gold-{opt}-{lr:g}"] = ggda(cmd + executor, log)

    import torch

    torch.set_num_threads(1)
    from ggda.data.grouping import Grouping
    from ggda.gold import GoldResult
    from ggda.gold.compare import compare_methods, mean_sem, method_scores
    from ggda.gold.prefix import frozen_prefix_view
    from ggda.methods import METHODS
    from ggda.properties import make_property
    from ggda.runs import Run

    r = Run.load(run)
    record["model"] = {"test_accuracy": r.config.get("metrics", {}).get("test_accuracy")}
    golds = {(opt, lr): GoldResult.load(gold_dir(base, opt, lr)) for opt, lr in setting.optimizers}
    first = next(iter(golds.values()))
    unit_ids = first.unit_ids
    for g in golds.values():  # every gold standard shares θ^f, units and targets
        assert np.array_equal(g.unit_ids, unit_ids) and g.gold.shape[1] == first.gold.shape[1]
    grouping = Grouping.singleton(len(r.train))
    n_targets = first.gold.shape[1]
    # a text run is scored through its tail on cached prefix states, as `ggda gold` trains it
    task, (train, test) = frozen_prefix_view(r.task(), r.train, r.test.subset(np.arange(n_targets)))
    prop = make_property("test-loss", test.X, test.y)
    names = [m for m in args.methods.split(",") if m] or setting.methods or sorted(METHODS)
    cache_file = base / "scores.npz"
    cached = dict(np.load(cache_file)) if cache_file.exists() else {}
    seconds = json.loads((base / "scores.json").read_text()) if (base / "scores.json").exists() else {}
    failed: dict[str, str] = {}
    for m in names:
        if m in cached:
            continue
        log(f"scoring {m}")
        t0 = time.perf_counter()
        try:
            cached[m] = method_scores(m, task, train, grouping, prop, unit_ids, None, run=r)
        except Exception as exc:  # recorded, the grid goes on
            failed[m] = f"{type(exc).__name__}: {exc}"
            log(f"  {m} failed: {failed[m]}")
            continue
        seconds[m] = time.perf_counter() - t0
        np.savez(cache_file, **cached)
        (base / "scores.json").write_text(json.dumps(seconds, indent=1))
    record["method_seconds"] = seconds
    record["failed"] = failed
    results: dict = {}
    for (opt, lr), g in golds.items():
        for variant in VARIANTS:
            key = f"{opt}-{lr:g}-{variant}"
            ok = [m for m in names if m in cached]
            comp = compare_methods(
                g, task, r.train, grouping, prop, ok, variant=variant, scores=cached, run=r
            )
            comp.meta["title"] = (
                f"{name}: {len(unit_ids)} points, {g.loo.shape[0]} seeds, {opt} lr={lr:g}, "
                f"{'eq. 17 (raw)' if variant == 'raw' else 'eq. 13 (centred)'}"
            )
            comp.save(base / f"compare-{key}")
            results[key] = {
                "optimizer": opt,
                "lr": lr,
                "variant": variant,
                "epochs": comp.epochs.tolist(),
                "gold_seconds_per_run": g.meta.get("seconds_per_run"),
                "mean_abs_gold": np.abs(g.gold_raw if variant == "raw" else g.gold_centred)
                .mean(axis=(1, 2))
                .tolist(),
                "cosine": {
                    m: {"mean": mean_sem(v)[0].tolist(), "sem": mean_sem(v)[1].tolist()}
                    for m, v in comp.cos.items()
                },
                "spearman": {
                    m: {"mean": mean_sem(v)[0].tolist(), "sem": mean_sem(v)[1].tolist()}
                    for m, v in comp.spearman.items()
                },
            }
    record["results"] = results
    record["machine"]["load_after"] = loadavg()
    return record


def grid_figure(rec: dict, path: Path) -> Path:
    """Cosine to gold vs further-training epochs, one panel per optimiser × variant (±SEM bands),
    one colour per method across panels: the per-run ``compare.png`` plots side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(rec["results"])
    cols = 2
    rows = (len(keys) + 1) // 2
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.8 * rows), sharey=True, squeeze=False)
    methods = sorted(rec["results"][keys[0]]["cosine"])
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    for ax, key in zip(axes.ravel(), keys, strict=False):
        res = rec["results"][key]
        x = np.asarray(res["epochs"])
        for m in methods:
            c = res["cosine"][m]
            mean, sem = np.asarray(c["mean"]), np.asarray(c["sem"])
            ax.plot(x, mean, marker="o", ms=3, color=colors[m], label=m)
            ax.fill_between(x, mean - sem, mean + sem, color=colors[m], alpha=0.15)
        eq = "eq. 17 (raw)" if res["variant"] == "raw" else "eq. 13 (centred)"
        ax.set_title(f"{res['optimizer']} lr {res['lr']:g}, {eq}", fontsize=10)
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.grid(alpha=0.3)
        ax.set_xlabel("further-training epochs")
    for ax in axes[:, 0]:
        ax.set_ylabel("cosine to gold (mean ± SEM)")
    for ax in axes.ravel()[len(keys) :]:
        ax.axis("off")
    axes[0, -1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle(f"{rec['data']} ({rec['profile']}): methods vs further-training gold standard")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compact_table(rec: dict) -> list[str]:
    """One row per method: cosine at the first → last recorded epoch (mean ± SEM) for every
    optimiser × variant, side by side (the doc section's table)."""
    keys = list(rec["results"])
    head = [
        f"{rec['results'][k]['optimizer']} {rec['results'][k]['lr']:g}, "
        f"{'eq. 17' if rec['results'][k]['variant'] == 'raw' else 'eq. 13'}"
        for k in keys
    ]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(keys)]
    methods = sorted(
        rec["results"][keys[0]]["cosine"], key=lambda m: -rec["results"][keys[0]]["cosine"][m]["mean"][0]
    )
    for m in methods:
        cells = []
        for k in keys:
            c = rec["results"][k]["cosine"][m]
            cells.append(f"{c['mean'][0]:.3f}±{c['sem'][0]:.3f} → {c['mean'][-1]:.3f}±{c['sem'][-1]:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def markdown(rec: dict) -> str:
    """The per-data-set tables: cosine mean ± SEM per epoch, one table per optimiser × variant."""
    s = rec["settings"]
    lines = [
        f"# Final-model-only grid: {rec['data']} ({rec['profile']} profile)",
        "",
        f"{s['notes']}. Gold: `mask` removal, float64, paired seeds, batch {s['batch_size']}. "
        f"Final model test accuracy {rec['model'].get('test_accuracy')}. Methods with ggda's defaults.",
        f"Wall times (s, 2 shared cores, load {rec['machine']['load_before']} → "
        f"{rec['machine'].get('load_after')}): "
        + ", ".join(f"{k} {v:.0f}" for k, v in rec["wall_seconds"].items())
        + "; method scoring: "
        + ", ".join(f"{k} {v:.1f}" for k, v in rec["method_seconds"].items()),
        "",
    ]
    if rec.get("note"):
        lines += [f"Note: {rec['note']}", ""]
    if rec["failed"]:
        lines += ["Failed methods: " + "; ".join(f"{k}: {v}" for k, v in rec["failed"].items()), ""]
    epochs = next(iter(rec["results"].values()))["epochs"]
    lines += [
        f"## Summary: cosine to gold, epoch {epochs[0]:g} → {epochs[-1]:g} (mean ± SEM over targets)",
        "",
    ]
    lines += compact_table(rec) + [""]
    for res in rec["results"].values():
        eq = "eq. 17, raw" if res["variant"] == "raw" else "eq. 13, centred"
        epochs = res["epochs"]
        picks = sorted({0, len(epochs) // 4, len(epochs) // 2, len(epochs) - 1})
        lines += [
            f"## {res['optimizer']} lr {res['lr']:g}, {eq}",
            "",
            "| method | " + " | ".join(f"epoch {epochs[e]:g}" for e in picks) + " | Spearman, first |",
            "|---|" + "---|" * (len(picks) + 1),
        ]
        order = sorted(res["cosine"], key=lambda m: -res["cosine"][m]["mean"][0])
        for m in order:
            c, sp = res["cosine"][m], res["spearman"][m]
            cells = " | ".join(f"{c['mean'][e]:.3f}±{c['sem'][e]:.3f}" for e in picks)
            lines.append(f"| {m} | {cells} | {sp['mean'][0]:.3f}±{sp['sem'][0]:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="all", help="adult, fashion, text or all (comma-separated)")
    ap.add_argument("--profile", choices=tuple(PROFILES), default="quick")
    ap.add_argument("--out", default="runs/reproduce/fimo", help="run folder (resumable)")
    ap.add_argument("--results", default=str(RESULTS), help="where fimo_<data>.json/.md go")
    ap.add_argument("--backend", default=None, help="executor of the gold runs: serial, local or ray")
    ap.add_argument("--workers", type=int, default=None, help="worker processes of the gold runs")
    ap.add_argument(
        "--methods", default="", help="comma-separated subset of methods (default: every registered one)"
    )
    ap.add_argument(
        "--render",
        action="store_true",
        help="only rewrite the .md/.png of finished data sets from their .json",
    )
    args = ap.parse_args(argv)
    wanted = list(PROFILES[args.profile]) if args.data == "all" else args.data.split(",")
    unknown = [d for d in wanted if d not in PROFILES[args.profile]]
    if unknown:
        ap.error(f"unknown data set(s) {', '.join(unknown)}; choose adult, fashion, text or all")

    def log(msg: str) -> None:
        print(f"[fimo {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        stem = results / (f"fimo_{name}" if args.profile == "quick" else f"fimo_{name}_full")
        if args.render:
            rec = json.loads(stem.with_suffix(".json").read_text())
            stem.with_suffix(".md").write_text(markdown(rec))
            grid_figure(rec, stem.with_suffix(".png"))
            continue
        t0 = time.perf_counter()
        rec = run_data(
            name, PROFILES[args.profile][name], Path(args.out) / f"{name}-{args.profile}", args, log
        )
        rec["wall_seconds"]["total_this_invocation"] = time.perf_counter() - t0
        rec["command"] = f"python benchmarks/reproduce/fimo_grid.py --data {name} --profile {args.profile}"
        stem.with_suffix(".json").write_text(json.dumps(rec, indent=1, default=float))
        stem.with_suffix(".md").write_text(markdown(rec))
        grid_figure(rec, stem.with_suffix(".png"))
        log(f"{name}: wrote {stem}.json/.md ({rec['wall_seconds']['total_this_invocation']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
