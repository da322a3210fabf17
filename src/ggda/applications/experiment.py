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

from ggda.applications.evaluation import retrainer_for
from ggda.data.dataset import Dataset
from ggda.data.grouping import Grouping
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
from ggda.evaluate.retraining_score import FRACTIONS, RemovalResults, removal_pairs, retraining_score
from ggda.execution import ResultStore, job_key
from ggda.io import save_csv, save_json, save_npz
from ggda.models.training import TrainConfig
from ggda.properties import ExampleLoss, MeanLoss
from ggda.runs import DataSpec, Run, prepare_data
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
    inspect_targets: int = 6  # test points whose per-point scores the report shows (0: none)

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
        self.inspect_targets = check("inspect_targets", self.inspect_targets, NONNEG_INT)
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
    inspect: Dataset | None = None,
) -> tuple[list[dict], dict[str, dict[str, np.ndarray]], list[dict], dict[str, dict]]:
    """Timed mean-test-loss attribution (and per-target scores for LDS) per method × grouping.

    Methods are built by ``run.method`` (the run's weight decay and checkpoints offered,
    ``config.method_options`` override). Results are stored under keys of (context, method,
    options, grouping), so a rerun reuses them with their originally measured times. With
    ``inspect`` (a few test points), the per-point scores of each of them are stored too (under
    their own key, computed in the same pass when possible) as ``scores[label]["inspect"]`` for
    the report's influential-examples view. The fourth value maps each method to the record of
    how it ran (options actually used, resolved damping etc.; :func:`method_record`).
    """
    rows, scores, failures, infos = [], {}, [], {}
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
            ikey = None
            if inspect is not None and len(inspect) and glabel == SINGLETON:
                ikey = job_key(
                    {**context, "method": method, "opts": opts, "inspect": inspect.ids.tolist()},
                    m=method,
                    inspect=len(inspect),
                )
            label = f"{method}|{glabel}"
            need_main, need_inspect = not store.has(key), ikey is not None and not store.has(ikey)
            att = None
            if need_main or need_inspect:
                try:
                    t0 = time.perf_counter()
                    att = run.method(method, task, **user_opts).cache(train, grouping)
                    cache_seconds = time.perf_counter() - t0
                    if need_main:
                        t0 = time.perf_counter()
                        mean_scores = att.attribute(mean_prop)
                        seconds = cache_seconds + time.perf_counter() - t0
                        arrays = {"mean": np.asarray(mean_scores, dtype=np.float64)}
                        t1 = time.perf_counter()
                        if example_prop is not None:
                            arrays["example"] = np.asarray(att.attribute(example_prop), dtype=np.float64)
                        meta = {
                            "attribution_seconds": seconds,
                            "grouping_seconds": grouping.seconds,
                            "example_seconds": time.perf_counter() - t1,
                            "method_record": method_record(att, opts),
                        }
                        store.put(key, arrays, meta)
                    if need_inspect:
                        per_point = att.attribute(ExampleLoss(inspect.X, inspect.y))
                        store.put(
                            ikey,
                            {"scores": np.asarray(per_point, dtype=np.float64)},
                            {"target_ids": inspect.ids.tolist(), "method_record": method_record(att, opts)},
                        )
                except Exception as exc:
                    failures.append(
                        {"stage": "attribution", "label": label, "error": f"{type(exc).__name__}: {exc}"}
                    )
                    log(f"  {label} failed: {exc}")
                    continue
            arrays, meta = store.get(key)
            if ikey is not None:
                inspected, imeta = store.get(ikey)
                arrays = {**arrays, "inspect": inspected["scores"]}
                infos.setdefault(method, imeta.get("method_record", {}))
            if "method_record" in meta:
                infos.setdefault(method, meta["method_record"])
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
    return rows, scores, failures, infos


