"""DataInf: the Sherman–Morrison closed form against explicit per-example inverses, its sign,
damping and layer options."""

import numpy as np
import pytest
import torch

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.gradients import per_example_gradients
from ggda.methods import make_method
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    n, d, C = 50, 5, 3
    X = rng.normal(size=(n, d))
    y = rng.integers(0, C, n)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(d, 6), torch.nn.Tanh(), torch.nn.Linear(6, C)).double()
    task = AttributionTask(model)
    return task, Dataset(X, y), ExampleLoss(X[:4], y[:4])


def brute_force(task, train, prop, blocks, scale=0.1, damping=None):
    """(1/n)·∇f_lᵀ [(1/n) Σ_i (g_{i,l} g_{i,l}ᵀ + λ_l I)⁻¹] g_{j,l}, summed over layers, by explicit inverses."""
    G = per_example_gradients(task, train.X, train.y).numpy()
    Gt = prop.gradients(task).numpy()
    n = len(G)
    out = np.zeros((len(Gt), n))
    for cols in blocks:
        g = G[:, cols]
        lam = damping if damping is not None else scale * (g**2).mean()
        inv = sum(np.linalg.inv(np.outer(gi, gi) + lam * np.eye(len(cols))) for gi in g) / n
        out += Gt[:, cols] @ inv @ g.T / n
    return out


def module_blocks(task):
    blocks = {}
    for name, sl in task.layer_slices().items():
        blocks.setdefault(name.rpartition(".")[0], []).append(np.arange(sl.start, sl.stop))
    return [np.concatenate(v) for v in blocks.values()]


@pytest.fixture(params=[True, False], ids=["factors", "per-example"])
def path(request):
    """Both training-side paths: layer factors (MLPs) and materialised per-example gradients."""
    return request.param


def test_matches_explicit_average_of_inverses(setup, path):
    task, train, prop = setup
    task = task if path else task.generic()
    m = make_method("datainf", task).cache(train)
    assert (m._members is not None) == path
    scores = m.attribute(prop)
    assert np.allclose(scores, brute_force(task, train, prop, module_blocks(task)), rtol=1e-9, atol=1e-12)
    streamed = (
        make_method("datainf", task, memory_mb=1e-4, chunk_size=7, max_batch=4).cache(train).attribute(prop)
    )
    assert np.allclose(streamed, scores, rtol=1e-10, atol=1e-14)


def test_layer_by_tensor_and_fixed_damping(setup, path):
    task, train, prop = setup
    task = task if path else task.generic()
    blocks = [np.arange(sl.start, sl.stop) for sl in task.layer_slices().values()]
    scores = make_method("datainf", task, layer_by="tensor", damping=0.05).cache(train).attribute(prop)
    assert np.allclose(scores, brute_force(task, train, prop, blocks, damping=0.05), rtol=1e-9, atol=1e-12)
    with pytest.raises(GGDAError, match="layer_by"):
        make_method("datainf", task, layer_by="block")
    with pytest.raises(GGDAError, match="damping"):
        make_method("datainf", task, damping=0.0)


def test_sign_is_helpful_positive_and_tracks_grad_dot(setup):
    """With large damping (H + λI)⁻¹ → I/λ, so DataInf → Grad-Dot/(nλ): same sign, helpful-positive,
    i.e. the negative of the original DataInf output."""
    task, train, prop = setup
    lam = 1e4
    scores = make_method("datainf", task, damping=lam).cache(train).attribute(prop)
    graddot = make_method("grad-dot", task).cache(train).attribute(prop)
    assert np.allclose(scores * len(train) * lam, graddot, rtol=1e-3, atol=1e-3 * np.abs(graddot).max())
    assert np.corrcoef(scores.ravel(), graddot.ravel())[0, 1] > 0.9999


def test_group_scores_are_sums_of_member_scores(setup, path):
    """DataInf is linear in the group gradient: a group's score is the sum of its members'."""
    from ggda.groups import random_grouping

    task, train, prop = setup
    task = task if path else task.generic()
    grouping = random_grouping(len(train), 7, seed=2)
    per_point = make_method("datainf", task).cache(train).attribute(prop)
    groups = make_method("datainf", task).cache(train, grouping).attribute(prop)
    summed = np.zeros_like(groups)
    np.add.at(summed.T, grouping.labels, per_point.T)
    assert np.allclose(groups, summed, rtol=1e-9, atol=1e-12)
