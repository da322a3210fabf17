"""``ggda experiment``: the GGDA study on one data set + model, end to end and resumable.

For every attribution method × grouping method × number of groups K (per-point attribution, i.e.
singleton groups, always included) the experiment records

* **attribution time**, grouping time included (GGDA's reviewers asked for it);
* the **retraining score**: test accuracy after removing the top 1/5/10/20% most helpful points
  (mean ± SEM over R retraining seeds), with random-removal and no-removal baselines;
* **pruning**: accuracy after removing the least valuable fractions;
* **LDS** over the same units (subsets drawn over groups);
* **noisy-label detection** on a copy of the data with flipped labels (self-influence and
  test-harm rankings; AUC and fraction found in the top 5/10/20%);

and, when a ``ggda compare`` output directory is given, similarity to the further-training gold
standard vs epochs. Every retrain of the whole experiment is planned first and sent to the
executor in one batch (one worker pool); results and attribution scores live in keyed stores
under ``OUT/``, so a rerun resumes and a finished experiment re-renders its report in seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.evaluate.lds import lds, lds_pairs
from ggda.evaluate.noisy_labels import (
    FOUND_AT,
    detect_noisy_labels,
    self_influence,
    suspicion_from_self_influence,
    suspicion_from_test_scores,
)
from ggda.evaluate.pruning import PRUNE_FRACTIONS, pruning_curves
from ggda.evaluate.retraining import Retrainer, RetrainSpec
from ggda.evaluate.retraining_score import FRACTIONS, RemovalResults, removal_pairs, retraining_score
from ggda.execution import ResultStore, job_key
from ggda.groups.grouping import Grouping
from ggda.io import save_csv, save_json
from ggda.models.training import TrainConfig
from ggda.properties import ExampleLoss, MeanLoss
from ggda.runs import DataSpec, Run
from ggda.task import AttributionTask

SINGLETON = "singleton"
Log = Callable[[str], None]


@dataclass
class ExperimentConfig:
    """Everything one experiment varies; saved to ``OUT/config.json``.

    ``ks`` entries are group counts (``28``) or ``n/S`` for groups of about S points (``n/50``).
    Set ``lds_subsets=0``, ``noise=0`` or ``prune_fractions=()`` to skip that evaluation.
    """

    data: str = "digits"
    model: str = "mlp-s"
    methods: list[str] = field(default_factory=lambda: ["grad-dot", "tracin"])
    groupings: list[str] = field(default_factory=lambda: ["random", "kmeans", "repr-kmeans", "grad-kmeans"])
    ks: list[str] = field(default_factory=lambda: ["n/50", "n/10"])
    per_class: bool | None = None  # None: per class for K-Means methods on classification data
    fractions: list[float] = field(default_factory=lambda: list(FRACTIONS))
    seeds: int = 3
    prune_fractions: list[float] = field(default_factory=lambda: list(PRUNE_FRACTIONS))
    lds_subsets: int = 20
    lds_alpha: float = 0.5
    lds_targets: int = 50
    noise: float = 0.1
    noisy_model: str | None = None  # default: the same model
    epochs: int = 15
    lr: float = 0.05
    batch_size: int = 64
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    max_train: int | None = None
    method_options: dict[str, dict] = field(default_factory=dict)
    grouping_options: dict[str, dict] = field(default_factory=dict)
    fill: str = "exact"
    backend: str = "local"
    workers: int | None = None
    device: str = "cpu"
    seed: int = 0
    gold_compare: str | None = None

    def train_config(self) -> TrainConfig:
        """The training recipe shared by the attributed model, the noisy-label model and every retrain."""
        return TrainConfig(
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            seed=self.seed,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Refuse, before any training, every value the study would fail on hours later: names of
        data, model, methods and groupings, each method's options (types and ranges), the group
        counts, fractions, seeds and training settings."""
        import ggda.methods  # noqa: F401  (registers every method)
        from ggda.data.bundled import BUNDLED_DATASETS
        from ggda.evaluate.retraining_score import FILLS
        from ggda.execution.executor import BACKENDS
        from ggda.groups import GROUPING_METHODS
        from ggda.methods.base import METHODS
        from ggda.models.zoo import MODEL_NAMES
        from ggda.options import COUNT, FRACTION, NONNEG_INT, Spec, check, check_each, check_method

        source = str(self.data)
        if source not in BUNDLED_DATASETS:
            path = Path(source)
            if path.suffix.lower() in (".csv", ".parquet", ".pq"):
                raise GGDAError(
                    f"--data {source}: `ggda experiment` cannot name a label column; pass a bundled data "
                    f"set ({', '.join(BUNDLED_DATASETS)}) or an .npz file with arrays X and y."
                )
            if path.suffix.lower() != ".npz":
                raise GGDAError(
                    f"--data {source}: unknown data set; choose one of {', '.join(BUNDLED_DATASETS)} or "
                    "pass an .npz file with arrays X and y."
                )
            if not path.is_file():
                raise GGDAError(f"--data {source} does not exist; check the path.")
        for flag, name in (("--model", self.model), ("--noisy-model", self.noisy_model)):
            if name is not None and name not in MODEL_NAMES:
                raise GGDAError(f"{flag} {name}: unknown model; choose one of {', '.join(MODEL_NAMES)}.")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise GGDAError(
                f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
                f"{', '.join(sorted(METHODS))} or all."
            )
        for scope in self.method_options:
            if scope not in self.methods:
                raise GGDAError(
                    f"--opt {scope}:...: method '{scope}' is not among --methods {','.join(self.methods)}."
                )
        for m, opts in self.method_options.items():
            self.method_options[m] = check_method(m, opts)
        bad = [g for g in self.groupings if g not in GROUPING_METHODS]
        if bad:
            raise GGDAError(
                f"--groupings: unknown grouping method(s) {', '.join(bad)}; choose from {', '.join(GROUPING_METHODS)}."
            )
        for scope in self.grouping_options:
            if scope not in self.groupings:
                raise GGDAError(
                    f"--gopt {scope}:...: grouping '{scope}' is not among --groupings {','.join(self.groupings)}."
                )
        for k in self.ks:
            check_k(k)
        fraction = Spec(float, 0, 1, high_open=True)
        self.fractions = check_each("--fractions", self.fractions, fraction)
        self.prune_fractions = check_each("--prune-fractions", self.prune_fractions, fraction)
        self.seeds = check("seeds", self.seeds, COUNT, flag="--seeds")
        self.lds_subsets = check("lds_subsets", self.lds_subsets, NONNEG_INT, flag="--lds-subsets")
        if 0 < self.lds_subsets < 3:
            raise GGDAError(
                f"lds_subsets={self.lds_subsets} (--lds-subsets): LDS needs at least 3 subsets; pass 0 to skip it."
            )
        self.lds_alpha = check("lds_alpha", self.lds_alpha, FRACTION, flag="--lds-alpha")
        self.lds_targets = check("lds_targets", self.lds_targets, COUNT, flag="--lds-targets")
        self.noise = check("noise", self.noise, Spec(float, 0, 1, high_open=True), flag="--noise")
        self.max_train = check("max_train", self.max_train, COUNT.optional(), flag="--max-train")
        self.workers = check("workers", self.workers, COUNT.optional(), flag="--workers")
        if self.fill not in FILLS:
            raise GGDAError(f"--fill {self.fill}: unknown fill; choose one of {', '.join(FILLS)}.")
        if self.backend not in BACKENDS:
            raise GGDAError(
                f"--backend {self.backend}: unknown backend; choose one of {', '.join(BACKENDS)}."
            )
        self.train_config()  # epochs, lr, batch size, optimizer, weight decay, seed
        compare = Path(self.gold_compare) if self.gold_compare else None
        if compare is not None and not (compare / "compare.csv" if compare.is_dir() else compare).is_file():
            raise GGDAError(
                f"--gold-compare {self.gold_compare} has no compare.csv; pass an output directory of `ggda compare`."
            )


