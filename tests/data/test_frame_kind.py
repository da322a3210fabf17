"""``from_frame(kind=None)`` infers the task kind from the label column."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ggda.data.sources import MAX_FLOAT_CLASSES, from_frame, infer_kind


def _frame(label) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"x1": rng.normal(size=len(label)), "x2": rng.normal(size=len(label)), "y": label})


@pytest.mark.parametrize(
    ("label", "kind"),
    [
        (np.arange(60) % 3, "classification"),  # integers
        (np.arange(60) % 2 == 0, "classification"),  # booleans
        (np.where(np.arange(60) % 2, "spam", "ham"), "classification"),  # strings
        (pd.Categorical(np.where(np.arange(60) % 3, "a", "b")), "classification"),  # categorical
        ((np.arange(60) % 2).astype(float), "classification"),  # a float column of 0.0 / 1.0
        (np.linspace(9.0, 46.6, 60), "regression"),  # miles per gallon: fractional floats
        (np.arange(60, dtype=float) + 10.0, "regression"),  # whole floats, many distinct values
    ],
)
def test_kind_is_inferred_from_the_label_column(label, kind):
    data = from_frame(_frame(label), "y")
    assert infer_kind(pd.Series(label)) == kind
    assert data.kind == kind and data.meta["kind_inferred"] == kind
    if kind == "regression":
        assert data.y.dtype == np.float32 and np.allclose(data.y, np.asarray(label, dtype=np.float32))
    else:
        assert data.y.dtype == np.int64 and data.n_classes == len(pd.unique(np.asarray(label)))


def test_float_class_limit_and_explicit_kind_wins():
    whole = np.arange(60, dtype=float) % (MAX_FLOAT_CLASSES + 1)
    assert infer_kind(whole) == "regression"  # one more distinct value than the limit
    assert infer_kind(whole % MAX_FLOAT_CLASSES) == "classification"
    data = from_frame(_frame(np.arange(60) % 3), "y", kind="regression")
    assert data.kind == "regression" and "kind_inferred" not in data.meta
