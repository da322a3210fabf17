"""What data a run was trained on, as a value: a :class:`DataSpec` and the one function that
turns it into the (train, test) split every stage sees.

Why in the data layer: retraining workers, the gold standard and the experiment must rebuild
exactly the same split from a few picklable fields (a bundled name or a file, label, split seed,
noise, scaling) without holding a run directory; run directories (:mod:`ggda.runs`) store the
spec, they do not define it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ggda.data.bundled import BUNDLED_DATASETS, OFFICIAL_TEST_SPLITS, load_dataset
from ggda.data.dataset import Dataset
from ggda.data.files import ACCEPTED, file_format, load_file
from ggda.data.preprocess import Standardizer, TargetScaler, flip_labels, train_test_split
from ggda.errors import GGDAError


@dataclass
class DataSpec:
    """How to (re)build the train/test data of a run.

    ``kind="auto"`` lets the label decide (:func:`ggda.data.files.infer_label_kind`);
    :meth:`Run.create` records the kind it resolved to. ``standardize_target`` z-scores a
    regression target on the training split (see :mod:`ggda.data.preprocess` for why the model
    and its attributions stay on that scale).
    """

    source: str  # bundled name or file path
    label: str | None = None
    categorical: list[str] = field(default_factory=list)
    group_column: str | None = None
    kind: str = "classification"
    test_fraction: float = 0.2
    split_seed: int = 0
    standardize: bool = True
    noise: float = 0.0
    noise_seed: int = 0
    max_train: int | None = None  # subsample the training split (seeded) for quick runs
    id_column: str | None = None  # a column of unique integer data ids (default: row numbers)
    standardize_target: bool = True  # z-score a regression target (train-split mean and std)
    #: options of a loader that needs more than a name: for ``reviews`` (the text data of
    #: ``ggda text-train``) ``n``, ``balanced``, ``seed``, ``max_len`` and ``model_path`` (tokenizer)
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ggda.options import COUNT, FRACTION, NONNEG_INT, PROBABILITY, Spec, check_fields

        check_fields(
            self,
            {
                "source": Spec(str),
                "kind": Spec(str, choices=("classification", "regression", "auto")),
                "test_fraction": FRACTION,
                "split_seed": NONNEG_INT,
                "noise": PROBABILITY,
                "noise_seed": NONNEG_INT,
                "max_train": COUNT.optional(),
            },
            flags={"split_seed": "--seed", "noise_seed": "--seed", "kind": "--regression"},
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)


#: Bundled text data: rebuilt as packed token rows by :func:`load_text_source`.
TEXT_SOURCES = ("reviews",)


def load_text_source(spec: DataSpec) -> Dataset:
    """The clothing reviews tokenised for the packaged MiniLM (or ``options["model_path"]``), as
    ``ggda text-train`` trained on them: ``label`` is the target (sentiment, recommended, rating)."""
    from ggda.data.text import clothing_reviews, token_dataset
    from ggda.models.text import load_tokenizer

    if spec.standardize:
        raise GGDAError(
            f"'{spec.source}' is text (token ids for a transformer); train on it with `ggda text-train`, "
            "not `ggda train`."
        )
    o = spec.options
    unknown = sorted(set(o) - {"n", "balanced", "seed", "max_len", "model_path"})
    if unknown:
        raise GGDAError(
            f"The reviews data spec has unknown options {', '.join(unknown)}; rerun `ggda text-train` (or restore run.json)."
        )
    corpus = clothing_reviews(
        target=spec.label or "sentiment",
        n=o.get("n"),
        balanced=bool(o.get("balanced", False)),
        seed=int(o.get("seed", 0)),
    )
    return token_dataset(corpus, load_tokenizer(o.get("model_path")), int(o.get("max_len", 128)))


def load_source(spec: DataSpec) -> Dataset:
    if spec.source in TEXT_SOURCES:
        return load_text_source(spec)
    if spec.source in BUNDLED_DATASETS:
        return load_dataset(spec.source)
    path = Path(spec.source)
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name too long to be a path is not one
        exists = False
    if exists or file_format(path) is not None:
        return load_file(
            path,
            label=spec.label,
            categorical=spec.categorical or None,
            group_column=spec.group_column,
            id_column=spec.id_column,
            kind=spec.kind,  # type: ignore[arg-type]
        )
    raise GGDAError(
        f"Unknown data set '{spec.source}'; choose one of {', '.join(BUNDLED_DATASETS)} or pass a "
        f"file: {ACCEPTED}."
    )


def prepare_data(spec: DataSpec) -> tuple[Dataset, Dataset, Standardizer | None]:
    """Load, split (seeded), subsample, inject label noise and standardise: (train, test, scaler).

    A regression target is standardised too (``spec.standardize_target``) with the training
    split's mean and std; the values are in both data sets' ``meta`` (:class:`TargetScaler`)."""
    data = load_source(spec)
    if spec.source in OFFICIAL_TEST_SPLITS:
        train, test = data, OFFICIAL_TEST_SPLITS[spec.source]()
    else:
        train, test = train_test_split(data, spec.test_fraction, spec.split_seed)
    if spec.max_train is not None and spec.max_train < len(train):
        keep = np.sort(
            np.random.default_rng(spec.split_seed).choice(len(train), spec.max_train, replace=False)
        )
        train = train.subset(keep)
    if spec.noise > 0:
        train = flip_labels(train, spec.noise, spec.noise_seed)
    scaler = None
    if spec.standardize:
        scaler = Standardizer.fit(train)
        train, test = scaler.transform(train), scaler.transform(test)
    if spec.standardize_target and train.kind == "regression":
        target = TargetScaler.fit(train)
        train, test = target.transform(train), target.transform(test)
    return train, test, scaler