def check_k(spec: str | int) -> None:
    """A group count as written (``28`` or ``n/50``), before n is known."""
    text = str(spec).strip().replace(" ", "")
    try:
        value = float(text[2:]) if text.startswith("n/") else int(text)
    except ValueError:
        raise GGDAError(f"--ks {spec}: bad group count; write an integer (28) or n/SIZE (n/50).") from None
    if not (math.isfinite(value) and (value > 0 if text.startswith("n/") else value >= 1)):
        raise GGDAError(
            f"--ks {spec}: a group count must be an integer >= 1, or n/SIZE with a finite size > 0 (n/50)."
        )


def resolve_k(spec: str | int, n: int) -> int:
    """``28`` -> 28; ``n/50`` -> round(n / 50) (at least 1, at most n)."""
    text = str(spec).strip().replace(" ", "")
    try:
        k = round(n / float(text[2:])) if text.startswith("n/") else int(text)
    except (ValueError, ZeroDivisionError, OverflowError):
        raise GGDAError(f"Bad group count '{spec}'; write an integer (28) or n/SIZE (n/50).") from None
    if not 1 <= k <= n:
        raise GGDAError(f"Group count {spec} gives K={k}, outside 1..{n}.")
    return int(k)


def build_groupings(
    config: ExperimentConfig, train: Dataset, task: AttributionTask, log: Log
) -> tuple[dict[str, Grouping], list[dict]]:
    """label -> grouping (``singleton`` first), and failures."""
    try:
        from ggda.groups import make_grouping
    except ImportError:  # older trees: random groups only
        make_grouping = None
    n = len(train)
    out: dict[str, Grouping] = {SINGLETON: Grouping.singleton(n)}
    failures = []
    for method in config.groupings:
        if method == SINGLETON:
            continue
        for spec in config.ks:
            K = resolve_k(spec, n)
            label = f"{method}:{K}"
            if label in out:
                continue
            try:
                if make_grouping is not None:
                    # per-grouping options (--gopt METHOD:KEY=V) override the experiment-wide ones
                    options = {"per_class": config.per_class, "seed": config.seed}
                    options.update(config.grouping_options.get(method, {}))
                    g = make_grouping(method, train, n_groups=K, task=task, **options)
                elif method == "random":
                    from ggda.groups import random_grouping

                    g = random_grouping(n, K, config.seed)
                else:
                    raise GGDAError(f"Grouping '{method}' needs ggda.groups.make_grouping.")
            except Exception as exc:  # a failed grouping must not sink the whole study
                failures.append(
                    {"stage": "grouping", "grouping": label, "error": f"{type(exc).__name__}: {exc}"}
                )
                log(f"  grouping {label} failed: {exc}")
                continue
            out[label] = g
            log(f"  grouping {label}: K={g.n_groups}, {g.seconds:.2f}s ({g.meta.get('features', method)})")
    return out, failures


