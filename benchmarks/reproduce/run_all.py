"""Run both papers' reproductions (``make reproduce``): the GGDA grid and the final-model-only grid.

    .venv/bin/python benchmarks/reproduce/run_all.py                    # the quick profile
    .venv/bin/python benchmarks/reproduce/run_all.py --profile full     # hours on 2 cores
    .venv/bin/python benchmarks/reproduce/run_all.py --only ggda --data adult
    .venv/bin/python benchmarks/reproduce/run_all.py --backend ray      # retraining on a Ray cluster

Each experiment is its own resumable command (``ggda_grid.py``, ``fimo_grid.py``; ``--help`` on
either lists its grid); this driver runs them one after the other and passes the profile, data
sets, output folder and executor through. A killed run continues where it stopped when rerun.
What each experiment measures, and the verdicts drawn from it, are in ``docs/reproduction.md``;
the driver ends by rendering that page, its figures and links to every GGDA job's experiment
report into ``OUT/index.html`` (``--render-only`` does just that).
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DOC = ROOT / "docs" / "reproduction.md"
EXPERIMENTS = {"ggda": HERE / "ggda_grid.py", "fimo": HERE / "fimo_grid.py"}


def render(out: Path) -> Path:
    """``docs/reproduction.md`` as ``OUT/index.html`` in the experiment report's style, with its
    figures copied next to it and a link to every experiment report found under ``OUT``."""
    from markdown_it import MarkdownIt

    from ggda.report.html import STYLE

    out.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text()

    def local(match: re.Match) -> str:  # copy each figure beside the page, link it by name
        src = (DOC.parent / match.group(2)).resolve()
        if src.exists():
            shutil.copy2(src, out / src.name)
            return f"{match.group(1)}({src.name})"
        return match.group(0)

    text = re.sub(r"(!\[[^\]]*\])\(([^)]+)\)", local, text)
    body = MarkdownIt("commonmark").enable("table").render(text)
    reports = sorted(p for p in out.glob("*/*/*/index.html"))
    links = "".join(
        f"<li><a href='{html.escape(str(p.relative_to(out)))}'>{html.escape(p.parent.name)}</a></li>"
        for p in reports
    )
    page = (
        "<html><head><meta charset='utf-8'><title>ggda: reproducing the papers</title>"
        f"<style>{STYLE}</style></head><body>{body}"
        + (f"<h2>Experiment reports</h2><ul>{links}</ul>" if links else "")
        + "</body></html>"
    )
    index = out / "index.html"
    index.write_text(page)
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=("quick", "full"), default="quick")
    ap.add_argument("--only", default="ggda,fimo", help="comma-separated subset of ggda,fimo")
    ap.add_argument("--data", default="all", help="adult, fashion, text or all (passed to each experiment)")
    ap.add_argument(
        "--out", default="runs/reproduce", help="parent folder; each experiment writes OUT/<name>"
    )
    ap.add_argument("--backend", default=None, help="executor passed through: serial, local or ray")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--render-only", action="store_true", help="only write OUT/index.html from the docs page")
    args = ap.parse_args(argv)
    if args.render_only:
        print(f"[reproduce] wrote {render(Path(args.out))}")
        return 0
    names = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        ap.error(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    failed = []
    for name in names:
        cmd = [sys.executable, str(EXPERIMENTS[name]), "--profile", args.profile, "--data", args.data]
        cmd += ["--out", str(Path(args.out) / name)]
        if args.backend:
            cmd += ["--backend", args.backend]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        print(f"[reproduce] {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"[reproduce] {name}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(name)
    print(f"[reproduce] wrote {render(Path(args.out))}")
    if failed:
        print(f"[reproduce] failed: {', '.join(failed)} (rerun to resume)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
