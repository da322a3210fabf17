"""Nothing silently wrong, no code from data (issue 17, parts 2 and 3).

* Stored results (``ResultStore``), feature-store chunks and ``gold.npz`` carry checksums that are
  verified on read: a damaged file is recomputed where the producer resumes, and is otherwise an
  error naming the file — never used.
* Every file is written atomically: a full disk leaves neither a truncated file nor a ``*.part``.
* Model files load with ``weights_only=True``: a crafted pickle runs no code and is one error line.
* A model file of another architecture than the run records is refused by name.
* The HTML report escapes user-controlled names; names that become paths stay in their directory.
"""

from __future__ import annotations

import builtins
import html
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ggda.errors import GGDAError
from ggda.execution import ResultStore, SerialExecutor
from ggda.execution.jobs import Job
from ggda.io import CorruptFile, atomic_write, save_npy
from ggda.paths import confined_path, safe_name

GGDA = [sys.executable, "-c", "import sys; from ggda.cli.main import main; sys.argv[0] = 'ggda'; main()"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def ggda(*args, cwd=None, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*GGDA, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd, preexec_fn=preexec_fn
    )


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with exit 2 and exactly one ``error:`` line (no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# -- result store ---------------------------------------------------------------------------------
def square_job(x: float) -> dict:
    square_job.calls += 1  # type: ignore[attr-defined]
    return {"value": np.array([x * x])}


square_job.calls = 0  # type: ignore[attr-defined]


def _other_npz(path: Path, **arrays) -> None:
    """Overwrite a stored .npz with a *valid* archive holding other numbers (what checksums catch)."""
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def test_result_store_roundtrip_and_checksums_in_json(tmp_path):
    store = ResultStore(tmp_path)
    store.put("k", {"a": np.arange(4.0)}, {"seconds": 1.5, "note": "x"})
    arrays, meta = store.get("k")
    assert np.array_equal(arrays["a"], np.arange(4.0)) and meta == {"seconds": 1.5, "note": "x"}
    assert store.has("k") and store.keys() == ["k"]
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("damage", ["other-numbers", "garbage", "truncated", "empty"])
def test_damaged_result_npz_is_recomputed_or_refused(tmp_path, damage):
    store = ResultStore(tmp_path)
    store.put("k", {"value": np.array([4.0])})
    npz = tmp_path / "k.npz"
    if damage == "other-numbers":
        _other_npz(npz, value=np.array([-3e30]))
    elif damage == "garbage":
        npz.write_bytes(os.urandom(300))
    elif damage == "truncated":
        npz.write_bytes(npz.read_bytes()[:40])
    else:
        npz.write_bytes(b"")
    # a reader that cannot recompute gets one error naming the file (not BadZipFile, not -3e30)
    with pytest.raises(CorruptFile, match=r"k\.npz"):
        ResultStore(tmp_path).get("k")
    # an executor recomputes it: has() reports it missing (with a warning) and the job runs again
    with pytest.warns(RuntimeWarning, match=r"k\.npz"):
        assert not ResultStore(tmp_path).has("k")
    square_job.calls = 0
    ran = SerialExecutor().run([Job("k", square_job, {"x": 2.0})], ResultStore(tmp_path))
    assert ran == 1 and square_job.calls == 1
    assert ResultStore(tmp_path).get("k")[0]["value"][0] == 4.0


@pytest.mark.parametrize("damage", ["truncated", "edited"])
def test_damaged_result_json_is_an_error_naming_it(tmp_path, damage):
    store = ResultStore(tmp_path)
    store.put("k", {"value": np.array([1.0])}, {"seconds": 2.0})
    js = tmp_path / "k.json"
    if damage == "truncated":
        js.write_bytes(js.read_bytes()[:25])
    else:
        js.write_text(js.read_text().replace('"seconds": 2.0', '"seconds": 9.0'))
    with pytest.raises(CorruptFile, match=r"k\.json") as err:
        ResultStore(tmp_path).get("k")
    assert "\n" not in str(err.value)
    with pytest.warns(RuntimeWarning):
        assert not ResultStore(tmp_path).has("k")


def test_intact_results_are_not_rerun(tmp_path):
    square_job.calls = 0
    jobs = [Job(f"j{i}", square_job, {"x": float(i)}) for i in range(3)]
    assert SerialExecutor().run(jobs, ResultStore(tmp_path)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SerialExecutor().run(jobs, ResultStore(tmp_path)) == 0
    assert square_job.calls == 3


def test_version1_results_still_load(tmp_path):
    np.savez(tmp_path / "old.npz", v=np.arange(3))
    (tmp_path / "old.json").write_text('{"seconds": 1.0}')
    arrays, meta = ResultStore(tmp_path).get("old")
    assert np.array_equal(arrays["v"], np.arange(3)) and meta == {"seconds": 1.0}
    (tmp_path / "old.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CorruptFile, match=r"old\.npz"):
        ResultStore(tmp_path).get("old")


# -- gold -----------------------------------------------------------------------------------------
def _tiny_gold(out: Path):
    from ggda.data.grouping import Grouping
    from ggda.gold import GoldConfig, compute_gold, select_units
    from ggda.properties import ExampleLoss
    from ggda.task import AttributionTask

    rng = np.random.default_rng(0)
    X = rng.normal(size=(46, 4))
    y = (X[:, 0] > 0).astype(np.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2)).double()
    units = select_units(Grouping.singleton(40), ids=[0, 3, 7, 11])
    config = GoldConfig(epochs=1, seeds=2, lr=0.3, batch_size=16, chunk=2, path="vectorised")
    return compute_gold(
        AttributionTask(model), X[:40], y[:40], ExampleLoss(X[40:], y[40:]), units, config, out=out
    )


def test_gold_recomputes_damaged_stored_results_and_checks_gold_npz(tmp_path):
    from ggda.gold import GoldResult

    first = _tiny_gold(tmp_path)
    store = ResultStore(tmp_path / "store")
    keys = store.keys()
    values = store.get(keys[0])[0]["values"]
    _other_npz(store.root / f"{keys[0]}.npz", values=values + 239.0)  # valid archive, wrong numbers
    (store.root / f"{keys[1]}.npz").write_bytes(os.urandom(200))  # garbage
    with pytest.warns(RuntimeWarning, match="Recomputing"):
        again = _tiny_gold(tmp_path)
    assert again.meta["jobs_run_now"] == 2
    for name in ("gold", "gold_raw", "loo", "full"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    assert np.array_equal(GoldResult.load(tmp_path).gold, first.gold)
    # gold.npz itself: overwritten with other numbers, truncated, or its gold.json damaged
    gold = tmp_path / "gold.npz"
    intact = gold.read_bytes()
    _other_npz(gold, **{k: getattr(first, k) + 1.0 for k in GoldResult.ARRAYS})
    with pytest.raises(CorruptFile, match=r"gold\.npz"):
        GoldResult.load(tmp_path)
    gold.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(CorruptFile, match=r"gold\.npz"):
        GoldResult.load(tmp_path)
    gold.write_bytes(intact)
    (tmp_path / "gold.json").write_text("{ not json")
    with pytest.raises(CorruptFile, match=r"gold\.json"):
        GoldResult.load(tmp_path)


# -- feature store --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_task():
    from ggda.task import AttributionTask

    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    torch.manual_seed(0)
    return AttributionTask(nn.Sequential(nn.Linear(5, 2))), X, y


@pytest.mark.parametrize("executor", [None, "serial"])
def test_damaged_store_chunk_is_refused_then_rebuilt(tiny_task, tmp_path, executor):
    from ggda.properties import ExampleLoss
    from ggda.store import FeatureStore, build_gradient_store, score_store, target_features

    task, X, y = tiny_task
    ex = SerialExecutor() if executor else None
    store = build_gradient_store(tmp_path / "s", task, X, y, chunk_rows=8, executor=ex)
    assert store.complete and len(store.manifest["checksums"]) == store.n_chunks == 4
    original = [store.chunk_path(c).read_bytes() for c in range(4)]
    Q = target_features(store, task, ExampleLoss(X[:3], y[:3]))
    good = score_store(store, Q, top_k=3, full="memory").scores
    # chunk 1 overwritten with a *valid* .npy of the right shape holding garbage numbers
    np.save(store.chunk_path(1), np.full((8, store.dim), -3e30, dtype=np.float32))
    reopened = FeatureStore.open(tmp_path / "s")
    with pytest.raises(CorruptFile, match=r"c000001\.npy"):
        score_store(reopened, Q, top_k=3)
    with pytest.raises(CorruptFile, match=r"c000001\.npy"):
        reopened.to_array()
    # chunk 2 truncated as well; a resumed build recomputes both, byte-identical
    store.chunk_path(2).write_bytes(original[2][:50])
    with pytest.warns(RuntimeWarning, match="Recomputing"):
        rebuilt = build_gradient_store(tmp_path / "s", task, X, y, chunk_rows=8, executor=ex)
    assert rebuilt.complete
    assert [rebuilt.chunk_path(c).read_bytes() for c in range(4)] == original
    np.testing.assert_array_equal(score_store(rebuilt, Q, top_k=3, full="memory").scores, good)


def test_store_never_marked_complete_with_a_damaged_chunk(tiny_task, tmp_path):
    from ggda.store import FeatureStore, build_gradient_store

    task, X, y = tiny_task
    store = build_gradient_store(tmp_path / "s", task, X, y, chunk_rows=8)
    store.chunk_path(3).write_bytes(store.chunk_path(3).read_bytes()[:-8])
    fresh = FeatureStore.open(tmp_path / "s")
    with pytest.warns(RuntimeWarning), pytest.raises(GGDAError, match="misses 1 chunk"):
        fresh.finalize()
    assert not FeatureStore.open(tmp_path / "s").complete


@pytest.mark.parametrize("content", [b"", b"{ truncated", b'{"format": "ggda-feature-store", "version": 2}'])
def test_damaged_manifest_is_an_error_naming_it(tiny_task, tmp_path, content):
    from ggda.store import FeatureStore

    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(GGDAError, match="manifest.json|not a version"):
        FeatureStore.open(tmp_path)


def test_store_sizes_are_checksummed(tiny_task, tmp_path):
    from ggda.groups import random_grouping
    from ggda.store import build_gradient_store

    task, X, y = tiny_task
    store = build_gradient_store(tmp_path / "s", task, X, y, random_grouping(len(X), 6, seed=0), chunk_rows=4)
    assert store.sizes().sum() == len(X)
    np.save(store.path / "sizes.npy", np.ones(6, dtype=np.int64))
    with pytest.raises(CorruptFile, match=r"sizes\.npy"):
        store.sizes()


# -- atomic writes --------------------------------------------------------------------------------
def test_atomic_write_failure_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "scores.npy"
    save_npy(target, np.arange(5))

    def broken(fh):
        fh.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    with pytest.raises(GGDAError, match=r"Could not write .*scores\.npy \(No space left on device\)"):
        atomic_write(target, broken)
    assert np.array_equal(np.load(target), np.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npy"]


DISK_FULL = """
import resource, signal, sys
import numpy as np
import torch
from ggda.errors import GGDAError
{setup}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, not a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    {action}
except GGDAError as exc:
    print("error:", exc)
"""
z = "np.zeros((1, 1, 1, 50_000))"
DISK_FULL_CASES = {
    "scores": ("from ggda.io import save_npy", "save_npy(sys.argv[1] + '/scores.npy', np.zeros(100_000))"),
    "grouping": (
        "from ggda.data.grouping import Grouping",
        "Grouping(np.arange(100_000) % 7).save(sys.argv[1] + '/groups.npy')",
    ),
    "gold": (
        f"from ggda.gold import GoldResult; z = {z}",
        "GoldResult(z[0], z[0], z[0], z, z[..., 0], np.zeros(1), np.zeros(1), np.arange(50_000), "
        "np.ones(50_000)).save(sys.argv[1])",
    ),
    "result-store": (
        "from ggda.execution import ResultStore; store = ResultStore(sys.argv[1])",
        "store.put('k', {'a': np.zeros(100_000)})",
    ),
    "model": (
        "from ggda.models.checkpoint import save_model",
        "save_model(sys.argv[1] + '/model.pt', torch.nn.Linear(300, 300))",
    ),
    "report": (
        "from ggda.io import write_text",
        "write_text(sys.argv[1] + '/index.html', '<p>' * 10_000)",
    ),
}


@pytest.mark.parametrize("case", sorted(DISK_FULL_CASES))
def test_disk_full_leaves_no_truncated_file_and_no_part(tmp_path, case):
    setup, action = DISK_FULL_CASES[case]
    code = DISK_FULL.format(setup=setup, action=action)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("error: Could not write"), proc.stdout + proc.stderr[-1000:]
    assert "File too large" in proc.stdout and proc.stdout.count("\n") == 1
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert left == [], left


def test_attribute_under_a_full_disk_leaves_no_scores(fresh_run, tmp_path):
    """`ggda attribute` whose scores.npy does not fit: one error line, no truncated scores.npy."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    out = tmp_path / "attr"
    proc = ggda("attribute", "--run", fresh_run, "--targets", 20, "--out", out, preexec_fn=limit)
    one_error_line(proc, "scores.npy", "File too large")
    assert not out.exists() or [p.name for p in out.iterdir()] == []


# -- model files: no code from data ---------------------------------------------------------------
class Evil:
    """Unpickling this calls ``open(marker, "w")``: creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from ggda.models.training import TrainConfig
    from ggda.runs import DataSpec, Run

    path = tmp_path_factory.mktemp("integrity") / "run"
    Run.create(
        path,
        DataSpec("digits", max_train=60),
        "logreg",
        TrainConfig(epochs=2, lr=0.1, batch_size=32, checkpoint_every=1),
    )
    return path


@pytest.fixture
def fresh_run(run_dir, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(run_dir, path)
    return path


def _crafted(path: Path, marker: Path, kind: str) -> None:
    if kind == "torch-zip":  # a real torch file whose metadata hides the payload
        sd = nn.Linear(64, 10).state_dict()
        torch.save({"spec": None, "state_dict": sd, "meta": {"epoch": Evil(marker)}}, path)
    else:  # a bare pickle stream
        path.write_bytes(pickle.dumps({"state_dict": Evil(marker)}))


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_crafted_model_file_runs_no_code_api(fresh_run, tmp_path, kind):
    from ggda.models.checkpoint import load_model, load_state
    from ggda.runs import Run

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _crafted(evil, marker, kind)
    for call in (
        lambda: load_state(evil),
        lambda: load_model(evil),
        lambda: Run.load(fresh_run).task(checkpoint=evil),  # `ggda gold --checkpoint evil.pt`
    ):
        with pytest.raises(GGDAError, match="evil.pt") as err:
            call()
        assert "\n" not in str(err.value)
    shutil.copy(evil, fresh_run / "model.pt")
    with pytest.raises(GGDAError, match="model.pt"):
        Run.load(fresh_run)
    shutil.copy(evil, next((fresh_run / "checkpoints").glob("*.pt")))
    assert not marker.exists()


def test_crafted_model_file_runs_no_code_cli(fresh_run, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _crafted(evil, marker, "raw-pickle")
    proc = ggda(
        "gold", "--run", fresh_run, "--checkpoint", evil, "--out", tmp_path / "g", "--backend", "serial"
    )
    one_error_line(proc, "evil.pt", "does not unpickle")
    _crafted(fresh_run / "model.pt", marker, "torch-zip")
    one_error_line(ggda("attribute", "--run", fresh_run, "--targets", 2), "model.pt", "does not unpickle")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "text"])
def test_damaged_model_file_is_one_error_line(fresh_run, damage):
    from ggda.runs import Run

    model = fresh_run / "model.pt"
    data = model.read_bytes()
    model.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "text": b"hello"}[damage])
    with pytest.raises(GGDAError, match="model.pt") as err:
        Run.load(fresh_run)
    assert "not a readable model file" in str(err.value) or "does not unpickle" in str(err.value)


def test_saved_models_load_with_weights_only(run_dir):
    for f in [run_dir / "model.pt", *sorted((run_dir / "checkpoints").glob("*.pt"))]:
        payload = torch.load(f, weights_only=True)
        assert isinstance(payload["spec"], dict) and isinstance(payload["meta"], dict)


# -- architecture mismatch ------------------------------------------------------------------------
def test_model_of_another_architecture_is_refused_by_name(fresh_run):
    from ggda.models import build_model, save_model
    from ggda.runs import Run

    save_model(fresh_run / "model.pt", build_model("mlp-s", 64, 10, seed=0))
    with pytest.raises(GGDAError, match=r"model\.pt holds a 'mlp-s'.*run records 'logreg'"):
        Run.load(fresh_run)
    save_model(fresh_run / "model.pt", build_model("logreg", 30, 10, seed=0))  # another data set
    with pytest.raises(GGDAError, match=r"'logreg' \(30 inputs.*'logreg' \(64 inputs"):
        Run.load(fresh_run)


def test_checkpoint_of_another_architecture_is_refused_by_name(run_dir, tmp_path):
    from ggda.models import build_model, save_model
    from ggda.runs import Run

    other = save_model(tmp_path / "other.pt", build_model("mlp-s", 64, 10, seed=0), epoch=1, step=1, lr=0.1)
    with pytest.raises(GGDAError, match=r"other\.pt holds a 'mlp-s'"):
        Run.load(run_dir).task(checkpoint=other)


# -- report and paths -----------------------------------------------------------------------------
EVIL_NAME = "<img src=x onerror=alert(1)>"


def test_report_escapes_user_controlled_names(tmp_path, monkeypatch):
    from ggda.report import html as report

    for name in ("score_vs_time", "grouping_ablation", "removal_curves", "lds_bars", "noisy_curves"):
        monkeypatch.setattr(report.figures, name, lambda *a, **k: None)
    monkeypatch.setattr(report.figures, "score_vs_time", lambda *a, **k: "score_vs_time.png")
    monkeypatch.setattr(report.figures, "gold_similarity", lambda *a, **k: None)

    def row(label, method, grouping, K, acc):
        return {
            "label": label, "method": method, "grouping": grouping, "K": K, "fraction": 0.1,
            "acc_mean": acc, "acc_sem": 0.01, "seconds": 0.5,
        }  # fmt: skip

    results = {
        "config": {
            "data": f"data{EVIL_NAME}",
            "model": "logreg",
            "methods": [f"grad-dot{EVIL_NAME}"],
            "groupings": [EVIL_NAME],
            "ks": [10],
            "seeds": 2,
            "lds_subsets": 4,
            "lds_alpha": 0.5,
            "gold_compare": None,
        },  # fmt: skip
        "reference": {"n_train": 100, "n_test": 20, "test_accuracy": 0.9},
        "retrains": {"distinct": 3, "ran": 3, "seconds": 1.0},
        "seconds": 2.0,
        "no_removal": {"acc_mean": 0.9, "acc_sem": 0.01},
        "retraining": [
            row("random", "random", "random", None, 0.85),
            row(f"m{EVIL_NAME}/singleton", f"m{EVIL_NAME}", "singleton", None, 0.7),
            row(f"m{EVIL_NAME}/{EVIL_NAME}", f"m{EVIL_NAME}", EVIL_NAME, 10, 0.75),
        ],
        "attributions": [
            {"label": f"m{EVIL_NAME}/singleton", "K": None, "seconds": 0.5},
            {"label": f"m{EVIL_NAME}/{EVIL_NAME}", "K": 10, "seconds": 0.5},
        ],
        "pruning": [],
        "lds": [],
        "failures": [f"{EVIL_NAME}: failed"],
    }
    page = report.write_report(results, tmp_path).read_text()
    assert "<img src=x" not in page and "onerror=alert(1)>" not in page
    assert html.escape(EVIL_NAME) in page
    assert page.count("<img ") == 1  # the one figure, nothing injected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize(
    "name",
    ["../../..", "..", ".", "a/../../b", "/etc/passwd", "given:values=../../..", "x" * 400, "", "é\x00\n/.."],
)
def test_safe_name_is_one_confined_component(tmp_path, name):
    out = safe_name(name)
    assert out and "/" not in out and "\\" not in out and not out.startswith(".") and len(out) <= 100
    path = confined_path(tmp_path / "attributions", f"grad-dot-{name}")
    assert path.parent == tmp_path / "attributions"
    assert safe_name(name) == out  # stable: the same name gives the same directory


def test_confined_path_refuses_a_symlink_escape(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(GGDAError, match="outside"):
        confined_path(tmp_path / "root", "link")


def test_attribute_output_stays_in_the_run_directory(fresh_run, tmp_path):
    """`--grouping given:values=../../..` (or any name) cannot write outside RUN/attributions."""
    from ggda.data.grouping import Grouping
    from ggda.results import save_attribution
    from ggda.runs import Run

    before = set(tmp_path.rglob("*"))
    r = Run.load(fresh_run)
    label = "given:values=../../../escaped".replace(":", "-")
    out = confined_path(fresh_run / "attributions", f"grad-dot-{label}")
    g = Grouping.singleton(len(r.train))
    save_attribution(
        out, np.zeros((2, len(r.train)), np.float32), g, r.train.ids, r.test.ids[:2], "grad-dot", top_k=3
    )
    created = set(tmp_path.rglob("*")) - before
    root = fresh_run / "attributions"
    assert {p.name for p in created} >= {"scores.npy", "groups.npy", "members.csv", "top_k.csv", "meta.json"}
    assert all(p == root or root in p.parents for p in created), created
    assert not (tmp_path / "escaped").exists() and not (fresh_run.parent.parent / "escaped").exists()


def test_features_score_kernel_name_creates_nothing_outside_the_store(fresh_run, tmp_path):
    store = tmp_path / "work" / "store"
    build = ggda("features", "build", "--run", fresh_run, "--out", store)
    assert build.returncode == 0, build.stderr[-2000:]
    before = set(tmp_path.rglob("*"))
    proc = ggda(
        "features", "score", "--run", fresh_run, "--store", store, "--kernel", "../../X", "--targets", 2
    )
    one_error_line(proc, "kernel")
    created = set(tmp_path.rglob("*")) - before
    assert all(store in p.parents for p in created), created
    assert not (tmp_path / "X").exists() and not (tmp_path / "work" / "X").exists()
