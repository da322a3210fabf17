"""Fuzz suite: bad inputs through every command end in one ``error:`` line, nothing else.

Every case runs the real entry point (:func:`ggda.cli.main.main`) in this process with its own
argument list, and asserts

* the exit code (2 for a user error; controls: 0),
* exactly one line on stderr starting with ``error:`` (controls: none), naming the file or option
  (``match``), and not the boundary's fallback for an unexpected exception,
* no traceback,
* nothing left behind: no file or directory appears and no existing file changes (a crafted
  pickle that would create a directory when unpickled is caught the same way).

One tiny trained run (digits, 60 points, 2 epochs) with an attribution, a gold standard, a feature
store and a grouping is built once per module and shared; a case that corrupts a run works on its
own copy. Property-based tests (Hypothesis) throw random CSV contents and option values at the
same boundary. ``python tests/cli/test_fuzz.py [SUBSTRING ...]`` prints every case's outcome and
the counts (cases, tracebacks, silent acceptances, leftovers).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggda.cli.main import main
from ggda.errors import GGDAError

# -- the harness ------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: int | None
    out: str
    err: str
    raised: BaseException | None = None

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]

    @property
    def traceback(self) -> bool:
        return self.raised is not None or "Traceback (most recent call last)" in self.out + self.err


def run_cli(args: list) -> Outcome:
    """``ggda ARGS`` in this process: exit code, stdout, stderr (and an escaped exception)."""
    out, err = io.StringIO(), io.StringIO()
    code: int | None = 0
    raised = None
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # noqa: BLE001  (what escapes the boundary is a failure)
            raised, code = exc, None
    return Outcome(code, out.getvalue(), err.getvalue(), raised)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file under ``root``; directories as (-1, 0)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            state[os.path.join(dirpath, name)] = (-1, 0)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            state[p] = (st_.st_size, st_.st_mtime_ns)
    return state


@dataclass
class Case:
    """One command line. ``args`` are formatted with the fixture paths (``{run}``, ``{c}`` = the
    case's own directory, ...); ``setup(c, fx)`` prepares bad files in ``c`` first.

    ``ok``: a control that must succeed. ``resumable``: a damaged stored file that the command may
    either recompute (exit 0) or refuse (one error line); either way no code from it runs.
    """

    id: str
    args: list
    match: str | None = None  # a substring of the error line (the file or option it must name)
    code: int = 2
    setup: Callable | None = None
    ok: bool = False
    resumable: bool = False
    slow: bool = False


@dataclass
class Fixtures:
    root: Path
    paths: dict = field(default_factory=dict)


PWNED = "pwned"  # what a crafted pickle would create if it were unpickled


def check(case: Case, fx: Fixtures, c: Path) -> tuple[Outcome, list[str]]:
    """Run ``case`` in case directory ``c``; (outcome, problems)."""
    c.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(c, fx)
    args = [str(a).format(c=c, **fx.paths) for a in case.args]
    before = snapshot(fx.root)
    res = run_cli(args)
    after = snapshot(fx.root)
    problems = []
    if res.traceback:
        problems.append("traceback")
    if (c / PWNED).exists():
        problems.append("code ran from a crafted file")
    if case.ok or (case.resumable and res.code == 0):
        if res.code != 0:
            problems.append(f"exit {res.code}")
        if res.error_lines:
            problems.append("error line in a control")
        return res, problems
    if res.code == 0:
        problems.append("silent acceptance (exit 0)")
    elif res.code != case.code:
        problems.append(f"exit {res.code} (expected {case.code})")
    lines = res.error_lines
    if len(lines) != 1:
        problems.append(f"{len(lines)} error: lines")
    else:
        if "internal error" in lines[0]:
            problems.append("unexpected exception")
        if case.match and case.match.lower() not in lines[0].lower():
            problems.append(f"error line does not name {case.match!r}")
    new = sorted(set(after) - set(before))
    changed = sorted(p for p in set(after) & set(before) if after[p] != before[p])
    if new:
        problems.append(f"leftovers: {[os.path.relpath(p, fx.root) for p in new][:3]}")
    if changed:
        problems.append(f"changed: {[os.path.relpath(p, fx.root) for p in changed][:3]}")
    return res, problems


# -- files that are wrong in every way ----------------------------------------------------------

GARBAGE = bytes(range(256)) * 8
LONG = "x" * 300


def write(name: str, data: bytes | str):
    def setup(c: Path, fx: Fixtures) -> None:
        p = c / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)

    return setup


def file_at(name: str):
    return write(name, "a file")


def make_dir(name: str):
    return lambda c, fx: (c / name).mkdir()


def frame_csv(name: str, frame_fn: Callable[[], pd.DataFrame]):
    def setup(c: Path, fx: Fixtures) -> None:
        frame_fn().to_csv(c / name, index=False)

    return setup


def save_array(name: str, array_fn: Callable[[], np.ndarray]):
    return lambda c, fx: np.save(c / name, array_fn(), allow_pickle=True)


def good_frame(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"x1": rng.normal(size=n), "x2": rng.normal(size=n)})
    frame["label"] = (frame.x1 + frame.x2 > 0).astype(int)
    return frame


def stray_string() -> pd.DataFrame:
    frame = good_frame().astype({"x1": object})
    frame.loc[len(frame) - 1, "x1"] = "abc"
    return frame


def many_classes() -> pd.DataFrame:
    frame = good_frame(1200)
    frame["label"] = np.arange(1200) % 1000
    return frame


def parquet_dup(c: Path, fx: Fixtures) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = [pa.array([1.0, 2.0, 3.0]), pa.array([0, 1, 0]), pa.array([4.0, 5.0, 6.0])]
    pq.write_table(pa.table(cols, names=["x", "label", "x"]), c / "dup.parquet")


def truncated(src_key: str, name: str, keep: float = 0.5):
    def setup(c: Path, fx: Fixtures) -> None:
        data = Path(fx.paths[src_key]).read_bytes()
        (c / name).write_bytes(data[: int(len(data) * keep)])

    return setup


def copy_dir(key: str, name: str, mutate: Callable[[Path], None] | None = None):
    """The case's own copy of fixture ``key`` as ``{c}/NAME``, then ``mutate(copy)``."""

    def setup(c: Path, fx: Fixtures) -> None:
        dst = c / name
        shutil.copytree(fx.paths[key], dst)
        if mutate is not None:
            mutate(dst)

    return setup


def copy_run(mutate: Callable[[Path], None] | None = None):
    return copy_dir("run", "run", mutate)


def put(rel: str, data: bytes | str):
    def mutate(d: Path) -> None:
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)

    return mutate


def cut(rel: str, keep: float = 0.5):
    def mutate(d: Path) -> None:
        for p in sorted(d.glob(rel)):
            data = p.read_bytes()
            p.write_bytes(data[: int(len(data) * keep)])

    return mutate


def garble(rel: str):
    def mutate(d: Path) -> None:
        for p in sorted(d.glob(rel)):
            p.write_bytes(GARBAGE[: max(p.stat().st_size, 64)])

    return mutate


def remove(rel: str):
    def mutate(d: Path) -> None:
        p = d / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return mutate


def edit_json(rel: str, fn: Callable[[dict], object]):
    def mutate(d: Path) -> None:
        p = d / rel
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))

    return mutate