def _split_label(label: str) -> tuple[str, int | None]:
    method, _, k = label.partition(":")
    return method, (int(k) if k else None)


def attribute_all(
    config: ExperimentConfig,
    run: Run,
    task: AttributionTask,
    groupings: dict[str, Grouping],
    store: ResultStore,
    context: dict,
    log: Log,
    lds_targets: int = 0,
) -> tuple[list[dict], dict[str, dict[str, np.ndarray]], list[dict]]:
    """Timed mean-test-loss attribution (and per-target scores for LDS) per method × grouping.

    Methods are built by ``run.method`` (the run's weight decay and checkpoints offered,
    ``config.method_options`` override). Results are stored under keys of (context, method,
    options, grouping), so a rerun reuses them with their originally measured times.
    """
    rows, scores, failures = [], {}, []
    train, test = run.data()
    mean_prop = MeanLoss(test.X, test.y)
    example_prop = ExampleLoss(test.X[:lds_targets], test.y[:lds_targets]) if lds_targets else None
    for method in config.methods:
        user_opts = config.method_options.get(method, {})
        opts = run.method_options(method, **user_opts)
        for glabel, grouping in groupings.items():
            key = job_key(
                {
                    **context,
                    "method": method,
                    "opts": opts,
                    "grouping": _gdigest(grouping),
                    "lds_targets": lds_targets,
                },
                m=method,
                g=glabel.replace(":", "-"),
            )
            label = f"{method}|{glabel}"
            if store.has(key):
                arrays, meta = store.get(key)
            else:
                try:
                    t0 = time.perf_counter()
                    att = run.method(method, task, **user_opts).cache(train, grouping)
                    mean_scores = att.attribute(mean_prop)
                    seconds = time.perf_counter() - t0
                    arrays = {"mean": np.asarray(mean_scores, dtype=np.float64)}
                    t1 = time.perf_counter()
                    if example_prop is not None:
                        arrays["example"] = np.asarray(att.attribute(example_prop), dtype=np.float64)
                    meta = {
                        "attribution_seconds": seconds,
                        "grouping_seconds": grouping.seconds,
                        "example_seconds": time.perf_counter() - t1,
                    }
                except Exception as exc:
                    failures.append(
                        {"stage": "attribution", "label": label, "error": f"{type(exc).__name__}: {exc}"}
                    )
                    log(f"  {label} failed: {exc}")
                    continue
                store.put(key, arrays, meta)
            gmethod, K = _split_label(glabel)
            seconds = meta["attribution_seconds"] + meta["grouping_seconds"]
            rows.append(
                {
                    "label": label,
                    "method": method,
                    "grouping": gmethod,
                    "K": grouping.n_groups,
                    "seconds": seconds,
                    "attribution_seconds": meta["attribution_seconds"],
                    "grouping_seconds": meta["grouping_seconds"],
                }
            )
            scores[label] = arrays
            log(f"  {label:32s} K={grouping.n_groups:5d}  {seconds:7.2f}s")
    return rows, scores, failures


