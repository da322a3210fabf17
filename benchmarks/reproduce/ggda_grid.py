"""Reproduce GGDA's headline finding (Ley et al.; issue #21): the retraining score of IF, TracIn
and TRAK on Grad-K-Means groups is close to per-point attribution at a fraction of the runtime,
and Grad-K-Means beats Random, K-Means and Repr-K-Means groups.

The grid is methods {tracin, ekfac, if-cg, trak} x groupings {per point, random, kmeans,
repr-kmeans, grad-kmeans} x K {n/1000, n/100, n/10} x removal {1, 5, 10, 20 %}, with the
no-removal and random-removal baselines and the attribution time (grouping included), on

* ``adult`` (tabular stand-in for HELOC) with logreg, mlp-s (ANN-S) and mlp-m (ANN-M);
* ``fashion`` (Fashion-MNIST) with the zoo's residual CNN ``resnet`` (BatchNorm);
* ``text`` (clothing reviews) with the packaged MiniLM: ``full`` fine-tunes the last layer + head,
  ``quick`` trains an MLP head on the frozen encoder.

Tabular and image data go through :func:`ggda.applications.experiment.run_experiment` (it writes
the HTML report, the figures); text goes through the text recipe (``text-train``'s
:func:`~ggda.applications.text.train_text_model`) and then the experiment's own building blocks
(groupings, timed attribution, one batch of retrains) on that run. Everything uses ggda's
defaults for methods and groupings; only sizes, epochs and the grid are set per profile. Results
are stored per job under ``--out`` and resume after a kill; the tables go to
``benchmarks/results/reproduce/ggda_<data>_<model>.{json,md}`` and the doc section to
``benchmarks/results/reproduce/ggda_section.md``.

    python benchmarks/reproduce/ggda_grid.py --data adult --profile quick --workers 1
    python benchmarks/reproduce/ggda_grid.py --data all --profile full --backend ray
    python benchmarks/reproduce/ggda_grid.py --section-only     # re-render the tables and section
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "reproduce"
METHODS = ("tracin", "ekfac", "if-cg", "trak")
GROUPINGS = ("random", "kmeans", "repr-kmeans", "grad-kmeans")
KS = ("n/1000", "n/100", "n/10")
FRACTIONS = (0.01, 0.05, 0.1, 0.2)
MAIN_K = "n/100"  # the bar: K = n/100, 20 % removal
MAIN_FRACTION = 0.2


@dataclass
class Job:
    """One experiment: a data set + model and the part of the grid run on it."""

    data: str  # adult | fashion | text
    model: str
    source: str  # ggda data name
    max_train: int | None
    methods: tuple[str, ...] = METHODS
    groupings: tuple[str, ...] = GROUPINGS
    ks: tuple[str, ...] = KS
    fractions: tuple[float, ...] = FRACTIONS
    seeds: int = 5
    epochs: int = 15  # ExperimentConfig's default
    text: dict = field(default_factory=dict)  # text recipe (n, max_len, ft_epochs, ...)
    tag: str = ""  # suffix for a second job on the same data + model
    store: str = ""  # run in another job's directory, reusing its model, attributions and retrains

    @property
    def name(self) -> str:
        return f"ggda_{self.data}_{self.model}" + (f"_{self.tag}" if self.tag else "")


def plan(profile: str) -> dict[str, list[Job]]:
    """The jobs of a profile per data set. ``full`` is the whole grid at sizes that finish in
    hours on a 2-core CPU; ``quick`` is what fits ~50 core-minutes (the cuts are stated in the
    section: K = n/100 and 20 % removal first, the claim's bar)."""
    if profile == "full":
        # Estimates from single retrains measured here (uncontended: Adult 4,000 points 15 epochs
        # 2-4 s; ResNet 3,000 images 1 epoch ~8 s + 10,000 test images ~5 s): Adult 8,000 x 3
        # models x the whole grid x 5 seeds = 3 x 1,065 retrains ~ 5 h on one core; Fashion-MNIST
        # 5,000 x 3 epochs, K in {n/100, n/10}, 5 and 20 % = 375 retrains ~ 5 h; reviews 1,000 x 64
        # tokens = 50 retrains ~ 3 h (each retrain runs the frozen MiniLM layers too). Halve with
        # --workers 2, or spread with --backend ray.
        return {
            "adult": [Job("adult", m, "adult", 8000) for m in ("logreg", "mlp-s", "mlp-m")],
            "fashion": [
                Job(
                    "fashion",
                    "resnet",
                    "fashion-mnist",
                    5000,
                    ks=("n/100", "n/10"),  # n/1000 = 5 groups of 1,000: degenerate at this size
                    fractions=(0.05, 0.2),
                    epochs=3,
                )
            ],
            "text": [
                Job(
                    "text",
                    "minilm",
                    "reviews",
                    None,
                    methods=("tracin", "trak"),
                    groupings=("random", "repr-kmeans", "grad-kmeans"),  # kmeans on token ids is refused
                    ks=(MAIN_K,),
                    fractions=(MAIN_FRACTION,),
                    text={"n": 1000, "balanced": True, "max_len": 64},
                )
            ],
        }
    # quick: the claim's bar (K = n/100, 20 % removal, 3 seeds) at the sizes a shared 2-core CPU
    # (load 5-9 from other sessions) allows in ~50 core-minutes; see the section for the cuts
    bar = {"ks": (MAIN_K,), "fractions": (MAIN_FRACTION,), "seeds": 3}
    return {
        "adult": [
            # every grouping for TracIn, in the directory of the job below: only the K-Means and
            # Repr-K-Means retrains are new; the job below runs last so its report stays
            Job(
                "adult",
                "logreg",
                "adult",
                4000,
                methods=("tracin",),
                tag="groupings",
                store="ggda_adult_logreg",
                **bar,
            ),
            Job(  # smaller groups (K = n/10) for TracIn, same store
                "adult",
                "logreg",
                "adult",
                4000,
                methods=("tracin",),
                groupings=("random", "grad-kmeans"),
                tag="k",
                store="ggda_adult_logreg",
                **{**bar, "ks": (MAIN_K, "n/10")},
            ),
            Job("adult", "logreg", "adult", 4000, groupings=("random", "grad-kmeans"), **bar),
            Job("adult", "mlp-m", "adult", 4000, methods=("tracin",), **bar),
        ],
        "fashion": [
            Job(  # K = n/10 = 100 (10 groups per class): at K = n/100 = 10 every per-class grouping
                # is one group per class, so K-Means, Repr-K-Means and Grad-K-Means coincide
                "fashion",
                "resnet",
                "fashion-mnist",
                1000,
                methods=("tracin",),
                epochs=10,
                tag="k",
                store="ggda_fashion_resnet",
                **{**bar, "ks": ("n/10",), "seeds": 2},
            ),
            Job(  # every grouping for TracIn, in the directory of the job below (its retrains reused)
                "fashion",
                "resnet",
                "fashion-mnist",
                1000,
                methods=("tracin",),
                epochs=10,
                tag="groupings",
                store="ggda_fashion_resnet",
                **{**bar, "seeds": 2},
            ),
            Job(
                "fashion",
                "resnet",
                "fashion-mnist",
                1000,
                methods=("tracin",),
                groupings=("random", "grad-kmeans"),
                epochs=10,  # 1,000 images / batch 64: 160 SGD steps (2 epochs left it at 49 % test accuracy)
                **{**bar, "seeds": 2},  # a retrain took 170 s here (10,000 test images evaluated each time)
            ),
        ],
        "text": [
            Job(  # frozen MiniLM + MLP head: the encoder pass over the reviews is paid once per
                # process (ggda.models.text.frozen_features), each retrain trains the head alone
                "text",
                "minilm",
                "reviews",
                None,
                methods=("tracin", "trak"),
                groupings=("random", "repr-kmeans", "grad-kmeans"),  # kmeans on token ids is refused
                epochs=30,  # the head's recipe (text-train's probe: Adam lr 1e-2, batch 64)
                text={"n": 2000, "balanced": True, "max_len": 64, "mode": "frozen", "head": "mlp"},
                **{**bar, "seeds": 5},  # a retrain is 1-2.5 s on cached features
            )
        ],
    }


# -- running ------------------------------------------------------------------------------------


def experiment_config(job: Job, backend: str, workers: int | None):
    from ggda.applications.experiment import ExperimentConfig

    return ExperimentConfig(
        data=job.source,
        model=job.model,
        methods=list(job.methods),
        groupings=list(job.groupings),
        ks=list(job.ks),
        fractions=list(job.fractions),
        seeds=job.seeds,
        prune_fractions=[],  # the claim is about the retraining score; pruning/LDS/noise are other studies
        lds_subsets=0,
        noise=0.0,
        epochs=job.epochs,
        max_train=job.max_train,
        backend=backend,
        workers=workers,
    )


def run_tabular(job: Job, out: Path, backend: str, workers: int | None, command: str) -> dict:
    """``ggda experiment`` on one data set + model (report included)."""
    from ggda.applications.experiment import run_experiment
    from ggda.report.html import write_report

    results = run_experiment(experiment_config(job, backend, workers), out, command=command)
    write_report(results, out, title=f"GGDA reproduction: {job.data} / {job.model}")
    return results


def run_text(job: Job, out: Path, backend: str, workers: int | None, command: str) -> dict:
    """The text recipe (``ggda text-train``), then the experiment's groupings, timed attribution
    and retraining score on that run; the results dict has ``run_experiment``'s layout."""
    import pandas as pd
    import torch

    from ggda.applications.evaluation import retrainer_for
    from ggda.applications.experiment import (
        _removal_rows,
        attribute_all,
        build_groupings,
        versions,
    )
    from ggda.applications.text import train_text_model
    from ggda.evaluate.retraining_score import removal_pairs, retraining_score
    from ggda.execution import ResultStore
    from ggda.runs import Run

    t_start = time.perf_counter()
    config = experiment_config(job, backend, workers)
    run_dir = out / "model"
    if not (run_dir / "run.json").exists():
        train_text_model(run_dir, seed=0, **{"mode": "finetune", **job.text})
    run = Run.load(run_dir)
    train, test = run.data()
    torch.manual_seed(0)
    task = run.task("cpu")
    context = {
        "data": run.data_spec.to_dict(),
        "model": run.model_spec.to_dict(),
        "train": run.config["train"],
    }
    groupings, failures = build_groupings(config, train, task, print)
    att_rows, scores, fails, records = attribute_all(
        config, run, task, groupings, ResultStore(out / "attributions"), context, print
    )
    failures += fails
    attributions = pd.DataFrame(att_rows)
    rankings = {
        r["label"]: (scores[r["label"]]["mean"], groupings[r["label"].split("|", 1)[1]]) for r in att_rows
    }
    retrainer = retrainer_for(run, out / "retrains", backend, workers)
    seeds = list(range(job.seeds))
    pairs = removal_pairs(rankings, len(train), list(job.fractions), seeds, "helpful", "exact")
    t0 = time.perf_counter()
    retrainer.run_pairs(pairs)
    retrain_seconds = time.perf_counter() - t0
    score = retraining_score(retrainer, rankings, list(job.fractions), seeds, "exact")
    none = score.none_accuracy
    return {
        "config": {**config.to_dict(), "text": job.text},
        "reference": {
            "n_train": len(train),
            "n_test": len(test),
            "test_accuracy": run.config["metrics"]["test_accuracy"],
            "train_seconds": run.config["metrics"].get("train_seconds"),
        },
        "no_removal": {
            "acc_mean": float(none.mean()),
            "acc_sem": float(none.std(ddof=1) / np.sqrt(len(none))) if len(none) > 1 else 0.0,
        },
        "attributions": att_rows,
        "retraining": _removal_rows(score, attributions),
        "failures": failures,
        "retrains": {"ran": retrainer.executed, "seconds": retrain_seconds},
        "seconds": time.perf_counter() - t_start,
        "provenance": {"command": command, "versions": versions(), "methods": records},
    }


# -- tables -------------------------------------------------------------------------------------


def _pm(mean: float, sem: float) -> str:
    return f"{mean:.4f} ± {sem:.4f}"


def summarize(job_name: str, results: dict, wall: float | None) -> dict:
    """The reproduction's numbers from a results dict: the K = n/100, 20 % table (every method x
    grouping, per point, baselines, runtime and speedup), the compact table over K and fractions,
    and the verdict inputs (Grad-K-Means vs per point and vs Random, per method)."""
    ret = results["retraining"]
    att = {r["label"]: r for r in results["attributions"]}
    n = results["reference"]["n_train"]
    ks = sorted({int(r["K"]) for r in results["attributions"] if r["grouping"] != "singleton"})
    main_k = min(ks, key=lambda k: abs(k - n / 100)) if ks else None
    fractions = sorted({float(r["fraction"]) for r in ret})
    main_f = min(fractions, key=lambda f: abs(f - MAIN_FRACTION))

    def acc(label: str, f: float) -> tuple[float, float] | None:
        for r in ret:
            if r["label"] == label and abs(float(r["fraction"]) - f) < 1e-9:
                return float(r["acc_mean"]), float(r["acc_sem"])
        return None

    methods = list(dict.fromkeys(r["method"] for r in results["attributions"]))
    groupings = [
        g for g in ("singleton", *GROUPINGS) if any(r["grouping"] == g for r in results["attributions"])
    ]
    main = []
    for m in methods:
        point = att.get(f"{m}|singleton")
        for g in groupings:
            label = f"{m}|singleton" if g == "singleton" else f"{m}|{g}:{main_k}"
            if label not in att:
                continue
            a = acc(label, main_f)
            secs = att[label]["seconds"]
            main.append(
                {
                    "method": m,
                    "grouping": "per point" if g == "singleton" else g,
                    "K": att[label]["K"],
                    "acc_mean": a[0] if a else None,
                    "acc_sem": a[1] if a else None,
                    "seconds": secs,
                    "speedup": point["seconds"] / secs if point and secs > 0 else None,
                }
            )
    rnd = acc("random", main_f)
    verdict = []
    for m in methods:
        point, gk, rg = (
            acc(lab, main_f)
            for lab in (f"{m}|singleton", f"{m}|grad-kmeans:{main_k}", f"{m}|random:{main_k}")
        )
        if point and gk:
            others = {
                g: acc(f"{m}|{g}:{main_k}", main_f)
                for g in GROUPINGS
                if g != "grad-kmeans" and acc(f"{m}|{g}:{main_k}", main_f)
            }
            verdict.append(
                {
                    "method": m,
                    "per_point": point[0],
                    "grad_kmeans": gk[0],
                    "gap_points": 100 * (gk[0] - point[0]),
                    "within_1pt": gk[0] - point[0] <= 0.01,
                    "random_groups": rg[0] if rg else None,
                    "beats_random_groups": (gk[0] < rg[0]) if rg else None,
                    "beats_all_other_groupings": all(gk[0] < v[0] for v in others.values())
                    if others
                    else None,
                }
            )
    compact = []
    for m in methods:
        for g in ("singleton", *GROUPINGS):
            for k in ks if g != "singleton" else [n]:
                label = f"{m}|singleton" if g == "singleton" else f"{m}|{g}:{k}"
                if label not in att:
                    continue
                row = {"method": m, "grouping": "per point" if g == "singleton" else g, "K": k}
                for f in fractions:
                    a = acc(label, f)
                    row[f"{f:g}"] = a
                compact.append(row)
    compact.append(
        {
            "method": "random removal",
            "grouping": "-",
            "K": n,
            **{f"{f:g}": acc("random", f) for f in fractions},
        }
    )
    return {
        "job": job_name,
        "data": results["config"]["data"],
        "model": results["config"]["model"],
        "n_train": n,
        "n_test": results["reference"]["n_test"],
        "test_accuracy": results["reference"]["test_accuracy"],
        "seeds": results["config"]["seeds"],
        "epochs": results["config"]["epochs"],
        "main_k": main_k,
        "main_fraction": main_f,
        "no_removal": results["no_removal"],
        "random_removal": {"acc_mean": rnd[0], "acc_sem": rnd[1]} if rnd else None,
        "main": main,
        "verdict": verdict,
        "compact": compact,
        "fractions": fractions,
        "failures": results.get("failures", []),
        "command": results["provenance"]["command"],
        "experiment_seconds": results.get("seconds"),
        "wall_seconds": wall,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
    }


def markdown(s: dict) -> str:
    nr, rr = s["no_removal"], s["random_removal"]
    lines = [
        f"### {s['job']}: {s['data']} / {s['model']} (n = {s['n_train']:,} train, {s['n_test']:,} test; "
        f"test accuracy {s['test_accuracy']:.4f}; {s['seeds']} retraining seeds, {s['epochs']} epochs)",
        "",
        f"Retraining score at K = {s['main_k']} (≈ n/100), {100 * s['main_fraction']:g} % removed "
        "(test accuracy after removal, mean ± SEM over seeds; lower = better attribution). "
        f"No removal: {_pm(nr['acc_mean'], nr['acc_sem'])}; random removal: "
        + (_pm(rr["acc_mean"], rr["acc_sem"]) if rr else "n/a")
        + ".",
        "",
        "| method | grouping | K | accuracy | attribution s (grouping incl.) | speedup vs per point |",
        "|---|---|---|---|---|---|",
    ]
    for r in s["main"]:
        a = _pm(r["acc_mean"], r["acc_sem"]) if r["acc_mean"] is not None else "n/a"
        sp = f"{r['speedup']:.1f}×" if r["speedup"] else "-"
        lines.append(f"| {r['method']} | {r['grouping']} | {r['K']} | {a} | {r['seconds']:.2f} | {sp} |")
    lines += [
        "",
        "| method | per point | Grad-K-Means | gap (points) | ≤ 1 pt | Random groups | GKM < Random | GKM < all other groupings |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in s["verdict"]:
        rg = f"{v['random_groups']:.4f}" if v["random_groups"] is not None else "n/a"
        lines.append(
            f"| {v['method']} | {v['per_point']:.4f} | {v['grad_kmeans']:.4f} | {v['gap_points']:+.2f} | "
            f"{'yes' if v['within_1pt'] else 'no'} | {rg} | {v['beats_random_groups']} | {v['beats_all_other_groupings']} |"
        )
    if len(s["fractions"]) > 1 or len({r["K"] for r in s["compact"]}) > 2:
        fr = s["fractions"]
        lines += [
            "",
            "Over K and removal fractions (accuracy, mean ± SEM):",
            "",
            "| method | grouping | K | " + " | ".join(f"{100 * f:g} %" for f in fr) + " |",
            "|---|---|---|" + "---|" * len(fr),
        ]
        for r in s["compact"]:
            cells = [(_pm(*r[f"{f:g}"]) if r.get(f"{f:g}") else "n/a") for f in fr]
            lines.append(f"| {r['method']} | {r['grouping']} | {r['K']} | " + " | ".join(cells) + " |")
    if s["failures"]:
        lines += ["", "Failures: " + "; ".join(str(f) for f in s["failures"])]
    wall = s["wall_seconds"] or s["experiment_seconds"]
    lines += [
        "",
        f"Command: `{s['command']}`",
        "",
        f"Wall time here: {wall / 60:.1f} min ({s['machine']})."
        + (f" {s['wall_note']}" if s.get("wall_note") else ""),
        "",
    ]
    return "\n".join(lines)


def write_outputs(job: Job, results: dict, wall: float | None) -> dict:
    """Write the job's table. A resumed run that retrained nothing keeps the wall time (and its
    note) of the run that computed the numbers: its own seconds only measure loading the store."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    s = summarize(job.name, results, wall)
    previous = RESULTS / f"{job.name}.json"
    if previous.exists() and not results.get("retrains", {}).get("ran"):
        old = json.loads(previous.read_text())
        for key in ("wall_seconds", "wall_note", "machine"):
            if old.get(key) is not None:
                s[key] = old[key]
    (RESULTS / f"{job.name}.json").write_text(json.dumps(s, indent=1, default=float) + "\n")
    (RESULTS / f"{job.name}.md").write_text(markdown(s))
    return s


def verdict(s: dict) -> tuple[str, str]:
    """(holds | holds partly | does not hold, why) for one data set + model, by the issue's bar:
    the default Grad-K-Means within 1 accuracy point of per-point attribution and below Random
    groups, at K = n/100 and 20 % removal, for every method run."""
    rows = s["verdict"]
    if not rows:
        return "not measured", "no per-point and Grad-K-Means rows"
    ok = [v for v in rows if v["within_1pt"] and v["beats_random_groups"]]
    word = "holds" if len(ok) == len(rows) else "holds partly" if ok else "does not hold"
    why = "; ".join(
        f"{v['method']}: GKM {v['grad_kmeans']:.4f} vs per point {v['per_point']:.4f} ({v['gap_points']:+.2f} pt)"
        + (f", Random groups {v['random_groups']:.4f}" if v["random_groups"] is not None else "")
        for v in rows
    )
    return word, why


def write_section(out: Path) -> Path:
    """``ggda_section.md``: the hand-written notes (``ggda_notes.md``: scope, cuts, reading), the
    verdict per data set + model, then every table in ``benchmarks/results/reproduce``."""
    summaries = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("ggda_*.json"))]
    notes = RESULTS / "ggda_notes.md"
    parts = [
        "## GGDA (Ley et al.): group attribution with Grad-K-Means",
        "",
        "**Paper's claim.** The retraining score (test accuracy after removing the top 1/5/10/20 % most "
        "important training points, groups removed in rank order until the fraction is reached; lower = "
        "better) of IF, TracIn and TRAK on Grad-K-Means groups is close to per-point attribution at orders "
        "of magnitude less runtime, and Grad-K-Means beats Random, K-Means and Repr-K-Means groups.",
        "",
        notes.read_text() if notes.exists() else "",
        "",
        "| job (data_model) | bar (GKM ≤ per point + 1 pt and < Random groups, K ≈ n/100, 20 %) | numbers |",
        "|---|---|---|",
    ]
    for s in summaries:
        word, why = verdict(s)
        parts.append(f"| {s['job'].removeprefix('ggda_')} | {word} | {why} |")
    shown = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    parts += ["", f"Reports (HTML, figures): `{shown}/<profile>/<job>/index.html` (not committed).", ""]
    for s in summaries:  # each table re-rendered from its JSON, so tables and section agree
        (RESULTS / f"{s['job']}.md").write_text(markdown(s))
        parts.append(markdown(s))
    path = RESULTS / "ggda_section.md"
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=("adult", "fashion", "text", "all"), default="all")
    parser.add_argument("--profile", choices=("quick", "full"), default="quick")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce" / "ggda")
    parser.add_argument("--backend", default="local", help="ggda executor: serial, local or ray")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    parser.add_argument(
        "--jobs", default="", help="comma-separated job names to run (default: all of --data)"
    )
    parser.add_argument(
        "--section-only", action="store_true", help="only re-render the section from stored tables"
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    if not args.section_only:
        datasets = ("adult", "fashion", "text") if args.data == "all" else (args.data,)
        jobs = [j for d in datasets for j in plan(args.profile)[d]]
        if args.jobs:
            jobs = [j for j in jobs if j.name in args.jobs.split(",")]
        for job in jobs:
            out = args.out / args.profile / (job.store or job.name)
            command = shlex.join(
                [
                    "python",
                    "benchmarks/reproduce/ggda_grid.py",
                    "--data",
                    job.data,
                    "--profile",
                    args.profile,
                    "--jobs",
                    job.name,
                    "--backend",
                    args.backend,
                    *(["--workers", str(args.workers)] if args.workers else []),
                ]
            )
            print(f"== {job.name} -> {out}", flush=True)
            t0 = time.perf_counter()
            runner = run_text if job.data == "text" else run_tabular
            results = runner(job, out, args.backend, args.workers, command)
            if job.data == "text":
                (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
            wall = time.perf_counter() - t0
            s = write_outputs(job, results, wall)
            print(markdown(s), flush=True)
    print(f"section: {write_section(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