def other_model(d: Path) -> None:
    """model.pt of another architecture (logreg) than run.json records (mlp-s)."""
    from ggda.models.checkpoint import save_model
    from ggda.models.zoo import build_model

    save_model(d / "model.pt", build_model("logreg", 64, 10, seed=0), epoch=1)


def other_data_model(d: Path) -> None:
    """model.pt of the same kind built for another data set (other input and output sizes)."""
    from ggda.models.checkpoint import save_model
    from ggda.models.zoo import build_model

    save_model(d / "model.pt", build_model("mlp-s", 13, 3, seed=0), epoch=1)


class _Crafted:
    """Unpickling this creates directory ``target`` (standing for arbitrary code)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def crafted_pickle(rel: str, in_case: bool = True):
    """A torch file at ``rel`` whose unpickling would create ``{c}/pwned``."""

    def setup(c: Path, fx: Fixtures) -> None:
        import torch

        p = c / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {}, "meta": {"epoch": 1}, "evil": _Crafted(str(c / PWNED))}, p)

    return setup


def crafted_in_copy(key: str, name: str, rel: str):
    def setup(c: Path, fx: Fixtures) -> None:
        copy_dir(key, name)(c, fx)
        crafted_pickle(f"{name}/{rel}")(c, fx)

    return setup


def zip_garbage() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("X.npy", b"not an array")
    return buf.getvalue()


def pickled_split(d: Path) -> None:
    np.savez(
        d / "split.npz",
        train_ids=np.array([_Crafted(str(d.parent / PWNED))], dtype=object),
        test_ids=np.arange(3),
    )


# -- the table ----------------------------------------------------------------------------------
# fmt: off

TRAIN = ["train", "--data", "digits", "--epochs", "1", "--max-train", "40", "--threads", "1"]
ATTR = ["attribute", "--run", "{run}", "--targets", "2"]
GOLD = ["gold", "--run", "{run}", "--n-units", "2", "--targets", "2", "--backend", "serial"]
GROUP = ["group", "--run", "{run}", "--method", "random", "-k", "5"]
COMPARE = ["compare", "--run", "{run}", "--gold", "{gold}", "--methods", "grad-dot"]
EVAL = ["evaluate", "retraining", "--run", "{run}", "--scores", "{att}", "--seeds", "1", "--fractions", "0.1", "--epochs", "1", "--backend", "serial"]
LDS = ["evaluate", "lds", "--run", "{run}", "--scores", "{att}", "--subsets", "3", "--epochs", "1", "--backend", "serial"]
BUILD = ["features", "build", "--run", "{run}"]
SCORE = ["features", "score", "--run", "{run}", "--store", "{store}", "--targets", "2"]
EXPERIMENT = ["experiment", "--methods", "grad-dot", "--groupings", "random", "--ks", "n/10", "--max-train", "40", "--epochs", "1", "--seeds", "1", "--lds-subsets", "0", "--noise", "0", "--prune-fractions", "", "--backend", "serial"]
CRUN = "{c}/run"  # a case's own copy of the run


def _out_cases(cmd: str, prefix: list, suffix: str = "") -> list[Case]:
    """Every output path that cannot be written: a file (or a directory where a file goes),
    under a file, too long, read-only."""
    first = (Case(f"{cmd}-out-is-dir", [*prefix, "--out", "{c}/d" + suffix], "d" + suffix, setup=make_dir("d" + suffix))
             if suffix else Case(f"{cmd}-out-is-file", [*prefix, "--out", "{c}/taken"], "taken", setup=file_at("taken")))
    return [
        first,
        Case(f"{cmd}-out-under-file", [*prefix, "--out", "{c}/taken/sub" + suffix], "taken", setup=file_at("taken")),
        Case(f"{cmd}-out-too-long", [*prefix, "--out", "{c}/" + LONG + suffix], "too long"),
        Case(f"{cmd}-out-read-only", [*prefix, "--out", "/sys/ggda-fuzz/out" + suffix], "/sys"),
        Case(f"{cmd}-out-cannot-create", [*prefix, "--out", "/proc/ggda-fuzz/out" + suffix], "/proc"),
    ]


def _run_file_cases(cmd: str, a: Callable[[str], list], full: bool = True) -> list[Case]:
    """A missing, corrupt or foreign run file reached through ``cmd`` (``a(run)``: its arguments)."""
    cases = [
        Case(f"{cmd}-run-missing", a("{c}/nope"), "nope"),
        Case(f"{cmd}-run-is-file", a("{c}/afile"), "afile", setup=file_at("afile")),
        Case(f"{cmd}-run-json-missing", a(CRUN), "run.json", setup=copy_run(remove("run.json"))),
        Case(f"{cmd}-run-json-empty", a(CRUN), "run.json", setup=copy_run(put("run.json", b""))),
        Case(f"{cmd}-run-json-garbage", a(CRUN), "run.json", setup=copy_run(put("run.json", GARBAGE))),
        Case(f"{cmd}-run-json-truncated", a(CRUN), "run.json", setup=copy_run(cut("run.json"))),
        Case(f"{cmd}-run-json-list", a(CRUN), "run.json", setup=copy_run(put("run.json", "[1, 2]"))),
        Case(f"{cmd}-run-json-no-data", a(CRUN), "run.json", setup=copy_run(edit_json("run.json", lambda d: {k: v for k, v in d.items() if k != "data"}))),
        Case(f"{cmd}-run-json-bad-field", a(CRUN), "run.json", setup=copy_run(edit_json("run.json", lambda d: {**d, "data": {**d["data"], "test_fraction": 7}}))),
        Case(f"{cmd}-split-missing", a(CRUN), "split.npz", setup=copy_run(remove("split.npz"))),
        Case(f"{cmd}-split-empty", a(CRUN), "split.npz", setup=copy_run(put("split.npz", b""))),
        Case(f"{cmd}-split-truncated", a(CRUN), "split.npz", setup=copy_run(cut("split.npz"))),
    ]
    if full:
        cases += [
            Case(f"{cmd}-split-pickled", a(CRUN), "split.npz", setup=copy_run(pickled_split)),
            Case(f"{cmd}-model-missing", a(CRUN), "model.pt", setup=copy_run(remove("model.pt"))),
            Case(f"{cmd}-model-empty", a(CRUN), "model.pt", setup=copy_run(put("model.pt", b""))),
            Case(f"{cmd}-model-truncated", a(CRUN), "model.pt", setup=copy_run(cut("model.pt"))),
            Case(f"{cmd}-model-garbage", a(CRUN), "model.pt", setup=copy_run(put("model.pt", GARBAGE))),
            Case(f"{cmd}-model-crafted-pickle", a(CRUN), "model.pt", setup=crafted_in_copy("run", "run", "model.pt")),
            Case(f"{cmd}-model-other-arch", a(CRUN), "model.pt", setup=copy_run(other_model)),
            Case(f"{cmd}-model-other-data", a(CRUN), "model.pt", setup=copy_run(other_data_model)),
            Case(f"{cmd}-checkpoint-truncated", a(CRUN), "epoch_0001.pt", setup=copy_run(cut("checkpoints/epoch_0001.pt"))),
            Case(f"{cmd}-checkpoint-empty", a(CRUN), "epoch_0002.pt", setup=copy_run(put("checkpoints/epoch_0002.pt", b""))),
            Case(f"{cmd}-checkpoint-crafted-pickle", a(CRUN), "epoch_0001.pt", setup=crafted_in_copy("run", "run", "checkpoints/epoch_0001.pt")),
        ]
    return cases


def _flag_cases(cmd: str, base: list, rows: list, tail: list) -> list[Case]:
    """``cmd-FLAG=VALUE`` cases: (flag, value, match[, setup]) rows appended to ``base``."""
    out = []
    for row in rows:
        flag, value, match, *setup = row
        out.append(Case(f"{cmd}{flag}={value}", [*base, flag, value, *tail], match, setup=setup[0] if setup else None))
    return out


def build_cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.extend

    # controls: each command succeeds on good input (and --debug is accepted)
    add([
        Case("ctl-datasets", ["datasets"], ok=True),
        Case("ctl-methods", ["methods"], ok=True),
        Case("ctl-help", ["--help"], ok=True),
        Case("ctl-debug-flag", ["--debug", "methods"], ok=True),
        Case("ctl-train-csv", ["train", "--data", "{c}/good.csv", "--label", "label", "--model", "logreg", "--epochs", "1", "--out", "{c}/run"], setup=frame_csv("good.csv", good_frame), ok=True),
        Case("ctl-attribute", [*ATTR, "--out", "{c}/a", "--top-k", "0"], ok=True),
        Case("ctl-attribute-if", [*ATTR, "--method", "if-cg", "--opt", "damping=0.01", "--opt", "max_iter=5", "--out", "{c}/a"], ok=True),
        Case("ctl-attribute-groups-file", [*ATTR, "--grouping", "{groups}", "--out", "{c}/a"], ok=True),
        Case("ctl-group", [*GROUP, "--out", "{c}/g.npy"], ok=True),
        Case("ctl-features-info", ["features", "info", "--store", "{store}"], ok=True),
        Case("ctl-features-score", [*SCORE, "--out", "{c}/s"], ok=True),
        Case("ctl-compare", [*COMPARE, "--out", "{c}/cmp"], ok=True, slow=True),
        Case("ctl-gold-resume-damaged-result", [*GOLD, "--out", "{c}/gold"], setup=copy_dir("gold", "gold", garble("store/*units=full.npz")), resumable=True, slow=True),
        Case("ctl-gold-resume-truncated-result", [*GOLD, "--out", "{c}/gold"], setup=copy_dir("gold", "gold", cut("store/*units=0-*.npz")), resumable=True, slow=True),
        Case("ctl-gold-crafted-problem", [*GOLD, "--out", "{c}/gold"], "problem.pt", setup=crafted_in_copy("gold", "gold", "problem.pt"), resumable=True, slow=True),
    ])

    # usage errors: the framework's messages, one line
    add([
        Case("usage-unknown-command", ["nope"], "nope"),
        Case("usage-unknown-option", ["methods", "--frob"], "--frob"),
        Case("usage-extra-argument", ["datasets", "extra"], "extra"),
        Case("usage-missing-option", ["train", "--data", "digits"], "--out"),
        Case("usage-not-an-int", [*TRAIN, "--epochs", "abc", "--out", "{c}/r"], "--epochs"),
        Case("usage-not-a-float", [*TRAIN, "--lr", "fast", "--out", "{c}/r"], "--lr"),
        Case("usage-option-without-value", ["attribute", "--run"], "--run"),
        Case("usage-evaluate-unknown", ["evaluate", "nope"], "nope"),
        Case("usage-features-unknown", ["features", "nope"], "nope"),
        Case("usage-bool-with-value", [*ATTR, "--no-lr", "yes", "--out", "{c}/a"], "yes"),
        Case("demo-out-under-file", ["demo", "--out", "{c}/taken/demo"], "taken", setup=file_at("taken")),
        Case("text-train-out-is-file", ["text-train", "--out", "{c}/taken", "--n", "10"], "taken", setup=file_at("taken")),
        Case("text-bench-out-is-dir", ["text-bench", "--out", "{c}/d.json"], "d.json", setup=make_dir("d.json")),
    ])

    # train: data sources (CSV, Parquet, NPZ) broken in every way
    T = lambda data, *more: ["train", "--data", data, *more, "--out", "{c}/r"]  # noqa: E731
    add([
        Case("train-unknown-dataset", T("nope"), "nope"),
        Case("train-missing-file", T("{c}/missing.csv", "--label", "y"), "missing.csv"),
        Case("train-data-is-dir", T("{c}/d.csv", "--label", "y"), "d.csv", setup=make_dir("d.csv")),
        Case("train-csv-empty", T("{c}/e.csv", "--label", "y"), "e.csv", setup=write("e.csv", b"")),
        Case("train-csv-header-only", T("{c}/h.csv", "--label", "label"), "h", setup=write("h.csv", "x1,x2,label\n")),
        Case("train-csv-binary", T("{c}/b.csv", "--label", "label"), "b.csv", setup=write("b.csv", GARBAGE)),
        Case("train-csv-truncated-row", T("{c}/t.csv", "--label", "label"), "label", setup=write("t.csv", "x1,x2,label\n" + "1.0,2.0,0\n3.0,1.0,1\n" * 20 + "4.0,")),
        Case("train-csv-no-label-option", T("{c}/good.csv"), "--label", setup=frame_csv("good.csv", good_frame)),
        Case("train-csv-label-absent", T("{c}/good.csv", "--label", "nope"), "nope", setup=frame_csv("good.csv", good_frame)),
        Case("train-csv-stray-string", T("{c}/s.csv", "--label", "label"), "x1", setup=frame_csv("s.csv", stray_string)),
        Case("train-csv-duplicate-label", T("{c}/dl.csv", "--label", "label"), "label", setup=frame_csv("dl.csv", lambda: good_frame().assign(label_copy=lambda f: f.label))),
        Case("train-csv-single-class", T("{c}/one.csv", "--label", "label"), "label", setup=frame_csv("one.csv", lambda: good_frame().assign(label=0))),
        # a float label is guessed as a regression target (issue 19); classes only when asked for
        Case("train-csv-float-label", T("{c}/fl.csv", "--label", "x1", "--classification"), "x1", setup=frame_csv("fl.csv", good_frame)),
        Case("train-csv-both-kinds", T("{c}/good.csv", "--label", "label", "--classification", "--regression"), "--regression", setup=frame_csv("good.csv", good_frame)),
        Case("train-csv-unknown-suffix", T("{c}/good.txt", "--label", "label"), ".csv", setup=frame_csv("good.txt", good_frame)),
        Case("train-csv-gz-garbage", T("{c}/g.csv.gz", "--label", "label"), "g.csv.gz", setup=write("g.csv.gz", GARBAGE)),
        Case("train-csv-id-absent", T("{c}/good.csv", "--label", "label", "--id-column", "nope"), "nope", setup=frame_csv("good.csv", good_frame)),
        Case("train-csv-id-duplicate", T("{c}/good.csv", "--label", "label", "--id-column", "x3"), "x3", setup=frame_csv("good.csv", lambda: good_frame().assign(x3=1))),
        Case("train-csv-1000-classes", T("{c}/mc.csv", "--label", "label"), "label", setup=frame_csv("mc.csv", many_classes)),
        Case("train-csv-group-absent", T("{c}/good.csv", "--label", "label", "--group-column", "nope"), "nope", setup=frame_csv("good.csv", good_frame)),
        Case("train-csv-categorical-absent", T("{c}/good.csv", "--label", "label", "--categorical", "nope"), "nope", setup=frame_csv("good.csv", good_frame)),
        Case("train-parquet-empty", T("{c}/e.parquet", "--label", "label"), "e.parquet", setup=write("e.parquet", b"")),
        Case("train-parquet-garbage", T("{c}/g.parquet", "--label", "label"), "g.parquet", setup=write("g.parquet", GARBAGE)),
        Case("train-parquet-truncated", T("{c}/t.parquet", "--label", "label"), "t.parquet", setup=truncated("parquet", "t.parquet")),
        Case("train-parquet-duplicate-columns", T("{c}/dup.parquet", "--label", "label"), "dup.parquet", setup=parquet_dup),
        Case("train-npz-empty", T("{c}/e.npz"), "e.npz", setup=write("e.npz", b"")),
        Case("train-npz-garbage", T("{c}/g.npz"), "g.npz", setup=write("g.npz", GARBAGE)),
        Case("train-npz-truncated", T("{c}/t.npz"), "t.npz", setup=truncated("npz", "t.npz")),
        Case("train-npz-bad-member", T("{c}/z.npz"), "z.npz", setup=write("z.npz", zip_garbage())),
        Case("train-npz-no-y", T("{c}/x.npz"), "x.npz", setup=lambda c, fx: np.savez(c / "x.npz", X=np.zeros((5, 2)))),
        Case("train-npz-pickled", T("{c}/p.npz"), "p.npz", setup=lambda c, fx: np.savez(c / "p.npz", X=np.array([_Crafted(str(c / PWNED))] * 4, dtype=object), y=np.arange(4))),
        Case("train-unsupported-suffix", T("{c}/d.txt"), "d.txt", setup=write("d.txt", "1,2\n")),
    ])

    # train: options by declared type and range
    add(_flag_cases("train", TRAIN, [
        ("--epochs", "0", "--epochs"), ("--epochs", "-1", "--epochs"), ("--batch-size", "0", "--batch-size"),
        ("--lr", "nan", "--lr"), ("--lr", "inf", "--lr"), ("--lr", "-0.1", "--lr"), ("--lr", "0", "--lr"),
        ("--momentum", "nan", "--momentum"), ("--momentum", "-1", "--momentum"), ("--momentum", "1.5", "--momentum"),
        ("--weight-decay", "-1", "--weight-decay"), ("--weight-decay", "nan", "--weight-decay"),
        ("--test-fraction", "0", "--test-fraction"), ("--test-fraction", "1", "--test-fraction"), ("--test-fraction", "nan", "--test-fraction"),
        ("--noise", "-0.1", "--noise"), ("--noise", "1.5", "--noise"), ("--noise", "nan", "--noise"),
        ("--max-train", "0", "--max-train"), ("--max-train", "-3", "--max-train"),
        ("--checkpoint-every", "-1", "--checkpoint-every"), ("--seed", "-1", "--seed"),
        ("--threads", "0", "--threads"), ("--threads", "-2", "--threads"),
        ("--model", "nope", "nope"), ("--optimizer", "nope", "nope"), ("--device", "nope", "nope"),
    ], ["--out", "{c}/r"]))
    add(_out_cases("train", TRAIN))

    # attribute
    A = lambda *more: [*ATTR, *more, "--out", "{c}/a"]  # noqa: E731
    add(_run_file_cases("attribute", lambda run: ["attribute", "--run", run, "--targets", "2", "--out", "{c}/a"]))
    add([
        Case("attribute-unknown-method", A("--method", "nope"), "nope"),
        Case("attribute-unknown-property", A("--property", "nope"), "nope"),
        Case("attribute-unknown-aggregate", A("--aggregate", "nope"), "nope"),
        Case("attribute-targets-negative", A("--targets", "-5"), "--targets"),
        Case("attribute-targets-zero", A("--targets", "0"), "--targets"),
        Case("attribute-top-k-negative", A("--top-k", "-1"), "--top-k"),
        Case("attribute-target-ids-unknown", A("--target-ids", "999999"), "999999"),
        Case("attribute-target-ids-not-numbers", A("--target-ids", "a,b"), "--target-ids"),
        Case("attribute-target-ids-empty", A("--target-ids", ","), "--target-ids"),
        Case("attribute-threads-negative", A("--threads", "-1"), "--threads"),
        Case("attribute-device-unknown", A("--device", "tpu"), "tpu"),
        Case("attribute-grouping-unknown", A("--grouping", "nope"), "nope"),
        Case("attribute-grouping-empty-npy", A("--grouping", "{c}/g.npy"), "g.npy", setup=write("g.npy", b"")),
        Case("attribute-grouping-garbage-npy", A("--grouping", "{c}/g.npy"), "g.npy", setup=write("g.npy", GARBAGE)),
        Case("attribute-grouping-truncated-npy", A("--grouping", "{c}/g.npy"), "g.npy", setup=truncated("groups", "g.npy", 0.6)),
        Case("attribute-grouping-dir", A("--grouping", "{c}/gdir"), "gdir", setup=make_dir("gdir")),
        Case("attribute-grouping-empty-csv", A("--grouping", "{c}/g.csv"), "g.csv", setup=write("g.csv", b"")),
        Case("attribute-grouping-garbage-parquet", A("--grouping", "{c}/g.parquet"), "g.parquet", setup=write("g.parquet", GARBAGE)),
        Case("attribute-grouping-wrong-length", A("--grouping", "{c}/g.npy"), "g.npy", setup=save_array("g.npy", lambda: np.arange(7))),
        Case("attribute-grouping-float-ids", A("--grouping", "{c}/g.npy"), "g.npy", setup=save_array("g.npy", lambda: np.full(60, 0.5))),
        Case("attribute-grouping-nan-ids", A("--grouping", "{c}/g.npy"), "g.npy", setup=save_array("g.npy", lambda: np.full(60, np.nan))),
        Case("attribute-grouping-negative-ids", A("--grouping", "{c}/g.npy"), "g.npy", setup=save_array("g.npy", lambda: -np.ones(60, dtype=int))),
        Case("attribute-grouping-2d", A("--grouping", "{c}/g.npy"), "g.npy", setup=save_array("g.npy", lambda: np.zeros((60, 2), dtype=int))),
        Case("attribute-grouping-pickled-npy", A("--grouping", "{c}/g.npy"), "g.npy", setup=lambda c, fx: np.save(c / "g.npy", np.array([_Crafted(str(c / PWNED))] * 60, dtype=object), allow_pickle=True)),
        Case("attribute-grouping-random-zero", A("--grouping", "random:0"), "random:0"),
        Case("attribute-grouping-random-negative", A("--grouping", "random:-3"), "random:-3"),
        Case("attribute-grouping-random-abc", A("--grouping", "random:abc"), "abc"),
        Case("attribute-grouping-random-too-many", A("--grouping", "random:100000"), "100000"),
        Case("attribute-grouping-no-column", A("--grouping", "column"), "column"),
        Case("attribute-grouping-given-escape", A("--grouping", "given:values=../../.."), "given"),
    ])
    for method, opt, match in [
        ("if-cg", "damping=nan", "damping"), ("if-cg", "damping=inf", "damping"), ("if-cg", "damping=-1", "damping"),
        ("if-cg", "max_iter=abc", "max_iter"), ("if-cg", "max_iter=0", "max_iter"), ("if-cg", "max_iter=-1", "max_iter"),
        ("if-cg", "max_iter=2.5", "max_iter"), ("if-cg", "tol=0", "tol"), ("if-cg", "tol=nan", "tol"),
        ("if-cg", "hessian=foo", "foo"), ("if-cg", "seed=-1", "seed"), ("if-cg", "damping_samples=0", "damping_samples"),
        ("if-cg", "weight_decay=-0.5", "weight_decay"), ("if-cg", "max_iter=1e400", "max_iter"),
        ("if-lissa", "depth=0", "depth"), ("if-lissa", "scale=-1", "scale"), ("if-arnoldi", "rank=0", "rank"),
        ("if-explicit", "max_params=-5", "max_params"), ("datainf", "damping_scale=nan", "damping_scale"),
        ("trak", "proj_dim=0", "proj_dim"), ("trak", "projection=nope", "nope"), ("trak", "ridge=-1", "ridge"),
        ("trak", "checkpoints=x", "checkpoints"), ("tracin", "use_lr=maybe", "use_lr"), ("grad-dot", "memory_mb=0", "memory_mb"),
        ("grad-dot", "max_batch=0", "max_batch"), ("grad-dot", "memory_mb=-inf", "memory_mb"), ("grad-dot", "nope=1", "nope"),
        ("grad-dot", "noequals", "noequals"), ("grad-dot", "=3", "=3"), ("repsim", "similarity=nope", "nope"),
        ("grad-dot", "aggregate=nope", "nope"),
    ]:
        cases.append(Case(f"attribute-opt-{method}-{opt}", A("--method", method, "--opt", opt), match))
    add(_out_cases("attribute", ATTR))

    # group
    G = lambda *more: [*GROUP, *more]  # noqa: E731
    add(_run_file_cases("group", lambda run: ["group", "--run", run, "--method", "random", "-k", "5", "--out", "{c}/g.npy"], full=False))
    add([
        Case("group-out-suffix", G("--out", "{c}/g.txt"), "g.txt"),
        Case("group-unknown-method", ["group", "--run", "{run}", "--method", "nope", "-k", "3", "--out", "{c}/g.npy"], "nope"),
        Case("group-k-zero", G("--out", "{c}/g.npy", "-k", "0"), "0"),
        Case("group-k-negative", G("--out", "{c}/g.npy", "-k", "-2"), "-2"),
        Case("group-k-too-many", G("--out", "{c}/g.npy", "-k", "1000"), "1000"),
        Case("group-size-zero", ["group", "--run", "{run}", "--method", "random", "--group-size", "0", "--out", "{c}/g.npy"], "--group-size"),
        Case("group-size-nan", ["group", "--run", "{run}", "--method", "random", "--group-size", "nan", "--out", "{c}/g.npy"], "--group-size"),
        Case("group-seed-negative", G("--out", "{c}/g.npy", "--seed", "-4"), "--seed"),
        Case("group-projection-dim-zero", ["group", "--run", "{run}", "-k", "3", "--projection-dim", "0", "--features", "projected", "--out", "{c}/g.npy"], "projection"),
        Case("group-features-unknown", ["group", "--run", "{run}", "-k", "3", "--features", "nope", "--out", "{c}/g.npy"], "nope"),
        Case("group-layer-unknown", ["group", "--run", "{run}", "--method", "repr-kmeans", "-k", "3", "--layer", "nope", "--out", "{c}/g.npy"], "nope"),
        Case("group-given-values-missing", ["group", "--run", "{run}", "--method", "given", "--values", "{c}/none.npy", "--out", "{c}/g.npy"], "none.npy"),
        Case("group-given-values-empty", ["group", "--run", "{run}", "--method", "given", "--values", "{c}/v.csv", "--out", "{c}/g.npy"], "v.csv", setup=write("v.csv", b"")),
        Case("group-opt-bad-empty-policy", ["group", "--run", "{run}", "--method", "kmeans", "-k", "3", "--opt", "empty=foo", "--out", "{c}/g.npy"], "foo"),
        Case("group-opt-unknown", G("--out", "{c}/g.npy", "--opt", "nope=1"), "nope"),
    ])
    add(_out_cases("group", GROUP, suffix=".npy"))

    # gold
    add(_run_file_cases("gold", lambda run: ["gold", "--run", run, "--n-units", "2", "--targets", "2", "--backend", "serial", "--out", "{c}/gold"], full=False))
    add(_flag_cases("gold", GOLD, [
        ("--n-units", "0", "--n-units"), ("--n-units", "-1", "--n-units"), ("--n-units", "100000", "100000"),
        ("--unit-ids", "abc", "--unit-ids"), ("--unit-ids", "99999", "99999"), ("--unit-ids", "-1", "-1"),
        ("--targets", "0", "--targets"), ("--targets", "-5", "--targets"), ("--epochs", "0", "--epochs"),
        ("--seeds", "0", "--seeds"), ("--lr", "nan", "--lr"), ("--lr", "-1", "--lr"), ("--momentum", "-1", "--momentum"),
        ("--weight-decay", "nan", "--weight-decay"), ("--batch-size", "0", "--batch-size"), ("--removal", "nope", "nope"),
        ("--epsilon", "nan", "--epsilon"), ("--epsilon", "-1", "--epsilon"), ("--epsilon", "2", "--epsilon"),
        ("--record-every", "-1", "--record-every"), ("--path", "nope", "nope"), ("--chunk", "-1", "--chunk"),
        ("--dtype", "nope", "nope"), ("--backend", "nope", "nope"), ("--workers", "0", "--workers"),
        ("--units", "nope", "nope"), ("--units", "random:0", "random:0"), ("--property", "nope", "nope"),
        ("--checkpoint", "{c}/none.pt", "none.pt"), ("--seed-offset", "-1", "--seed-offset"), ("--unit-seed", "-1", "--unit-seed"),
        ("--checkpoint", "{c}/e.pt", "e.pt", write("e.pt", b"")),
        ("--checkpoint", "{c}/g.pt", "g.pt", write("g.pt", GARBAGE)),
        ("--checkpoint", "{c}/t.pt", "t.pt", truncated("checkpoint", "t.pt")),
        ("--checkpoint", "{c}/x.pt", "x.pt", crafted_pickle("x.pt")),
        ("--units", "{c}/u.npy", "u.npy", write("u.npy", b"")),
    ], ["--out", "{c}/gold"]))
    add(_out_cases("gold", GOLD))

    # compare
    C = lambda *more: [*COMPARE, *more, "--out", "{c}/cmp"]  # noqa: E731
    CG = ["compare", "--run", "{run}", "--gold", "{c}/gold", "--methods", "grad-dot", "--out", "{c}/cmp"]
    add([
        Case("compare-gold-missing", ["compare", "--run", "{run}", "--gold", "{c}/nope", "--out", "{c}/cmp"], "nope"),
        Case("compare-gold-not-gold", ["compare", "--run", "{run}", "--gold", "{c}/empty", "--out", "{c}/cmp"], "empty", setup=make_dir("empty")),
        Case("compare-gold-npz-empty", CG, "gold.npz", setup=copy_dir("gold", "gold", put("gold.npz", b""))),
        Case("compare-gold-npz-garbage", CG, "gold.npz", setup=copy_dir("gold", "gold", put("gold.npz", GARBAGE))),
        Case("compare-gold-npz-truncated", CG, "gold.npz", setup=copy_dir("gold", "gold", cut("gold.npz"))),
        Case("compare-gold-json-garbage", CG, "gold.json", setup=copy_dir("gold", "gold", put("gold.json", GARBAGE))),
        Case("compare-grouping-truncated", CG, "grouping.npy", setup=copy_dir("gold", "gold", cut("grouping.npy"))),
        Case("compare-grouping-wrong-length", CG, "grouping.npy", setup=copy_dir("gold", "gold", lambda d: np.save(d / "grouping.npy", np.arange(5)))),
        Case("compare-unknown-method", C("--methods", "nope"), "nope"),
        Case("compare-opt-unknown-scope", C("--opt", "nope:damping=1"), "nope"),
        Case("compare-opt-nan", [*COMPARE[:-1], "if-cg", "--opt", "damping=nan", "--out", "{c}/cmp"], "damping"),
        Case("compare-opt-unknown-option", C("--opt", "grad-dot:nope=1"), "nope"),
        Case("compare-variant-unknown", C("--variant", "nope"), "nope"),
        Case("compare-seed-windows-abc", C("--seed-windows", "abc"), "--seed-windows"),
        Case("compare-seed-windows-zero", C("--seed-windows", "0"), "--seed-windows"),
        Case("compare-other-run", ["compare", "--run", "{other}", "--gold", "{gold}", "--methods", "grad-dot", "--out", "{c}/cmp"], "training points"),
    ])
    add(_run_file_cases("compare", lambda run: ["compare", "--run", run, "--gold", "{gold}", "--methods", "grad-dot", "--out", "{c}/cmp"], full=False)[:6])
    add(_out_cases("compare", COMPARE))

    # evaluate
    E = lambda *more: [*EVAL, *more, "--out", "{c}/ev"]  # noqa: E731
    P = ["evaluate", "prune", "--run", "{run}", "--scores", "{c}/att", "--out", "{c}/ev"]
    add(_run_file_cases("evaluate", lambda run: ["evaluate", "retraining", "--run", run, "--scores", "{att}", "--seeds", "1", "--out", "{c}/ev"], full=False)[:6])
    add(_flag_cases("evaluate-retraining", EVAL, [
        ("--fractions", "abc", "--fractions"), ("--fractions", ",", "--fractions"), ("--fractions", "-0.1", "--fractions"),
        ("--fractions", "1.5", "--fractions"), ("--fractions", "nan", "--fractions"), ("--seeds", "0", "--seeds"),
        ("--seeds", "-1", "--seeds"), ("--epochs", "0", "--epochs"), ("--epochs", "-1", "--epochs"), ("--fill", "nope", "nope"),
        ("--backend", "nope", "nope"), ("--workers", "0", "--workers"), ("--mode", "nope", "nope"),
        ("--method", "nope", "nope"), ("--store", "{c}/taken", "taken", file_at("taken")),
    ], ["--out", "{c}/ev"]))
    add([
        Case("evaluate-nothing", ["evaluate", "retraining", "--run", "{run}", "--out", "{c}/ev"], "--scores"),
        Case("evaluate-method-bad-option", E("--method", "if-cg", "--opt", "damping=nan"), "damping"),
        Case("evaluate-method-bad-grouping", E("--method", "grad-dot", "--grouping", "random:0"), "random:0"),
        Case("evaluate-scores-missing", ["evaluate", "prune", "--run", "{run}", "--scores", "{c}/nope", "--out", "{c}/ev"], "nope"),
        Case("evaluate-scores-no-file", P, "scores.npy", setup=make_dir("att")),
        Case("evaluate-scores-empty", P, "scores.npy", setup=copy_dir("att", "att", put("scores.npy", b""))),
        Case("evaluate-scores-truncated", P, "scores.npy", setup=copy_dir("att", "att", cut("scores.npy"))),
        Case("evaluate-scores-wrong-shape", P, "scores.npy", setup=copy_dir("att", "att", lambda d: np.save(d / "scores.npy", np.zeros((2, 7))))),
        Case("evaluate-scores-nan", P, "scores.npy", setup=copy_dir("att", "att", lambda d: np.save(d / "scores.npy", np.full((2, 60), np.nan)))),
        Case("evaluate-groups-truncated", P, "groups.npy", setup=copy_dir("att", "att", cut("groups.npy"))),
        Case("evaluate-meta-garbage", P, "meta.json", setup=copy_dir("att", "att", put("meta.json", GARBAGE))),
        Case("evaluate-lds-subsets-zero", [*LDS, "--subsets", "0", "--out", "{c}/ev"], "--subsets"),
        Case("evaluate-lds-subsets-two", [*LDS, "--subsets", "2", "--out", "{c}/ev"], "--subsets"),
        Case("evaluate-lds-alpha-zero", [*LDS, "--alpha", "0", "--out", "{c}/ev"], "--alpha"),
        Case("evaluate-lds-alpha-nan", [*LDS, "--alpha", "nan", "--out", "{c}/ev"], "--alpha"),
        Case("evaluate-lds-alpha-one", [*LDS, "--alpha", "1.5", "--out", "{c}/ev"], "--alpha"),
        Case("evaluate-lds-targets-zero", [*LDS, "--targets", "0", "--out", "{c}/ev"], "--targets"),
        Case("evaluate-lds-mean-loss-scores", ["evaluate", "lds", "--run", "{run}", "--scores", "{c}/att", "--out", "{c}/ev"], "mean test loss", setup=copy_dir("att", "att", edit_json("meta.json", lambda m: {**m, "property": "mean-test-loss"}))),
        Case("evaluate-noisy-clean-run", ["evaluate", "noisy", "--run", "{run}", "--method", "grad-dot", "--out", "{c}/ev"], "--noise"),
        Case("evaluate-noisy-nothing", ["evaluate", "noisy", "--run", "{run}", "--out", "{c}/ev"], "--method"),
    ])
    add(_out_cases("evaluate", EVAL))

    # features
    B = lambda *more: [*BUILD, *more, "--out", "{c}/st"]  # noqa: E731
    S = lambda *more: [*SCORE, *more, "--out", "{c}/sc"]  # noqa: E731
    SS = ["features", "score", "--run", "{run}", "--store", "{c}/st", "--targets", "2", "--out", "{c}/sc"]
    add(_run_file_cases("features", lambda run: ["features", "build", "--run", run, "--out", "{c}/st"], full=False)[:6])
    add([
        Case("features-build-projection-unknown", B("--projection", "nope"), "nope"),
        Case("features-build-proj-dim-zero", B("--projection", "gaussian", "--proj-dim", "0"), "--proj-dim"),
        Case("features-build-proj-dim-missing", B("--projection", "gaussian"), "--proj-dim"),
        Case("features-build-chunk-rows-zero", B("--chunk-rows", "0"), "--chunk-rows"),
        Case("features-build-dtype-unknown", B("--dtype", "int8"), "int8"),
        Case("features-build-memory-zero", B("--memory-mb", "0"), "--memory-mb"),
        Case("features-build-memory-nan", B("--memory-mb", "nan"), "--memory-mb"),
        Case("features-build-backend-unknown", B("--backend", "nope"), "nope"),
        Case("features-build-address-without-ray", B("--address", "auto"), "--address"),
        Case("features-build-workers-zero", B("--backend", "local", "--workers", "0"), "--workers"),
        Case("features-build-seed-negative", B("--seed", "-1"), "--seed"),
        Case("features-build-grouping-bad", B("--grouping", "random:0"), "random:0"),
        Case("features-score-store-missing", ["features", "score", "--run", "{run}", "--store", "{c}/nope", "--out", "{c}/sc"], "nope"),
        Case("features-score-store-not-store", ["features", "score", "--run", "{run}", "--store", "{c}/d", "--out", "{c}/sc"], "d", setup=make_dir("d")),
        Case("features-score-manifest-garbage", SS, "manifest.json", setup=copy_dir("store", "st", put("manifest.json", GARBAGE))),
        Case("features-score-manifest-empty", SS, "manifest.json", setup=copy_dir("store", "st", put("manifest.json", b""))),
        Case("features-score-chunk-garbage", SS, "c000000", setup=copy_dir("store", "st", garble("chunks/c000000.npy"))),
        Case("features-score-chunk-truncated", SS, "c000000", setup=copy_dir("store", "st", cut("chunks/c000000.npy"))),
        Case("features-score-chunk-missing", SS, "chunk", setup=copy_dir("store", "st", remove("chunks/c000000.npy"))),
        Case("features-score-kernel-unknown", S("--kernel", "nope"), "nope"),
        Case("features-score-kernel-escape", S("--kernel", "../../X"), "../../X"),
        Case("features-score-damping-nan", S("--kernel", "fisher", "--damping", "nan"), "--damping"),
        Case("features-score-damping-negative", S("--kernel", "fisher", "--damping", "-1"), "--damping"),
        Case("features-score-top-k-negative", S("--top-k", "-1"), "--top-k"),
        Case("features-score-bottom-k-negative", S("--bottom-k", "-1"), "--bottom-k"),
        Case("features-score-targets-negative", S("--targets", "-5"), "--targets"),
        Case("features-score-target-block-zero", S("--target-block", "0"), "--target-block"),
        Case("features-score-aggregate-unknown", S("--aggregate", "nope"), "nope"),
        Case("features-score-property-unknown", S("--property", "nope"), "nope"),
        Case("features-score-other-run", ["features", "score", "--run", "{other}", "--store", "{store}", "--out", "{c}/sc"], "store"),
        Case("features-info-missing", ["features", "info", "--store", "{c}/nope"], "nope"),
        Case("features-info-manifest-garbage", ["features", "info", "--store", "{c}/st"], "manifest.json", setup=copy_dir("store", "st", put("manifest.json", GARBAGE))),
    ])
    add(_out_cases("features-build", BUILD))
    add(_out_cases("features-score", SCORE))

    # experiment: everything refused before any training
    add(_flag_cases("experiment", EXPERIMENT, [
        ("--ks", "n/0", "n/0"), ("--ks", "n/abc", "n/abc"), ("--ks", "0", "0"), ("--ks", "-5", "-5"), ("--ks", "abc", "abc"),
        ("--ks", "n/inf", "n/inf"), ("--methods", "nope", "nope"), ("--groupings", "nope", "nope"),
        ("--fractions", "abc", "--fractions"), ("--fractions", "1", "--fractions"), ("--seeds", "0", "--seeds"),
        ("--lds-subsets", "-1", "--lds-subsets"), ("--lds-subsets", "2", "--lds-subsets"), ("--lds-alpha", "nan", "--lds-alpha"),
        ("--lds-targets", "0", "--lds-targets"), ("--noise", "-1", "--noise"), ("--noise", "1.5", "--noise"),
        ("--epochs", "0", "--epochs"), ("--lr", "nan", "--lr"), ("--batch-size", "0", "--batch-size"),
        ("--data", "nope", "nope"), ("--data", "{c}/x.csv", "experiment", frame_csv("x.csv", good_frame)),
        ("--data", "{c}/none.npz", "none.npz"), ("--model", "nope", "nope"), ("--noisy-model", "nope", "nope"),
        ("--opt", "damping=1", "--opt"), ("--opt", "grad-dot:nope=1", "nope"), ("--opt", "if-cg:damping=nan", "if-cg"),
        ("--gopt", "bad", "--gopt"), ("--gopt", "kmeans:x=1", "kmeans"), ("--max-train", "0", "--max-train"),
        ("--backend", "nope", "nope"), ("--workers", "0", "--workers"), ("--optimizer", "nope", "nope"),
        ("--weight-decay", "-1", "--weight-decay"), ("--gold-compare", "{c}/nope", "nope"),
        ("--prune-fractions", "2", "--prune-fractions"), ("--seed", "-1", "--seed"),
    ], ["--out", "{c}/x"]))
    add([Case("experiment-opt-nan", [*EXPERIMENT, "--methods", "if-cg", "--opt", "if-cg:damping=nan", "--out", "{c}/x"], "damping")])
    add(_out_cases("experiment", EXPERIMENT))
    return cases

# fmt: on

CASES = build_cases()


def build_fixtures(root: Path) -> Fixtures:
    """One tiny run (digits, 60 points, 2 epochs, 2 checkpoints), an attribution, a gold
    standard, a feature store, a grouping, a second run of another size, and good files."""
    fx = Fixtures(root)
    base = root / "fixtures"
    p = {k: base / k for k in ("run", "other", "att", "gold", "store")}
    p["groups"] = base / "groups.npy"
    # fmt: off
    for args in (
        ["train", "--data", "digits", "--out", p["run"], "--epochs", 2, "--max-train", 60, "--checkpoint-every", 1, "--threads", 1],
        ["train", "--data", "digits", "--out", p["other"], "--model", "logreg", "--epochs", 1, "--max-train", 30, "--threads", 1],
        ["attribute", "--run", p["run"], "--targets", 2, "--out", p["att"]],
        ["gold", "--run", p["run"], "--n-units", 2, "--targets", 2, "--backend", "serial", "--out", p["gold"]],
        ["features", "build", "--run", p["run"], "--out", p["store"]],
        ["group", "--run", p["run"], "--method", "random", "-k", 6, "--out", p["groups"]],
    ):  # fmt: on
        res = run_cli(args)
        assert res.code == 0, (args, res.out, res.err)
    p["checkpoint"] = p["run"] / "checkpoints" / "epoch_0001.pt"
    good = base / "good"
    good.mkdir()
    frame = good_frame()
    p["parquet"] = good / "good.parquet"
    frame.to_parquet(p["parquet"])
    p["npz"] = good / "good.npz"
    np.savez(p["npz"], X=frame[["x1", "x2"]].to_numpy(), y=frame["label"].to_numpy())
    fx.paths = {k: str(v) for k, v in p.items()}
    return fx


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixtures:
    return build_fixtures(tmp_path_factory.mktemp("fuzz"))


def _params():
    for case in CASES:
        yield pytest.param(case, id=case.id, marks=[pytest.mark.slow] if case.slow else [])


@pytest.mark.parametrize("case", list(_params()))
def test_case(case: Case, fx: Fixtures) -> None:
    res, problems = check(case, fx, fx.root / "cases" / case.id.replace("/", "_"))
    assert not problems, f"{case.id}: {problems}\nstdout: {res.out[-2000:]}\nstderr: {res.err[-3000:]}"


def test_table_covers_every_command() -> None:
    assert len(CASES) >= 180 and len({c.id for c in CASES}) == len(CASES)
    commands = {str(c.args[0]) for c in CASES if c.args and not str(c.args[0]).startswith("-")}
    assert {"train", "attribute", "group", "gold", "compare", "evaluate", "experiment", "features",
            "datasets", "methods"} <= commands  # fmt: skip


def test_debug_shows_the_traceback(fx: Fixtures) -> None:
    """Tracebacks only with --debug: the same bad input raises instead of printing one line."""
    args = ["attribute", "--run", fx.paths["run"], "--method", "if-cg", "--opt", "damping=nan"]
    assert run_cli(args).error_lines
    with pytest.raises(GGDAError, match="damping"):
        main(["--debug", *args])


# -- property-based: random CSV contents and option values --------------------------------------

_CELL = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(-5, 5),
    st.sampled_from(["", " ", "abc", "nan", "inf", "1e309", "-", "0x1", '"', "1,5", "None", "é"]),
    st.none(),
)


@st.composite
def csv_frames(draw) -> pd.DataFrame:
    n = draw(st.integers(0, 12))
    n_features = draw(st.integers(0, 3))
    columns = {f"x{j}": draw(st.lists(_CELL, min_size=n, max_size=n)) for j in range(n_features)}
    columns["label"] = draw(st.lists(st.one_of(st.integers(0, 2), _CELL), min_size=n, max_size=n))
    if draw(st.booleans()) and n_features:
        columns["label_copy"] = list(columns["label"])  # a duplicate of the label
    return pd.DataFrame(columns)


def _dataset_is_sane(data) -> None:
    X, y = np.asarray(data.X, dtype=float), np.asarray(data.y)
    assert len(X) == len(y) > 0 and np.isfinite(X).all()
    assert np.issubdtype(y.dtype, np.integer) and y.min() >= 0 and len(np.unique(y)) >= 2


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=csv_frames())
def test_csv_contents_load_or_one_error(frame: pd.DataFrame) -> None:
    """Any CSV either loads as a sane data set (finite features, >= 2 classes) or raises one
    GGDAError naming the fix; never another exception."""
    from ggda.data.files import load_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        frame.to_csv(path, index=False)
        try:
            data = load_file(path, label="label")
        except GGDAError as exc:
            assert "\n" not in str(exc)
            return
        _dataset_is_sane(data)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(blob=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".parquet", ".npz"]))
def test_arbitrary_bytes_load_or_one_error(blob: bytes, suffix: str) -> None:
    from ggda.data.files import load_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(blob)
        try:
            data = load_file(path, label="label")
        except GGDAError:
            return
        _dataset_is_sane(data)


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=csv_frames())
def test_csv_through_train_command(frame: pd.DataFrame) -> None:
    """End to end: ``ggda train`` on a random CSV exits 0 with a run, or 2 with one error line
    and no run directory left behind."""
    with tempfile.TemporaryDirectory() as tmp:
        frame.to_csv(Path(tmp) / "d.csv", index=False)
        out = Path(tmp) / "run"
        res = run_cli(["train", "--data", Path(tmp) / "d.csv", "--label", "label", "--model", "logreg",
                       "--epochs", 1, "--out", out])  # fmt: skip
        assert not res.traceback, res.err
        if res.code == 0:
            assert (out / "run.json").exists()
        else:
            assert res.code == 2 and len(res.error_lines) == 1, res.err
            assert not out.exists()


def _method_scalar_options():
    import ggda.methods  # noqa: F401
    from ggda.methods.base import METHODS
    from ggda.options import _constructor_params, method_option_spec

    return [(name, opt) for name, cls in sorted(METHODS.items()) for opt in sorted(_constructor_params(cls))
            if method_option_spec(cls, opt) is not None]  # fmt: skip


_VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1", "abc", "", "true", "none", "1e309", "2.5", "1e3"]),
    st.text(max_size=6),
)


@pytest.fixture(scope="module")
def tiny_task():
    import torch

    from ggda.task import AttributionTask

    torch.manual_seed(0)
    return AttributionTask(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_method_option_values(data, tiny_task) -> None:
    """``--opt KEY=VALUE`` for any method, any scalar option and any text: the method is built
    with a value of the declared type and range, or one GGDAError names the option."""
    from ggda.cli.main import parse_options
    from ggda.methods import make_method
    from ggda.methods.base import METHODS
    from ggda.options import method_option_spec

    name, key = data.draw(st.sampled_from(_METHOD_OPTIONS))
    raw = data.draw(_VALUE)
    try:
        options = parse_options([f"{key}={raw}"])
        method = make_method(name, tiny_task, **options)
    except GGDAError as exc:
        assert "\n" not in str(exc)
        return
    spec = method_option_spec(METHODS[name], key)
    value = options[key]
    if spec.kind in (int, float) and value is not None:
        number = float(value)
        assert math.isfinite(number) and (spec.low is None or number >= spec.low), (name, key, raw)
    assert method is not None


_METHOD_OPTIONS = _method_scalar_options()


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.text(max_size=8), st.none(), st.booleans()),
    kind=st.sampled_from([int, float, bool, str]),
    low=st.one_of(st.none(), st.integers(-3, 3)),
    low_open=st.booleans(),
)  # fmt: skip
def test_check_returns_a_valid_value_or_refuses(value, kind, low, low_open) -> None:
    from ggda.options import Spec, check

    spec = Spec(kind, low, None, low_open)
    try:
        out = check("opt", value, spec, flag="--opt")
    except GGDAError as exc:
        assert "--opt" in str(exc) or "opt=" in str(exc)
        return
    assert isinstance(out, kind) and not (kind is int and isinstance(out, bool))
    if kind in (int, float):
        assert math.isfinite(out)
        if low is not None:
            assert out > low if low_open else out >= low


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(targets=_VALUE, top_k=_VALUE)
def test_attribute_numeric_options(fx: Fixtures, targets: str, top_k: str) -> None:
    """Any text for ``--targets``/``--top-k``: exit 0 with scores, or 2 with one error line and
    nothing written."""
    with tempfile.TemporaryDirectory(dir=fx.root) as tmp:
        out = Path(tmp) / "a"
        res = run_cli(
            ["attribute", "--run", fx.paths["run"], f"--targets={targets}", f"--top-k={top_k}", "--out", out]
        )
        assert not res.traceback, res.err
        if res.code == 0:
            assert (out / "scores.npy").exists()
        else:
            assert res.code == 2 and len(res.error_lines) == 1, res.err
            assert not out.exists()


# -- a report of every case (the counts) --------------------------------------------------

if __name__ == "__main__":
    import time

    only = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fixtures = build_fixtures(Path(tmp))
        print(f"fixtures {time.perf_counter() - t0:.1f}s", flush=True)
        counts: dict[str, int] = {}
        ran = 0
        for case in CASES:
            if only and not any(o in case.id for o in only):
                continue
            ran += 1
            t1 = time.perf_counter()
            res, problems = check(case, fixtures, Path(tmp) / "cases" / case.id.replace("/", "_"))
            for prob in problems:
                kind = prob.split(":")[0].split(" (")[0]
                counts[kind] = counts.get(kind, 0) + 1
            shown = (res.error_lines or res.err.strip().splitlines()[-1:] or [""])[0]
            print(f"{'ok  ' if not problems else 'FAIL'} {time.perf_counter() - t1:5.2f}s {case.id}: "
                  f"{'; '.join(problems)} | code={res.code} | {shown[:200]}", flush=True)  # fmt: skip
        print(f"{ran} cases; problems: {counts or 'none'}; {time.perf_counter() - t0:.1f}s")