def method_record(att, options: dict) -> dict:
    """How a method actually ran, as JSON: every constructor option with the value the built
    method holds (the given one, else its default), and the method's own ``info`` (resolved
    damping λ, TRAK's projection size, CG iterations, ...), so a report can state them."""
    import inspect as _inspect

    from ggda.methods.base import method_options

    def plain(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (np.integer, np.floating)):
            return v.item()
        if isinstance(v, (list, tuple)) and len(v) <= 16:
            return [plain(x) for x in v]
        if isinstance(v, dict) and len(v) <= 32:
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return f"{len(v)} items"
        return type(v).__name__

    defaults = {}
    for klass in reversed(type(att).__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in _inspect.signature(init).parameters.values():
            if p.default is not p.empty:
                defaults[p.name] = p.default
    used = {}
    for name in sorted(method_options(type(att))):
        if name in options:
            used[name] = options[name]
        elif hasattr(att, name) and not callable(getattr(att, name)):
            used[name] = getattr(att, name)
        elif name in defaults:
            used[name] = defaults[name]
    if isinstance(used.get("checkpoints"), (list, tuple)):
        used["checkpoints"] = f"{len(used['checkpoints'])} checkpoints"
    record = {"options": {k: plain(v) for k, v in used.items()}}
    info = getattr(att, "info", None)
    if isinstance(info, dict) and info:
        record["info"] = {str(k): plain(v) for k, v in info.items()}
    damping = getattr(att, "lambda_", None)
    if isinstance(damping, (int, float, np.floating)):
        record["resolved_damping"] = float(damping)
    return record


def _gdigest(grouping: Grouping) -> str:
    import hashlib

    return hashlib.sha1(grouping.labels.tobytes()).hexdigest()[:16]


def _noisy_detection(
    config: ExperimentConfig, data_spec: DataSpec, model_spec_name: str, out: Path, log: Log, clean: Dataset
) -> tuple[list[dict], dict[str, dict], list[dict], dict, dict]:
    """Train on flipped labels, then rank points by self-influence / test harm per method × grouping.

    The whole stage is stored under ``OUT/noisy-results`` keyed by everything it depends on, so a
    rerun loads it instead of retraining the noisy model. The fifth value holds, per method and
    ranking, the top flagged training points of per-point attribution (ids, suspicion, given
    label, original label from ``clean``, whether flipped) for the report.
    """
    from ggda.evaluate.noisy_labels import inspection_order
    from ggda.report.select import FLAGGED

    spec = DataSpec(**{**data_spec.to_dict(), "noise": config.noise, "noise_seed": config.seed})
    store = ResultStore(out / "noisy-results")
    key = job_key(
        {
            "data": spec.to_dict(),
            "model": model_spec_name,
            "train": config.train_config().to_dict(),
            "methods": config.methods,
            "method_options": config.method_options,
            "groupings": config.groupings,
            "ks": config.ks,
            "grouping_options": config.grouping_options,
            "per_class": config.per_class,
            "flagged": FLAGGED,
            "device": config.device,
        },
        stage="noisy",
    )
    if store.has(key):
        _, meta = store.get(key)
        log(f"noisy labels: loaded from {store.root}")
        return meta["rows"], meta["curves"], meta["failures"], meta["info"], meta["flagged"]
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
    rows, curves, flagged = [], {}, {}
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
                if glabel == SINGLETON:
                    top = inspection_order(suspicion, config.seed)[:FLAGGED]
                    ids = train.ids[top]
                    flagged.setdefault(method, {})[ranking] = {
                        "ids": ids.tolist(),
                        "suspicion": np.asarray(suspicion)[top].tolist(),
                        "given": train.y[top].tolist(),
                        "original": clean.y[clean.positions_of(ids)].tolist(),
                        "flipped": train.noisy[top].tolist(),
                        "auc": float(det.row()["auc"]),
                    }
            log(f"  {label:32s} AUC self {rows[-2]['auc']:.3f}, test-harm {rows[-1]['auc']:.3f}")
    store.put(
        key,
        {"n_flipped": np.asarray([info["n_flipped"]])},
        {"rows": rows, "curves": curves, "failures": failures, "info": info, "flagged": flagged},
    )
    return rows, curves, failures, info, flagged


def save_inspection(
    out: Path,
    config: ExperimentConfig,
    data_spec: DataSpec,
    train: Dataset,
    targets: Dataset,
    groupings: dict[str, Grouping],
    scores: dict[str, dict[str, np.ndarray]],
    flagged: dict,
) -> Path:
    """Write ``OUT/inspect/inspect.json`` + ``inspect.npz``: everything the report's data views
    read (and nothing else is read for them).

    Saved: target test points and, per method, their per-point scores over all training points;
    per grouping at the gallery K, its labels and group scores; the flagged noisy-label points;
    and the *display form* (un-standardised features) of exactly the training points the
    report's selection (:mod:`ggda.report.select`) picks from those numbers, plus the targets.
    """
    from ggda.report import select

    insp = out / "inspect"
    insp.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"train_ids": train.ids, "train_y": train.y}
    record: dict = {
        "version": 1,
        "data": train.name,
        "kind": train.kind,
        "class_names": [str(c) for c in train.meta.get("classes", [])] or None,
        "feature_names": list(train.feature_names) if train.feature_names else None,
        "methods": list(config.methods),
        "seed": config.seed,
        "top_k": select.TOP_K,
        "point_scores": {},
        "groupings": {},
        "flagged": flagged,
    }
    shape = tuple(train.input_shape or ())
    image = len(shape) >= 2 and int(np.prod(shape)) == train.n_features
    record["modality"] = "image" if image else "tabular"
    record["image_shape"] = list(shape) if image else None
    shown: set[int] = set()
    for i, method in enumerate(config.methods):
        per_point = scores.get(f"{method}|{SINGLETON}", {}).get("inspect")
        if per_point is None:
            continue
        name = f"point_{i}"
        arrays[name] = np.asarray(per_point, dtype=np.float64)
        record["point_scores"][method] = name
        for row in arrays[name]:
            helpful, harmful = select.top_bottom(row, select.TOP_K)
            shown.update(helpful.tolist() + harmful.tolist())
    ks = [g.n_groups for label, g in groupings.items() if label != SINGLETON]
    record["gallery_k"] = gk = select.gallery_k(ks)
    for j, (glabel, grouping) in enumerate(groupings.items()):
        if glabel == SINGLETON or grouping.n_groups != gk:
            continue
        entry = {
            "grouping": _split_label(glabel)[0],
            "K": grouping.n_groups,
            "labels": f"labels_{j}",
            "scores": {},
        }
        arrays[f"labels_{j}"] = grouping.labels
        for i, method in enumerate(config.methods):
            mean = scores.get(f"{method}|{glabel}", {}).get("mean")
            if mean is None:
                continue
            arrays[f"gscore_{j}_{i}"] = (
                np.asarray(mean, dtype=np.float64).reshape(-1, grouping.n_groups).mean(0)
            )
            entry["scores"][method] = f"gscore_{j}_{i}"
        if entry["scores"]:
            first = arrays[next(iter(entry["scores"].values()))]
            for g in select.gallery_groups(first, select.GALLERY_GROUPS):
                shown.update(
                    select.gallery_members(
                        grouping.labels, int(g), select.GALLERY_MEMBERS, config.seed
                    ).tolist()
                )
        record["groupings"][glabel] = entry
    flagged_ids = {i for by_rank in flagged.values() for f in by_rank.values() for i in f["ids"]}
    raw_train, raw_test, _ = prepare_data(DataSpec(**{**data_spec.to_dict(), "standardize": False}))
    positions = sorted(
        shown | set(train.positions_of(sorted(flagged_ids)).tolist()) if flagged_ids else shown
    )
    ids = train.ids[np.asarray(positions, dtype=np.int64)] if positions else np.zeros(0, np.int64)
    arrays["display_ids"] = ids
    arrays["display_X"] = np.asarray(raw_train.X[raw_train.positions_of(ids)], dtype=np.float32)
    arrays["target_ids"] = targets.ids
    arrays["target_y"] = targets.y
    arrays["target_X"] = np.asarray(raw_test.X[raw_test.positions_of(targets.ids)], dtype=np.float32)
    save_npz(insp / "inspect.npz", **arrays)
    save_json(insp / "inspect.json", record, indent=1, default=_json_default)
    return insp


