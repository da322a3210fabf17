"""Further training and scoring a text classifier through its frozen prefix (ggda.gold.prefix)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from ggda.data.dataset import Dataset  # noqa: E402
from ggda.data.grouping import Grouping  # noqa: E402
from ggda.gold import GoldConfig, compute_gold, select_units  # noqa: E402
from ggda.gold.prefix import frozen_prefix_view, has_frozen_prefix  # noqa: E402
from ggda.methods import make_method  # noqa: E402
from ggda.models.text import TextClassifier  # noqa: E402
from ggda.properties import ExampleLoss  # noqa: E402
from ggda.task import AttributionTask  # noqa: E402


def _classifier(train_layers: int) -> TextClassifier:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return TextClassifier(BertModel(cfg).eval(), n_classes=2, train_layers=train_layers, head="mlp", hidden=8)


def _tokens(n: int, seed: int) -> Dataset:
    """Packed rows [input_ids | attention_mask] (length 8, every other row padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (n, 8), generator=g)
    mask = torch.ones(n, 8, dtype=torch.long)
    mask[::2, 5:] = 0
    ids[mask == 0] = 0
    y = torch.randint(0, 2, (n,), generator=g).numpy()
    return Dataset(X=torch.cat([ids, mask], 1).numpy().astype(np.float32), y=y)


@pytest.mark.parametrize("train_layers", [0, 1])
def test_gold_and_scores_through_the_prefix_equal_the_whole_model(train_layers):
    model = _classifier(train_layers).double()
    task = AttributionTask(model)
    train, test = _tokens(12, 0), _tokens(3, 1)
    assert has_frozen_prefix(task)
    tail, (train_v, test_v) = frozen_prefix_view(task, train, test)
    assert tail.n_params == task.n_params and len(train_v) == len(train)
    np.testing.assert_array_equal(train_v.ids, train.ids)
    units = select_units(Grouping.singleton(12), n_units=4, seed=0)
    cfg = GoldConfig(epochs=2, seeds=2, lr=0.05, batch_size=4, path="sequential")
    whole = compute_gold(task, train.X, train.y, ExampleLoss(test.X, test.y), units, cfg)
    model.load_state_dict(_classifier(train_layers).double().state_dict())  # θ^f again
    viewed = compute_gold(tail, train_v.X, train_v.y, ExampleLoss(test_v.X, test_v.y), units, cfg)
    # same trajectory: prefix rows are held in float32, so agreement is to float32 rounding
    np.testing.assert_allclose(viewed.loo, whole.loo, rtol=1e-5)
    np.testing.assert_allclose(viewed.full, whole.full, rtol=1e-5)
    scale = np.abs(whole.gold_raw).max()
    assert scale > 0
    np.testing.assert_allclose(viewed.gold_raw, whole.gold_raw, atol=1e-3 * scale)
    dot = make_method("grad-dot", task).cache(train).attribute(ExampleLoss(test.X, test.y))
    dot_v = make_method("grad-dot", tail).cache(train_v).attribute(ExampleLoss(test_v.X, test_v.y))
    np.testing.assert_allclose(dot_v, dot, rtol=1e-4, atol=1e-6 * np.abs(dot).max())


def test_other_models_pass_through_unchanged():
    task = AttributionTask(nn.Sequential(nn.Linear(3, 2)))
    data = Dataset(X=np.zeros((4, 3), np.float32), y=np.array([0, 1, 0, 1]))
    assert not has_frozen_prefix(task)
    same, (view,) = frozen_prefix_view(task, data)
    assert same is task and view is data
    # a text classifier attributed through a subset of its parameters keeps the whole model
    text = AttributionTask(_classifier(1), layers=["head"])
    assert not has_frozen_prefix(text)
