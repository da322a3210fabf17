"""The HTML report: a self-contained folder whose every reference exists, user strings escaped,
findings that follow the numbers, and data views that show what the saved scores say."""

from __future__ import annotations

import html
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ggda.applications.experiment import (
    ExperimentConfig,
    experiment_command,
    load_gold_compare,
    run_experiment,
)
from ggda.errors import GGDAError
from ggda.report import select
from ggda.report.html import _pm, findings, write_report

EVIL = "<script>alert('x')</script>&\"q\""


class Refs(HTMLParser):
    """Every src=/href= of a page, and every element's attributes in order."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.elements: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        d = dict(attrs)
        self.elements.append((tag, d))
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]


def parse(page: str) -> Refs:
    p = Refs()
    p.feed(page)
    return p


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    gold = out / "gold-compare"
    gold.mkdir()
    rows = [
        {"method": m, "epoch": e, "metric": metric, "mean": v, "sem": 0.01}
        for m, base in (("grad-dot", 0.9), ("if-cg", 0.4))
        for e in (1, 5, 10)
        for metric, v in (("cosine", base - 0.02 * e), ("spearman", base - 0.03 * e))
    ]
    pd.DataFrame(rows).to_csv(gold / "compare.csv", index=False)
    config = ExperimentConfig(
        data="digits",
        max_train=150,
        model="logreg",
        methods=["grad-dot"],
        groupings=["random", "kmeans"],
        ks=["n/15"],
        seeds=2,
        fractions=[0.1],
        prune_fractions=[0.2],
        lds_subsets=4,
        lds_targets=5,
        noise=0.1,
        epochs=2,
        batch_size=32,
        backend="serial",
        gold_compare=str(gold),
        inspect_targets=4,
    )
    results = run_experiment(config, out, log=lambda _: None, progress=False)
    return results, out, write_report(results, out)


def test_every_reference_exists_inside_the_folder(tiny_results):
    results, out, index = tiny_results
    refs = parse(index.read_text()).refs
    figures = {
        "score_vs_time.png",
        "grouping_ablation.png",
        "retraining_curves.png",
        "pruning_curves.png",
        "lds.png",
        "noisy_self-influence.png",
        "noisy_test-harm.png",
        "gold_similarity.png",
    }
    assert figures <= set(refs)
    thumbs = [r for r in refs if r.startswith("examples/")]
    assert len(thumbs) > 20  # targets, their influences, gallery members, flagged points
    root = out.resolve()
    for ref in refs:
        assert "://" not in ref and not ref.startswith(("/", "//", "data:")), ref
        path = (out / ref).resolve()
        assert path.is_relative_to(root), ref
        assert path.is_file() and path.stat().st_size > 60, ref
    page = index.read_text()
    assert "Group gallery" in page and "Flagged noisy-label examples" in page
    assert "Configuration and provenance" in page and "Skipped" not in page


def test_provenance_block_names_options_versions_and_command(tiny_results):
    results, out, index = tiny_results
    page = index.read_text()
    prov = results["provenance"]
    assert prov["command"].startswith("ggda experiment ") and "--max-train 150" in prov["command"]
    assert html.escape(prov["command"]) in page
    for name in ("torch", "numpy", "scikit-learn", "python", "ggda"):
        assert name in prov["versions"] and f"<th>{name}</th>" in page
    assert "lds_alpha" in page and "max_batch" in prov["methods"]["grad-dot"]["options"]
    assert "retraining seeds [0, 1]" in page


def test_helpful_thumbnails_are_the_argmax_of_saved_scores(tiny_results):
    from sklearn.datasets import load_digits

    results, out, index = tiny_results
    raw = load_digits().data  # bundled digits: id = row of scikit-learn's array
    with np.load(out / "inspect" / "inspect.npz") as z:
        a = {k: z[k] for k in z.files}
    record = json.loads((out / "inspect" / "inspect.json").read_text())
    assert record["modality"] == "image" and record["image_shape"] == [1, 8, 8]
    scores = a[record["point_scores"]["grad-dot"]]
    assert scores.shape == (4, 150)
    elements = parse(index.read_text()).elements
    rows = [
        d for t, d in elements if t == "div" and d.get("data-method") == "grad-dot" and "data-target" in d
    ]
    assert [int(d["data-target"]) for d in rows] == a["target_ids"].tolist()
    for t, tid in enumerate(a["target_ids"].tolist()):
        start = elements.index(("div", rows[t]))
        figs = [d for tag, d in elements[start + 1 :] if tag == "figure"][: 1 + 2 * select.TOP_K]
        assert "target" in figs[0]["class"] and int(figs[0]["data-id"]) == tid
        helpful = [int(d["data-id"]) for d in figs if "help" in d["class"]]
        harmful = [int(d["data-id"]) for d in figs if "harm" in d["class"]]
        assert helpful[0] == a["train_ids"][int(np.argmax(scores[t]))]
        assert harmful[0] == a["train_ids"][int(np.argmin(scores[t]))]
        assert helpful == a["train_ids"][np.argsort(-scores[t], kind="stable")[: select.TOP_K]].tolist()
        for ident in helpful + harmful:  # the pixels saved for a thumbnail are that id's raw image
            row = a["display_ids"].tolist().index(ident)
            np.testing.assert_allclose(a["display_X"][row], raw[ident], atol=1e-4)
            assert (out / "examples" / f"train_{ident}.png").is_file()
    np.testing.assert_allclose(a["target_X"], raw[a["target_ids"]], atol=1e-4)


def test_flagged_examples_state_the_truth(tiny_results):
    results, out, _ = tiny_results
    record = json.loads((out / "inspect" / "inspect.json").read_text())
    f = record["flagged"]["grad-dot"]["self-influence"]
    assert len(f["ids"]) == select.FLAGGED
    assert [g != o for g, o in zip(f["given"], f["original"], strict=True)] == f["flipped"]
    assert sum(f["flipped"]) >= 6  # self-influence finds flipped digits (AUC ~0.97 here)
    assert f["suspicion"] == sorted(f["suspicion"], reverse=True)


def _inspection(out: Path, modality: str) -> None:
    """A hand-written OUT/inspect with HTML-special strings in every user-controlled field."""
    (out / "inspect").mkdir(parents=True)
    n = 12
    arrays = {
        "train_ids": np.arange(n),
        "train_y": np.arange(n) % 2,
        "display_ids": np.arange(n),
        "display_X": np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32),
        "target_ids": np.array([100]),
        "target_y": np.array([1]),
        "target_X": np.zeros((1, 3), np.float32),
        "point_0": np.linspace(-1, 1, n)[None, :],
        "labels_1": np.arange(n) % 3,
        "gscore_1_0": np.array([0.5, -0.2, 0.1]),
    }
    record = {
        "data": f"d{EVIL}",
        "modality": modality,
        "image_shape": None,
        "feature_names": [f"f{EVIL}", "b", "c"],
        "class_names": [f"c0{EVIL}", f"c1{EVIL}"],
        "seed": 0,
        "top_k": 3,
        "point_scores": {f"m{EVIL}": "point_0"},
        "gallery_k": 3,
        "groupings": {f"g{EVIL}:3": {"grouping": f"g{EVIL}", "K": 3, "labels": "labels_1", "scores": {f"m{EVIL}": "gscore_1_0"}}},
        "flagged": {f"m{EVIL}": {f"r{EVIL}": {"ids": [1], "suspicion": [1.0], "given": [1], "original": [0], "flipped": [True], "auc": 0.9}}},
        "texts": {f"train:{i}": f"text {i} {EVIL}" for i in range(n)} | {"test:100": f"target {EVIL}"},
    }  # fmt: skip
    np.savez(out / "inspect" / "inspect.npz", **arrays)
    (out / "inspect" / "inspect.json").write_text(json.dumps(record))


def _evil_results() -> dict:
    row = {"fraction": 0.1, "acc_sem": 0.01, "seconds": 0.5}
    return {
        "config": {"data": f"d{EVIL}", "model": "logreg", "methods": [f"m{EVIL}"], "groupings": [f"g{EVIL}"],
                   "ks": [3], "seeds": 3, "lds_subsets": 4, "lds_alpha": 0.5, "gold_compare": None},
        "reference": {"n_train": 12, "n_test": 1, "test_accuracy": 0.9},
        "retrains": {"distinct": 3, "ran": 3, "seconds": 1.0},
        "seconds": 2.0,
        "no_removal": {"acc_mean": 0.9, "acc_sem": 0.01},
        "retraining": [
            {**row, "label": "random", "method": "random", "grouping": "none", "K": 0, "acc_mean": 0.85},
            {**row, "label": f"m{EVIL}|singleton", "method": f"m{EVIL}", "grouping": "singleton", "K": 12, "acc_mean": 0.7},
            {**row, "label": f"m{EVIL}|g{EVIL}:3", "method": f"m{EVIL}", "grouping": f"g{EVIL}", "K": 3, "acc_mean": 0.8},
        ],
        "attributions": [
            {"label": f"m{EVIL}|singleton", "K": 12, "seconds": 0.5},
            {"label": f"m{EVIL}|g{EVIL}:3", "K": 3, "seconds": 0.5},
        ],
        "pruning": [],
        "lds": [],
        "failures": [f"{EVIL}: failed"],
        "provenance": {"command": f"ggda experiment --data '{EVIL}'", "versions": {"numpy": EVIL},
                       "methods": {f"m{EVIL}": {"options": {f"o{EVIL}": EVIL}, "info": {"k": EVIL}}}},
    }  # fmt: skip


@pytest.mark.parametrize("modality", ["tabular", "text"])
def test_user_strings_are_escaped(tmp_path, modality):
    _inspection(tmp_path, modality)
    page = write_report(_evil_results(), tmp_path).read_text()
    assert "<script>" not in page and EVIL not in page
    escaped = html.escape(EVIL, quote=True)
    assert escaped in page
    for field in (f"d{escaped}", f"m{escaped}", f"g{escaped}", f"c1{escaped}", f"r{escaped}"):
        assert field in page, field
    if modality == "text":
        assert f"text 11 {escaped}" in page and f"target {escaped}" in page
    else:
        assert f"f{escaped}" in page
    assert not [r for r in parse(page).refs if not (tmp_path / r).is_file()]
    # the examples shown follow the saved scores (linspace: the last ids are the most helpful)
    elements = parse(page).elements
    helpful = [int(d["data-id"]) for _, d in elements if "help" in (d.get("class") or "").split()]
    harmful = [int(d["data-id"]) for _, d in elements if "harm" in (d.get("class") or "").split()]
    assert helpful == [11, 10, 9] and harmful == [0, 1, 2]


def _ablation(gk: float, rnd: float, seeds: int = 2) -> dict:
    def row(label, grouping, K, acc):
        return {"label": label, "method": "tracin", "grouping": grouping, "K": K, "fraction": 0.2,
                "acc_mean": acc, "acc_sem": 0.002, "seconds": 1.0}  # fmt: skip

    return {
        "config": {"seeds": seeds},
        "no_removal": {"acc_mean": 0.97, "acc_sem": 0.001},
        "retraining": [
            {**row("random", "none", 0, 0.96), "method": "random"},
            row("tracin|singleton", "singleton", 1438, 0.80),
            row("tracin|grad-kmeans:144", "grad-kmeans", 144, gk),
            row("tracin|random:144", "random", 144, rnd),
        ],
    }


def test_findings_follow_the_numbers():
    worse = " ".join(findings(_ablation(gk=0.95, rnd=0.90)))
    assert "tracin, K=144: random 0.900; grad-kmeans 0.950 (worse than random groups)" in worse
    assert "stay close" not in worse
    better = " ".join(findings(_ablation(gk=0.85, rnd=0.90)))
    assert "grad-kmeans 0.850 (better than random groups)" in better
    assert "the best grouping, grad-kmeans, is 5.0 points above per-point" in better
    assert "16.0 points below random removal (better than random removal)" in better
    # with 3 seeds, a difference inside the combined SEM is not called a win
    tied = " ".join(findings(_ablation(gk=0.901, rnd=0.90, seeds=3)))
    assert "(within noise of random groups)" in tied
    pruned = _ablation(gk=0.9, rnd=0.9)
    pruned["pruning"] = [{**r, "fraction": 0.3} for r in pruned["retraining"]]  # per-point 0.80, random 0.96
    text = " ".join(findings(pruned))
    assert (
        "by per-point tracin): accuracy 0.800, at or below no removal (0.970); worse than random pruning (0.960)"
        in text
    )


def test_sem_only_from_three_seeds():
    assert _pm(0.5, 0.0, 2) == "0.500 (n=2 seeds, no error bar)"
    assert _pm(0.5, 0.01, 3) == "0.500 ± 0.010"


def test_figure_fixes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from ggda.report import figures

    results = _ablation(0.9, 0.9)
    results["pruning"] = [
        {**r, "fraction": 0.3} for r in results["retraining"]
    ]  # one fraction: bars, not a curve on a ±1.5 axis
    assert figures.removal_curves(results, tmp_path, "pruning") == "pruning_curves.png"
    assert (
        figures._yerr(results, [0.1]) is None and figures._yerr({"config": {"seeds": 3}}, [0.1]) is not None
    )
    fig, ax = matplotlib.pyplot.subplots()
    ax.plot([0.8, 1.7], [0, 1])
    figures._log_x(ax)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    boxes = [t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    points = [
        (1.0, 0.5, "K=1"),
        (1.001, 0.5, "K=2"),
        (1.002, 0.5, "K=3"),
        (1.003, 0.5, "K=4"),
        (1.004, 0.5, "K=5"),
    ]
    figures._annotate_sparse(ax, points)
    fig.canvas.draw()
    texts = [t.get_window_extent() for t in ax.texts]
    assert 1 <= len(texts) < 5 and all(not a.overlaps(b) for i, a in enumerate(texts) for b in texts[i + 1 :])
    matplotlib.pyplot.close(fig)


def test_experiment_command_round_trips_the_options():
    cmd = experiment_command(
        ExperimentConfig(methods=["tracin"], ks=["n/50"], seeds=2, method_options={"tracin": {"x": 1}}),
        "runs/x",
    )
    assert cmd == "ggda experiment --methods tracin --ks n/50 --seeds 2 --opt tracin:x=1 --out runs/x"
    # every option the command line has is written as its flag, and the flag exists
    cmd = experiment_command(ExperimentConfig(inspect_targets=3), "o")
    assert "--inspect-targets 3" in cmd and "#" not in cmd
    from typer.main import get_command

    import ggda.cli.cmd_evaluate  # noqa: F401  (registers `experiment`)
    from ggda.cli.main import app

    experiment = get_command(app).commands["experiment"]
    assert "--inspect-targets" in {opt for p in experiment.params for opt in p.opts}


def test_gold_compare_loader(tmp_path):
    with pytest.raises(GGDAError):
        load_gold_compare(tmp_path)
    pd.DataFrame({"method": ["a"], "epoch": [1], "metric": ["cosine"], "mean": [0.5]}).to_csv(
        tmp_path / "compare.csv"
    )
    assert load_gold_compare(tmp_path)[0]["sem"] == 0.0
