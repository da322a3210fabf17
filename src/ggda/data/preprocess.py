"""Seeded splitting, standardisation and label-noise injection.

Standardisation statistics are fitted on the *training* split only and applied to both splits,
so the test set never leaks into the features the model or a grouping sees.

Regression targets are standardised the same way (:class:`TargetScaler`): a target in the
thousands (a price, a weight) would otherwise give squared errors of ~10⁶ and a diverging loss at
any usual learning rate. The model is trained — and attributed — on the standardised target:
the attribution loss must be the objective the model minimised, and rescaling the target by
1/s multiplies every squared error, gradient product and group score by the same 1/s², so
rankings, correlations (LDS) and signs are unchanged. Predictions and test metrics are reported
in the original units through the scaler recorded with the data (``meta``) and the run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError


def train_test_split(
    data: Dataset, test_fraction: float = 0.2, seed: int = 0, stratify: bool = True
) -> tuple[Dataset, Dataset]:
    """Seeded split into (train, test); stratified by class for classification."""
    if not 0.0 < test_fraction < 1.0:
        raise GGDAError(f"test_fraction={test_fraction} must lie strictly between 0 and 1, e.g. 0.2.")
    rng = np.random.default_rng(seed)
    n = len(data)
    if stratify and data.kind == "classification":
        test_idx = []
        for c in range(int(data.n_classes or 0)):
            members = np.flatnonzero(data.y == c)
            rng.shuffle(members)
            test_idx.append(members[: int(round(test_fraction * len(members)))])
        test = np.sort(np.concatenate(test_idx)) if test_idx else np.array([], dtype=int)
    else:
        perm = rng.permutation(n)
        test = np.sort(perm[: int(round(test_fraction * n))])
    mask = np.zeros(n, dtype=bool)
    mask[test] = True
    if mask.all() or not mask.any():
        classes = int(data.n_classes or 0) if data.kind == "classification" else 0
        if stratify and classes and not mask.any():
            largest = int(np.bincount(np.asarray(data.y, dtype=np.int64), minlength=classes).max())
            raise GGDAError(
                f"The label of '{data.name}' has {classes} classes in {n} rows (at most {largest} rows "
                f"each): too few per class for a stratified test split of {test_fraction:g}; check that "
                "the label column holds classes (train with --regression for a numeric target) or "
                "merge rare classes."
            )
        raise GGDAError(f"Split of {n} rows left one side empty; use more data or a test_fraction near 0.2.")
    return (
        data.subset(np.flatnonzero(~mask), name=data.name),
        data.subset(np.flatnonzero(mask), name=f"{data.name}-test"),
    )


@dataclass
class Standardizer:
    """Per-feature z-scoring fitted on training data (constant features are left centred)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, data: Dataset) -> Standardizer:
        mean = data.X.mean(axis=0)
        std = data.X.std(axis=0)
        std = np.where(std < 1e-8, 1.0, std)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def transform(self, data: Dataset) -> Dataset:
        if data.n_features != len(self.mean):
            raise GGDAError(
                f"Standardizer was fitted on {len(self.mean)} features but '{data.name}' has "
                f"{data.n_features}; fit it on data with the same columns."
            )
        return replace(data, X=(data.X - self.mean) / self.scale, meta=dict(data.meta))

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Standardizer:
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["scale"], np.float32))


@dataclass
class TargetScaler:
    """z-scoring of a regression target, fitted on the training split (``y' = (y - mean) / scale``).

    The fitted values travel with the data in ``meta["target_mean"]``/``meta["target_scale"]``
    (and in a run's ``run.json``), so any consumer can report in the original units.
    """

    mean: float
    scale: float

    @classmethod
    def fit(cls, data: Dataset) -> TargetScaler:
        if data.kind != "regression":
            raise GGDAError(f"'{data.name}' is a {data.kind} data set; only regression targets are scaled.")
        y = np.asarray(data.y, dtype=np.float64)
        std = float(y.std()) if len(y) else 1.0
        return cls(float(y.mean()) if len(y) else 0.0, std if std > 1e-12 else 1.0)

    def transform(self, data: Dataset) -> Dataset:
        y = ((np.asarray(data.y, dtype=np.float64) - self.mean) / self.scale).astype(np.float32)
        return replace(data, y=y, meta={**data.meta, **self.to_meta()})

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Standardised targets or predictions back in the original units."""
        return np.asarray(y, dtype=np.float64) * self.scale + self.mean

    def to_meta(self) -> dict:
        return {"target_mean": self.mean, "target_scale": self.scale}

    @classmethod
    def of(cls, data: Dataset) -> TargetScaler:
        """The scaler applied to ``data`` (identity when its target was not standardised)."""
        return cls(float(data.meta.get("target_mean", 0.0)), float(data.meta.get("target_scale", 1.0)))


def flip_labels(data: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """Flip ``fraction`` of the labels to a different, uniformly chosen class.

    Returns a copy whose ``noisy`` mask records exactly which rows were flipped, so noisy-label
    detection can be scored against the truth.
    """
    if data.kind != "classification":
        raise GGDAError("Label noise needs a classification data set; regression targets have no classes.")
    if not 0.0 <= fraction <= 1.0:
        raise GGDAError(f"fraction={fraction} must be in [0, 1], e.g. 0.1 for 10% flipped labels.")
    C = int(data.n_classes or 0)
    if C < 2:
        raise GGDAError("Label noise needs at least two classes.")
    rng = np.random.default_rng(seed)
    n_flip = int(round(fraction * len(data)))
    rows = rng.choice(len(data), size=n_flip, replace=False)
    y = data.y.copy()
    shift = rng.integers(1, C, size=n_flip)  # never 0, so the new label always differs
    y[rows] = (y[rows] + shift) % C
    noisy = np.zeros(len(data), dtype=bool) if data.noisy is None else data.noisy.copy()
    noisy[rows] = True
    return replace(data, y=y, noisy=noisy, meta=dict(data.meta))
