"""Run every ggda speed benchmark (``make bench``) and write the tables to ``benchmarks/results/``.

    .venv/bin/python benchmarks/run_all.py            # quick: a few minutes (+ dattri's own time)
    .venv/bin/python benchmarks/run_all.py --full     # larger targets, more models and methods
    .venv/bin/python benchmarks/run_all.py --only floor,methods   # a subset
    .venv/bin/python benchmarks/run_all.py --no-dattri            # skip the dattri comparison

Sections (each prints its workload — model, n, d, K, p, device — and its ratios, all measured
in the same run):

1. ``methods``: group vs per-point time per method at K = n/10, n/100, n/1000 (n = 20,000).
2. ``floor``: all K group gradients ÷ one forward + backward of the summed loss.
3. ``dattri``: ggda vs dattri 0.3.0 on the same per-point work (Grad-Dot, IF-CG, TRAK), dattri
   installed only in ``benchmarks/.venv-dattri``.
4. ``trak_ensemble``: TRAK over M = 1, 5, 20 models (shared projection vs one per model, dattri's
   TRAK on the same models): time and LDS vs M (``bench_trak_ensemble.py``).
5. ``group_models`` (own process): the floor ratio and group vs per point per method on a ResNet
   CNN and on MiniLM (``bench_group_models.py``); ``dattri_cnn`` (own process): per point on the
   same ResNet, ggda vs dattri 0.3.0 for Grad-Dot and TRAK (``bench_dattri_cnn.py``).

Everything runs with one torch thread (``torch.set_num_threads(1)``); the machine's load
average is printed with each table, because other processes share the cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (sets the thread environment before torch is imported)

SECTIONS = ("floor", "methods", "grouping", "dattri", "trak_ensemble")
# Sections run as their own process (peak-memory figures must belong to that workload alone);
# their printed output is the result.
EXTERNAL = {
    "scale": lambda quick: [
        sys.executable,
        str(Path(__file__).parent / "bench_scale.py"),
        *(["--quick"] if quick else []),
        "--out",
        str(common.RESULTS / "scale.json"),
    ],
    # issue #20 item 1: IF-CG (each preconditioner) vs dattri's CG at the same relative residual
    "influence_accuracy": lambda quick: [
        sys.executable,
        str(Path(__file__).parent / "bench_influence_accuracy.py"),
        *([] if quick else ["--warm-start"]),
    ],
    # issue #20 item 3: group vs per point on a ResNet CNN and on MiniLM (per-example work dominates)
    "group_models": lambda quick: [
        sys.executable,
        str(Path(__file__).parent / "bench_group_models.py"),
        *(["--n-cnn", "1000", "--n-minilm", "200", "--targets", "5"] if quick else ["--n-minilm", "500"]),
        *["--cg-iter", "2", "--ekfac-fisher", "empirical"],
    ],
    # issue #20 item 3: per point on the same ResNet, ggda vs dattri 0.3.0 (Grad-Dot, TRAK k = 2,048)
    "dattri_cnn": lambda quick: [
        sys.executable,
        str(Path(__file__).parent / "bench_dattri_cnn.py"),
        *(
            ["--n", "1000", "--targets", "5"] if quick else ["--n", "2000", "--targets", "10"]
        ),  # = group_models
    ],
    "gold": lambda quick: [
        sys.executable,
        str(Path(__file__).parent / "bench_gold.py"),
        # the workload: 100 runs of MLP 100-128-128-2, n = 8,000, batch 128, one epoch
        *(["--runs", "100", "--seq-runs", "10"] if quick else ["--runs", "100", "--seq-runs", "100"]),
    ],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the default: a few minutes")
    mode.add_argument("--full", action="store_true", help="bigger workloads (tens of minutes, dattri longer)")
    ap.add_argument(
        "--only",
        default=",".join(SECTIONS + tuple(EXTERNAL)),
        help=f"comma-separated subset of {SECTIONS + tuple(EXTERNAL)}; empty = only rebuild results/summary.* "
        "from saved sections",
    )
    ap.add_argument("--no-dattri", action="store_true", help="skip the dattri comparison")
    args = ap.parse_args(argv)
    quick = not args.full
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS) - set(EXTERNAL))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {SECTIONS + tuple(EXTERNAL)}")
    if args.no_dattri:
        chosen = [name for name in chosen if name not in ("dattri", "dattri_cnn")]

    all_tables = []
    timings = {}
    for name in chosen:
        if name in EXTERNAL:
            import subprocess

            print(f"\n### {name} ({'quick' if quick else 'full'}, own process)", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(EXTERNAL[name](quick), capture_output=True, text=True)
            timings[name] = time.perf_counter() - t0
            print(proc.stdout[-6000:], flush=True)
            if proc.returncode != 0:
                print(f"{name} failed:\n{proc.stderr[-2000:]}", flush=True)
            else:  # kept with the other sections' results, and in the summary
                common.RESULTS.mkdir(parents=True, exist_ok=True)
                (common.RESULTS / f"{name}.txt").write_text(
                    f"== {name} ({' '.join(EXTERNAL[name](quick)[1:])}) ==\n{proc.stdout.strip()}\n"
                )
                jpath = common.RESULTS / f"{name}.json"
                if not jpath.exists() or name == "gold":  # gold prints one JSON line
                    try:
                        data = json.loads(proc.stdout.strip().splitlines()[-1])
                    except (ValueError, IndexError):
                        data = {"stdout": proc.stdout[-6000:]}
                    jpath.write_text(json.dumps(data, indent=1))
            continue
        module = __import__(f"bench_{name}")
        print(f"\n### {name} ({'quick' if quick else 'full'})", flush=True)
        t0 = time.perf_counter()
        tables = module.run(quick=quick)
        timings[name] = time.perf_counter() - t0
        path = common.save(name, tables)
        print(f"-> {path} ({timings[name]:.0f} s)", flush=True)
        all_tables += tables
    # the summary collects the latest result of every section, also of sections run separately
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    done = [s for s in SECTIONS if (common.RESULTS / f"{s}.json").exists()]
    done += [s for s in EXTERNAL if (common.RESULTS / f"{s}.txt").exists()]
    summary = "\n\n".join((common.RESULTS / f"{s}.txt").read_text().strip() for s in done)
    (common.RESULTS / "summary.txt").write_text(summary + "\n")
    (common.RESULTS / "summary.json").write_text(
        json.dumps(
            {
                "mode": "quick" if quick else "full",
                "seconds_this_run": timings,
                "sections": {
                    s: json.loads((common.RESULTS / f"{s}.json").read_text())
                    for s in done
                    if (common.RESULTS / f"{s}.json").exists()
                },
            },
            indent=1,
            default=float,
        )
    )
    print("\n" + summary)
    print(f"\nwritten: {common.RESULTS / 'summary.txt'}; section seconds: {timings}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
