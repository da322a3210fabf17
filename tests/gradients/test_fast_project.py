"""Kronecker-projected group gradients from factors == the projection of the exact group gradients."""

import numpy as np
import pytest
import torch

from ggda.gradients import group_gradients
from ggda.gradients.fast_project import dense_equivalent, iter_projected_group_gradients
from ggda.groups import Grouping
from ggda.models import build_model
from ggda.task import AttributionTask


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_projected_equals_projection_of_group_gradients(small_digits, trained_mlp, arch):
    train, _ = small_digits
    X, y = train.X[:120], train.y[:120]
    model = trained_mlp if arch == "mlp" else build_model("cnn", 64, 10, input_shape=(1, 8, 8), seed=0)
    task = AttributionTask(model)
    labels = np.concatenate([np.zeros(50, int), 1 + np.arange(70) // 3])  # one large group + triples
    grouping = Grouping(np.random.default_rng(0).permutation(labels))
    it = iter_projected_group_gradients(task, X, y, grouping, proj_dim=300, seed=1, max_batch=32)
    assert it is not None
    Phi, proj = None, None
    for gids, block, proj in it:
        if Phi is None:
            Phi = torch.zeros(grouping.n_groups, proj.dim)
        Phi[torch.as_tensor(gids)] = block
    assert 0.5 * 300 <= proj.dim <= 2 * 300
    ref = dense_equivalent(proj, group_gradients(task, X, y, grouping))
    assert torch.allclose(Phi, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_inner_products_preserved_in_expectation(small_digits, trained_mlp):
    train, _ = small_digits
    task = AttributionTask(trained_mlp)
    grouping = Grouping.singleton(40)
    G = group_gradients(task, train.X[:40], train.y[:40], grouping)
    exact = (G @ G.T).diagonal()
    est = torch.zeros_like(exact)
    for seed in range(20):
        feats = torch.cat(
            [
                b
                for _, b, _ in iter_projected_group_gradients(
                    task, train.X[:40], train.y[:40], grouping, 256, seed=seed
                )
            ]
        )
        est += (feats * feats).sum(1) / 20
    # 20 draws of a 256-dim sketch: squared norms within ~15% on average
    assert abs(float((est / exact).mean()) - 1.0) < 0.15
