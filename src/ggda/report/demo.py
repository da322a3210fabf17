"""``make demo`` / ``ggda demo``: the GGDA story end to end on digits in a few minutes on 2 cores.

A small :func:`ggda.applications.experiment.run_experiment`: an MLP on scikit-learn's digits, cheap
attribution methods per point and on Random / K-Means / Repr-K-Means / Grad-K-Means groups at
K = n/50 and n/10, each scored by retraining (remove the top 1/5/10/20% most helpful points, 2
seeds), pruning, LDS and noisy-label detection (logistic regression, 10% flipped labels), written
as ``OUT/index.html`` with PNG figures. Rerunning resumes from the stores under ``OUT``.
"""

from __future__ import annotations

from pathlib import Path

from ggda.applications.experiment import ExperimentConfig, available_methods, run_experiment
from ggda.report.html import write_report

DEMO_METHODS = ("tracin", "trak")


def demo_config() -> ExperimentConfig:
    return ExperimentConfig(
        data="digits",
        model="mlp-s",
        methods=available_methods(DEMO_METHODS),
        groupings=["random", "kmeans", "repr-kmeans", "grad-kmeans"],
        # Label-pure Grad-K-Means: on a model that fits its data, plain Grad-K-Means puts every
        # well-fit point (near-zero gradient) into one giant cluster, which makes whole-group
        # removal behave like random removal (docs/groupings.md).
        grouping_options={"grad-kmeans": {"per_class": True}},
        ks=["n/50", "n/10"],
        fractions=[0.01, 0.05, 0.10, 0.20],
        seeds=2,
        prune_fractions=[0.3],
        lds_subsets=8,
        lds_targets=50,
        noise=0.1,
        noisy_model="logreg",
        epochs=10,
        lr=0.05,
        batch_size=128,
    )


def run_demo(out: Path, config: ExperimentConfig | None = None) -> Path:
    """Run (or resume) the demo experiment into ``out``; returns the path of ``index.html``."""
    import shlex

    command = shlex.join(["ggda", "demo", "--out", str(out)]) if config is None else None
    results = run_experiment(config or demo_config(), Path(out), command=command)
    return write_report(results, Path(out), title="ggda demo: group data attribution on digits (mlp-s)")