def _gdigest(grouping: Grouping) -> str:
    import hashlib

    return hashlib.sha1(grouping.labels.tobytes()).hexdigest()[:16]


def _noisy_detection(
    config: ExperimentConfig, data_spec: DataSpec, model_spec_name: str, out: Path, log: Log
) -> tuple[list[dict], dict[str, dict], list[dict], dict]:
    """Train on flipped labels, then rank points by self-influence / test harm per method × grouping."""
    spec = DataSpec(**{**data_spec.to_dict(), "noise": config.noise, "noise_seed": config.seed})
    run = Run.create(out / "noisy-model", spec, model_spec_name, config.train_config(), config.device)
    train, test = run.data()
    task = run.task(config.device)
    info = {
        "model": model_spec_name,
        "noise": config.noise,
        "n_flipped": int(train.noisy.sum()),
        "test_accuracy": run.config["metrics"]["test_accuracy"],
    }
    log(
        f"noisy labels: {info['n_flipped']} of {len(train)} flipped, {model_spec_name} test accuracy {info['test_accuracy']:.3f}"
    )
    groupings, failures = build_groupings(config, train, task, log)
    rows, curves = [], {}
    for method in config.methods:
        opts = config.method_options.get(method, {})
        for glabel, grouping in groupings.items():
            label = f"{method}|{glabel}"
            try:
                t0 = time.perf_counter()
                att = run.method(method, task, **opts).cache(train, grouping)
                self_scores = self_influence(att)
                seconds = time.perf_counter() - t0 + grouping.seconds
                test_scores = att.attribute(MeanLoss(test.X, test.y))
            except Exception as exc:
                failures.append({"stage": "noisy", "label": label, "error": f"{type(exc).__name__}: {exc}"})
                log(f"  {label} failed: {exc}")
                continue
            gmethod, _ = _split_label(glabel)
            for ranking, suspicion in (
                ("self-influence", suspicion_from_self_influence(self_scores, grouping)),
                ("test-harm", suspicion_from_test_scores(test_scores, grouping)),
            ):
                det = detect_noisy_labels(suspicion, train.noisy, FOUND_AT, seed=config.seed)
                rows.append(
                    {
                        "label": label,
                        "method": method,
                        "grouping": gmethod,
                        "K": grouping.n_groups,
                        "ranking": ranking,
                        "seconds": seconds,
                        **det.row(),
                    }
                )
                grid = np.linspace(0, 1, 101)
                curves[f"{label}|{ranking}"] = {
                    "inspected": grid.tolist(),
                    "found": np.interp(grid, det.inspected, det.recall).tolist(),
                }
            log(f"  {label:32s} AUC self {rows[-2]['auc']:.3f}, test-harm {rows[-1]['auc']:.3f}")
    return rows, curves, failures, info


