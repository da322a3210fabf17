import numpy as np
import pytest
import torch

from ggda.errors import GGDAError
from ggda.gradients import per_example_gradients
from ggda.groups import Grouping, random_grouping
from ggda.methods import GradCos, GradDot, TracInCP, make_method
from ggda.models import TrainConfig, build_model, train_model
from ggda.properties import CallableProperty, ExampleLoss, Margin, MeanLoss
from ggda.task import AttributionTask


@pytest.fixture(scope="module")
def setup(small_digits, trained_mlp):
    train, test = small_digits
    return AttributionTask(trained_mlp), train, ExampleLoss(test.X[:10], test.y[:10])


@pytest.mark.parametrize("cls", [GradDot, GradCos])
def test_singleton_matches_brute_force(setup, cls):
    task, train, prop = setup
    G = per_example_gradients(task, train.X, train.y)
    Gt = per_example_gradients(task, prop.X, prop.y)
    ref = Gt @ G.T
    if cls is GradCos:
        ref = ref / Gt.norm(dim=1, keepdim=True) / G.norm(dim=1)[None]
    scores = cls(task).cache(train).attribute(prop)
    assert scores.shape == (10, len(train))
    assert np.allclose(scores, ref.numpy(), rtol=1e-4, atol=1e-6)


def test_group_graddot_is_sum_of_members(setup):
    task, train, prop = setup
    grouping = random_grouping(len(train), 17, seed=2)
    per_point = GradDot(task).cache(train).attribute(prop)
    grouped = GradDot(task).cache(train, grouping).attribute(prop)
    summed = np.zeros_like(grouped)
    np.add.at(summed.T, grouping.labels, per_point.T)
    assert np.allclose(grouped, summed, rtol=1e-5, atol=1e-5 * np.abs(summed).max())
    mean = GradDot(task, aggregate="mean").cache(train, grouping).attribute(prop)
    assert np.allclose(mean, grouped / grouping.sizes, rtol=1e-6)


def test_streaming_equals_cached(setup):
    task, train, prop = setup
    grouping = random_grouping(len(train), 30, seed=0)
    cached = GradDot(task).cache(train, grouping).attribute(prop)
    streamed = GradDot(task, memory_mb=1e-3, max_batch=32).cache(train, grouping).attribute(prop)
    assert np.allclose(cached, streamed, rtol=1e-5, atol=1e-6)


def test_sign_positive_means_helpful(small_digits, trained_mlp):
    """Positive score = helpful: one small SGD step on point j changes the target loss by
    about -lr * score_j, so training on a positively scored point lowers the target loss."""
    import copy

    train, test = small_digits
    task = AttributionTask(trained_mlp)
    prop = ExampleLoss(test.X[:1], test.y[:1])
    scores = GradDot(task).cache(train).attribute(prop)[0]
    lr = 1e-3
    before = float(prop.values(task)[0])
    for j in list(np.argsort(scores)[:3]) + list(np.argsort(scores)[-3:]):
        model = copy.deepcopy(trained_mlp)
        loss = torch.nn.functional.cross_entropy(
            model(torch.as_tensor(train.X[j : j + 1])), torch.as_tensor(train.y[j : j + 1])
        )
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        after = float(prop.values(AttributionTask(model))[0])
        assert np.sign(before - after) == np.sign(scores[j])
        assert np.isclose(before - after, lr * scores[j], rtol=0.1, atol=1e-7)


@pytest.mark.slow
def test_tracin_matches_manual_and_checkpoints(small_digits, tmp_path):
    train, test = small_digits
    model = build_model("mlp-s", train.n_features, 10, seed=0)
    res = train_model(
        model, train, TrainConfig(epochs=4, lr=0.05, checkpoint_every=2), checkpoint_dir=tmp_path
    )
    task = AttributionTask(model)
    prop = ExampleLoss(test.X[:5], test.y[:5])
    grouping = random_grouping(len(train), 20, seed=0)
    scores = TracInCP(task, checkpoints=res.checkpoints).cache(train, grouping).attribute(prop)
    manual = 0
    for c in res.checkpoints:
        manual = manual + c.lr * GradDot(task.at(c.path)).cache(train, grouping).attribute(prop)
    assert np.allclose(scores, manual, rtol=1e-5)
    no_lr = TracInCP(task, checkpoints=[c.path for c in res.checkpoints], use_lr=False).cache(train, grouping)
    assert np.allclose(no_lr.attribute(prop), manual / 0.05, rtol=1e-5)
    per_point = TracInCP(task, checkpoints=res.checkpoints).cache(train).attribute(prop)
    summed = np.zeros_like(scores)
    np.add.at(summed.T, grouping.labels, per_point.T)
    assert np.allclose(scores, summed, rtol=1e-4, atol=1e-5 * np.abs(summed).max())


def test_properties(setup):
    task, train, prop = setup
    mean = MeanLoss(prop.X, prop.y)
    g_mean = mean.gradients(task)
    assert torch.allclose(g_mean[0], prop.gradients(task).mean(0), atol=1e-6)
    margin = Margin(prop.X, prop.y)
    out = task.forward(task.params(), torch.as_tensor(prop.X))
    y = torch.as_tensor(prop.y)
    others = out.clone()
    others[torch.arange(len(y)), y] = -torch.inf
    expected = -(out[torch.arange(len(y)), y] - torch.logsumexp(others, 1))
    assert torch.allclose(margin.values(task), expected, atol=1e-5)
    custom = CallableProperty(
        lambda fwd: torch.nn.functional.cross_entropy(fwd(prop.X), torch.as_tensor(prop.y), reduction="none")
    )
    assert torch.allclose(custom.gradients(task), prop.gradients(task), atol=1e-5)
    higher = CallableProperty(
        lambda fwd: (
            -torch.nn.functional.cross_entropy(fwd(prop.X), torch.as_tensor(prop.y), reduction="none")
        ),
        higher_is_better=True,
    )
    assert torch.allclose(higher.gradients(task), prop.gradients(task), atol=1e-5)


def test_errors(setup):
    task, train, prop = setup
    with pytest.raises(GGDAError, match="grad-dot"):
        make_method("influence-magic", task)
    with pytest.raises(GGDAError, match="before attribute"):
        GradDot(task).attribute(prop)
    with pytest.raises(GGDAError, match="one group id per training point"):
        GradDot(task).cache(train, Grouping(np.arange(5)))
    with pytest.raises(GGDAError, match="sum, mean"):
        GradDot(task, aggregate="median")


def test_margin_gradients_on_the_generic_vmap_path(setup):
    """Margin must work under vmap (the generic path used for models the fast path does not cover)."""
    task, train, prop = setup
    margin = Margin(prop.X, prop.y)
    fast = margin.gradients(task)
    generic = margin.gradients(task.generic())
    assert torch.allclose(fast, generic, atol=1e-5)
