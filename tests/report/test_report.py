"""The HTML report: every figure it references exists; gold comparisons are plotted when given."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from ggda.applications.experiment import ExperimentConfig, load_gold_compare, run_experiment
from ggda.errors import GGDAError
from ggda.report.html import headline, write_report


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
        groupings=["random"],
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
    )
    return run_experiment(config, out, log=lambda _: None, progress=False), out


def test_report_references_existing_pngs(tiny_results):
    results, out = tiny_results
    index = write_report(results, out)
    page = index.read_text()
    images = re.findall(r"<img src='([^']+)'>", page)
    expected = {
        "score_vs_time.png",
        "grouping_ablation.png",
        "retraining_curves.png",
        "pruning_curves.png",
        "lds.png",
        "noisy_self-influence.png",
        "noisy_test-harm.png",
        "gold_similarity.png",
    }
    assert set(images) == expected
    for name in images:
        assert (out / name).stat().st_size > 1000, name
    assert "No-removal test accuracy" in page and "Skipped" not in page


def test_headline_states_the_per_point_vs_random_gap(tiny_results):
    results, _ = tiny_results
    lines = headline(results)
    assert any(line.startswith("Per-point grad-dot") and "below random removal" in line for line in lines)
    assert any("K=10" in line for line in lines)


def test_gold_compare_loader(tmp_path):
    with pytest.raises(GGDAError):
        load_gold_compare(tmp_path)
    pd.DataFrame({"method": ["a"], "epoch": [1], "metric": ["cosine"], "mean": [0.5]}).to_csv(
        tmp_path / "compare.csv"
    )
    assert load_gold_compare(tmp_path)[0]["sem"] == 0.0