def _removal_rows(results: RemovalResults, attributions: pd.DataFrame) -> list[dict]:
    frame = results.table()
    meta = attributions.set_index("label")[["method", "grouping", "K", "seconds"]]
    frame = frame.join(meta, on="label")
    rnd = frame["label"] == "random"
    frame.loc[rnd, "method"] = "random"
    frame.loc[rnd, "grouping"] = "none"
    frame["K"] = frame["K"].fillna(0).astype(int)
    frame["seconds"] = frame["seconds"].fillna(0.0)
    return frame.to_dict(orient="records")


def load_gold_compare(path: str | Path) -> list[dict]:
    """Rows (method, epoch, metric, mean, sem) from a ``ggda compare`` directory or its compare.csv."""
    path = Path(path)
    csv = path / "compare.csv" if path.is_dir() else path
    if not csv.exists():
        raise GGDAError(f"No compare.csv at {path}; pass the output directory of `ggda compare`.")
    frame = pd.read_csv(csv)
    need = {"method", "epoch", "metric", "mean"}
    if not need <= set(frame.columns):
        raise GGDAError(
            f"{csv} lacks columns {sorted(need - set(frame.columns))}; is it a `ggda compare` output?"
        )
    if "sem" not in frame.columns:
        frame["sem"] = 0.0
    return frame.to_dict(orient="records")


