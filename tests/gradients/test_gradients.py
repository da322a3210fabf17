import numpy as np
import pytest
import torch

from ggda.gradients import group_gradients, iter_group_gradients, per_example_gradients, summed_gradient
from ggda.groups import Grouping, random_grouping
from ggda.task import AttributionTask


def loop_gradients(model, X, y):
    """Reference: one plain backward per example."""
    rows = []
    for i in range(len(X)):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            model(torch.as_tensor(X[i : i + 1])), torch.as_tensor(y[i : i + 1])
        )
        loss.backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


def test_per_example_equals_loop(small_digits, trained_mlp):
    train, _ = small_digits
    X, y = train.X[:25], train.y[:25]
    G = per_example_gradients(AttributionTask(trained_mlp), X, y, chunk_size=7)
    assert torch.allclose(G, loop_gradients(trained_mlp, X, y), atol=1e-6)


def test_group_gradient_is_sum_of_members(small_digits, trained_mlp):
    train, _ = small_digits
    task = AttributionTask(trained_mlp)
    G = per_example_gradients(task, train.X, train.y)
    # mixed sizes: many small groups (vmap tiles) and two large ones (batched backward)
    labels = np.concatenate([np.repeat([0, 1], [120, 90]), 2 + np.arange(90) // 3])
    grouping = Grouping(np.random.default_rng(0).permutation(labels))
    GG = group_gradients(task, train.X, train.y, grouping, max_batch=64)
    ref = torch.zeros_like(GG).index_add_(0, torch.as_tensor(grouping.labels), G)
    assert torch.allclose(GG, ref, atol=1e-5, rtol=1e-5)


def test_group_gradient_one_batched_backward(small_digits, trained_mlp):
    train, _ = small_digits
    task = AttributionTask(trained_mlp)
    members = np.arange(0, 300, 7)
    trained_mlp.zero_grad()
    out = trained_mlp(torch.as_tensor(train.X[members]))
    torch.nn.functional.cross_entropy(out, torch.as_tensor(train.y[members]), reduction="sum").backward()
    ref = torch.cat([p.grad.flatten() for p in trained_mlp.parameters()])
    assert torch.allclose(summed_gradient(task, train.X[members], train.y[members]), ref, atol=1e-5)


def test_every_group_yielded_once(small_digits, trained_mlp):
    train, _ = small_digits
    grouping = random_grouping(len(train), 37, seed=1)
    seen = np.concatenate(
        [
            g
            for g, _ in iter_group_gradients(
                AttributionTask(trained_mlp), train.X, train.y, grouping, max_batch=16
            )
        ]
    )
    assert sorted(seen.tolist()) == list(range(37))


def test_layer_restriction(small_digits, trained_mlp):
    train, _ = small_digits
    full = AttributionTask(trained_mlp)
    last = AttributionTask(trained_mlp, layers=["2"])
    assert last.param_names == ["2.weight", "2.bias"]
    G_full = per_example_gradients(full, train.X[:5], train.y[:5])
    G_last = per_example_gradients(last, train.X[:5], train.y[:5])
    sl = full.layer_slices()
    assert torch.allclose(G_last, torch.cat([G_full[:, sl["2.weight"]], G_full[:, sl["2.bias"]]], 1))


def test_bad_layers_and_grouping(small_digits, trained_mlp):
    from ggda.errors import GGDAError

    with pytest.raises(GGDAError, match="choose from"):
        AttributionTask(trained_mlp, layers=["fc9"])
    train, _ = small_digits
    with pytest.raises(GGDAError, match="one group id per training point"):
        group_gradients(AttributionTask(trained_mlp), train.X, train.y, Grouping(np.zeros(10, dtype=int)))


def test_cnn_group_gradients(small_digits):
    from ggda.models import build_model

    train, _ = small_digits
    cnn = build_model("cnn", 64, 10, input_shape=(1, 8, 8), seed=0)
    task = AttributionTask(cnn)
    grouping = random_grouping(40, 8)
    G = per_example_gradients(task, train.X[:40], train.y[:40])
    GG = group_gradients(task, train.X[:40], train.y[:40], grouping)
    assert torch.allclose(
        GG, torch.zeros_like(GG).index_add_(0, torch.as_tensor(grouping.labels), G), atol=1e-5
    )