def versions() -> dict[str, str]:
    """Versions of the packages behind the numbers (for the report's provenance block)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("ggda", "torch", "numpy", "scikit-learn", "pandas", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def experiment_command(config: ExperimentConfig, out: str | Path) -> str:
    """The ``ggda experiment`` line that regenerates this experiment (non-default options only;
    options the CLI does not expose are named after a ``#``)."""
    import shlex

    default = ExperimentConfig()
    listed = {"methods", "groupings", "ks", "fractions", "prune_fractions"}
    flags, python_only = [], []
    for name, value in config.to_dict().items():
        if value == getattr(default, name):
            continue
        flag = "--" + name.replace("_", "-")
        if name in listed:
            flags += [flag, ",".join(str(v) for v in value)]
        elif name in ("method_options", "grouping_options"):
            kind = "--opt" if name == "method_options" else "--gopt"
            for scope, opts in value.items():
                for k, v in opts.items():
                    flags += [kind, f"{scope}:{k}={str(v).lower() if isinstance(v, bool) else v}"]
        elif name == "per_class":
            flags.append("--per-class" if value else "--no-per-class")
        elif name == "fill":
            python_only.append(f"{name}={value!r}")
        elif value is not None:
            flags += [flag, str(value)]
    line = shlex.join(["ggda", "experiment", *flags, "--out", str(out)])
    return line + (f"  # and in ExperimentConfig: {', '.join(python_only)}" if python_only else "")


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
    config: ExperimentConfig,
    out: str | Path,
    log: Log = print,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Run (or resume) the experiment into ``out``; returns the results dict also saved as results.json.

    ``command`` is the line that regenerates it (default: :func:`experiment_command`); it is
    recorded with package versions and seeds in ``results["provenance"]``. The data views of the
    report are saved under ``OUT/inspect`` (:func:`save_inspection`).
    """
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
    from ggda.report.select import pick_targets

    inspect = test.subset(pick_targets(test.y, config.inspect_targets))
    att_rows, scores, fails, method_records = attribute_all(
        config,
        run,
        task,
        groupings,
        ResultStore(out / "attributions"),
        context,
        log,
        lds_targets,
        inspect,
    )
    failures += fails
    attributions = pd.DataFrame(att_rows)
    rankings = {
        row["label"]: (scores[row["label"]]["mean"], groupings[row["label"].split("|", 1)[1]])
        for row in att_rows
    }

    # -- every retrain of the experiment, planned up front and run in one batch --------------
    retrainer = retrainer_for(
        run, out / "retrains", config.backend, config.workers, device=config.device, progress=progress
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

    noisy_rows, noisy_curves, noisy_info, flagged = [], {}, {}, {}
    if config.noise > 0:
        log("noisy-label detection")
        noisy_rows, noisy_curves, fails, noisy_info, flagged = _noisy_detection(
            config, data_spec, config.noisy_model or config.model, out, log, train
        )
        failures += fails
    save_inspection(out, config, data_spec, train, inspect, groupings, scores, flagged)
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
        "provenance": {
            "command": command or experiment_command(config, out),
            "versions": versions(),
            "methods": method_records,
            "seeds": {
                "model": f"training seed {config.seed}; split seed {config.seed}",
                "retraining": f"each retraining-score and pruning point: mean over retraining seeds {seeds}",
                "lds": f"{config.lds_subsets} subsets drawn with seed {config.seed}, one retrain each (seed 0)",
                "noisy": f"labels flipped with seed {config.seed}; noisy model trained with seed {config.seed}",
                "groupings": f"grouping seed {config.seed}",
            },
        },
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