def run_experiment(
    config: ExperimentConfig, out: str | Path, log: Log = print, progress: bool = True
) -> dict:
    """Run (or resume) the experiment into ``out``; returns the results dict also saved as results.json."""
    import torch

    from ggda.outputs import check_output_dir

    config.validate()
    out = check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "config.json", config.to_dict())
    t_start = time.perf_counter()
    seeds = list(range(config.seeds))
    if config.seeds < 1:
        raise GGDAError("Use at least one retraining seed (--seeds 3 is the default).")
    data_spec = DataSpec(config.data, split_seed=config.seed, max_train=config.max_train)
    tconf = config.train_config()
    torch.manual_seed(config.seed)
    run = Run.create(out / "model", data_spec, config.model, tconf, config.device, log=log)
    train, test = run.data()
    if train.kind != "classification":
        raise GGDAError("ggda experiment reports accuracies; use a classification data set.")
    mspec = run.model_spec
    reference = {
        "n_train": len(train),
        "n_test": len(test),
        "train_seconds": run.config["metrics"]["train_seconds"],
        "test_accuracy": run.config["metrics"]["test_accuracy"],
    }
    log(
        f"model {config.model}: test accuracy {reference['test_accuracy']:.4f} ({reference['train_seconds']:.1f}s)"
    )
    task = run.task(config.device)
    context = {"data": data_spec.to_dict(), "model": mspec.to_dict(), "train": tconf.to_dict()}

    log("groupings")
    groupings, failures = build_groupings(config, train, task, log)
    log("attribution (mean test loss; time includes grouping)")
    lds_targets = min(config.lds_targets, len(test)) if config.lds_subsets else 0
    att_rows, scores, fails = attribute_all(
        config,
        run,
        task,
        groupings,
        ResultStore(out / "attributions"),
        context,
        log,
        lds_targets,
    )
    failures += fails
    attributions = pd.DataFrame(att_rows)
    rankings = {
        row["label"]: (scores[row["label"]]["mean"], groupings[row["label"].split("|", 1)[1]])
        for row in att_rows
    }

    # -- every retrain of the experiment, planned up front and run in one batch --------------
    executor = run.executor(config.backend, config.workers)
    retrainer = Retrainer(
        RetrainSpec(mspec, tconf, data_spec, config.device),
        out / "retrains",
        executor,
        train,
        test,
        progress=progress,
    )
    n = len(train)
    pairs = removal_pairs(rankings, n, config.fractions, seeds, "helpful", config.fill)
    if config.prune_fractions:
        pairs += removal_pairs(rankings, n, config.prune_fractions, seeds, "harmful", config.fill)
    lds_groupings = {label: g for label, g in groupings.items()} if config.lds_subsets else {}
    for g in lds_groupings.values():
        if g.n_groups >= 4:
            pairs += lds_pairs(g, config.lds_subsets, config.lds_alpha, (0,), config.seed)
    unique = len({retrainer.job(r, s).key for r, s in pairs})
    log(f"retraining: {unique} distinct retrains ({len(retrainer.store)} already stored)")
    t0 = time.perf_counter()
    retrainer.run_pairs(pairs)
    retrain_seconds = time.perf_counter() - t0
    log(f"retraining: ran {retrainer.executed} in {retrain_seconds:.1f}s")

    score = retraining_score(retrainer, rankings, config.fractions, seeds, config.fill)
    retraining_rows = _removal_rows(score, attributions)
    pruning_rows = []
    if config.prune_fractions:
        pruning_rows = _removal_rows(
            pruning_curves(retrainer, rankings, config.prune_fractions, seeds, config.fill), attributions
        )
    lds_rows = []
    for glabel, g in lds_groupings.items():
        if g.n_groups < 4:
            continue
        named = {
            r["label"]: scores[r["label"]]["example"]
            for r in att_rows
            if r["label"].split("|", 1)[1] == glabel
        }
        if not named:
            continue
        for label, res in lds(
            retrainer, named, g, config.lds_subsets, config.lds_alpha, (0,), seed=config.seed
        ).items():
            row = attributions.set_index("label").loc[label]
            lds_rows.append(
                {
                    "label": label,
                    "method": row["method"],
                    "grouping": row["grouping"],
                    "K": int(row["K"]),
                    "seconds": float(row["seconds"]),
                    "lds": res.score,
                    "lds_sem": res.sem,
                }
            )

    noisy_rows, noisy_curves, noisy_info = [], {}, {}
    if config.noise > 0:
        log("noisy-label detection")
        noisy_rows, noisy_curves, fails, noisy_info = _noisy_detection(
            config, data_spec, config.noisy_model or config.model, out, log
        )
        failures += fails
    gold_rows = load_gold_compare(config.gold_compare) if config.gold_compare else []
    results = {
        "config": config.to_dict(),
        "reference": reference,
        "no_removal": {
            "acc_mean": float(score.none_accuracy.mean()),
            "acc_sem": float(score.none_accuracy.std(ddof=1) / np.sqrt(len(seeds)))
            if len(seeds) > 1
            else 0.0,
        },
        "attributions": att_rows,
        "retraining": retraining_rows,
        "pruning": pruning_rows,
        "lds": lds_rows,
        "noisy": noisy_rows,
        "noisy_info": noisy_info,
        "noisy_curves": noisy_curves,
        "gold": gold_rows,
        "failures": failures,
        "retrains": {"distinct": unique, "ran": retrainer.executed, "seconds": retrain_seconds},
        "seconds": time.perf_counter() - t_start,
    }
    save_json(out / "results.json", results, indent=1, default=_json_default)
    for name in ("attributions", "retraining", "pruning", "lds", "noisy", "gold"):
        if results[name]:
            save_csv(out / f"{name}.csv", pd.DataFrame(results[name]))
    return results


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def available_methods(preferred: Sequence[str]) -> list[str]:
    """The preferred methods that are registered in this installation, in order."""
    import ggda.methods  # noqa: F401
    from ggda.methods import METHODS

    return [m for m in preferred if m in METHODS]
