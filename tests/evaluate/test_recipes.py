"""The user's training function for everything that retrains.

A plain PyTorch loop written by a user, replicating ggda's training recipe step for step, must
give exactly the zoo path's retraining outcomes, LDS and gold standard; on lazy data sources it
runs through worker processes; a loop that ignores its data, a non-picklable factory with a
process backend and a loop that never reports its epochs are refused with one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ggda.data.sources import from_torch
from ggda.errors import GGDAError
from ggda.evaluate import Retrainer, RetrainSpec, lds
from ggda.execution import SerialExecutor, make_executor
from ggda.gold import GoldConfig, compute_gold, select_units
from ggda.groups import Grouping, random_grouping
from ggda.models import ModelSpec, TrainConfig, build_model
from ggda.models.recipe import UserRecipe, ZooRecipe
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask

CONFIG = TrainConfig(epochs=3, lr=0.05, batch_size=32)
N_FEATURES, N_OUT = 64, 10


def user_model(seed: int) -> torch.nn.Module:
    """The user's model factory (here the same MLP the zoo builds, to compare against it)."""
    return build_model(ModelSpec("mlp-s", N_FEATURES, N_OUT, hidden=32), seed=seed)


def user_train(model, data, seed, epochs=None, on_epoch=None):
    """A plain PyTorch loop: seeded shuffling, SGD with momentum, mean cross-entropy."""
    X, y = data.tensors
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=CONFIG.lr, momentum=CONFIG.momentum)
    for epoch in range(1, (epochs or CONFIG.epochs) + 1):
        model.train()
        for batch in torch.randperm(len(y), generator=gen).split(CONFIG.batch_size):
            loss = F.cross_entropy(model(X[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch, model)
    model.eval()


def lazy_train(model, data, seed, epochs=None, on_epoch=None):
    """The same loop over a torch Dataset through a DataLoader (what users write for images)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=CONFIG.lr, momentum=CONFIG.momentum)
    loader = torch.utils.data.DataLoader(data, batch_size=CONFIG.batch_size, shuffle=True, generator=gen)
    for epoch in range(1, (epochs or CONFIG.epochs) + 1):
        model.train()
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch, model)


def ignores_data(model, data, seed, epochs=None, on_epoch=None):
    """A broken training function: trains on a fixed slice of a global set, not on ``data``."""
    X, y = _GLOBAL
    user_train(model, TensorDataset(X, y), seed, epochs, on_epoch)


_GLOBAL: tuple = ()


def never_reports(model, data, seed, epochs=None, on_epoch=None):
    user_train(model, data, seed, epochs, None)


@pytest.fixture(scope="module")
def data(small_digits):
    train, test = small_digits
    return train.subset(np.arange(120)), test.subset(np.arange(25))


def _zoo():
    return ZooRecipe(ModelSpec("mlp-s", N_FEATURES, N_OUT, hidden=32), CONFIG)


def test_user_loop_equals_zoo_for_retraining_and_lds(data, tmp_path):
    train, test = data
    zoo = Retrainer(RetrainSpec(recipe=_zoo()), tmp_path / "zoo", SerialExecutor(), train, test)
    user = Retrainer(
        RetrainSpec(recipe=UserRecipe(user_model, user_train)),
        tmp_path / "user",
        SerialExecutor(),
        train,
        test,
    )
    removals = [np.array([], dtype=np.int64), np.arange(0, 30), np.arange(50, 60)]
    a, b = zoo.run(removals, [0, 1]), user.run(removals, [0, 1])
    assert np.array_equal(a.losses, b.losses) and np.array_equal(a.correct, b.correct)
    grouping = random_grouping(len(train), 12, seed=0)
    scores = np.random.default_rng(0).normal(size=(len(test), 12))
    assert lds(zoo, scores, grouping, n_subsets=6).score == lds(user, scores, grouping, n_subsets=6).score


def test_user_loop_on_lazy_data_through_worker_processes(data, tmp_path):
    """A torch Dataset and a DataLoader-based loop, retrained in a spawned process pool (the
    payload is written once and read by the workers) and serially: identical outcomes."""
    train, test = data
    ds = TensorDataset(torch.as_tensor(train.X), torch.as_tensor(train.y))
    lazy_train_set = from_torch(ds)
    lazy_test = from_torch(TensorDataset(torch.as_tensor(test.X), torch.as_tensor(test.y)))
    spec = RetrainSpec(recipe=UserRecipe(user_model, lazy_train))
    removals = [np.array([], dtype=np.int64), np.arange(10)]
    serial = Retrainer(spec, tmp_path / "a", SerialExecutor(), lazy_train_set, lazy_test).run(removals, [0])
    pooled = Retrainer(spec, tmp_path / "b", make_executor("local", workers=2), lazy_train_set, lazy_test)
    out = pooled.run(removals, [0])
    assert pooled.executed == 2
    assert np.allclose(out.losses, serial.losses, rtol=1e-6, atol=1e-7)


def test_gold_with_user_loop_equals_zoo_recipe(data, small_digits, trained_mlp):
    train, test = data
    model = user_model(0)
    user_train(model, TensorDataset(torch.as_tensor(train.X), torch.as_tensor(train.y)), 0)
    task = AttributionTask(model)
    prop = ExampleLoss(test.X[:8], test.y[:8])
    units = select_units(Grouping.singleton(len(train)), n_units=4, seed=0)
    config = GoldConfig(epochs=2, seeds=2, removal="sampler", lr=CONFIG.lr)
    zoo = compute_gold(task, train, None, prop, units, config, recipe=_zoo())
    user = compute_gold(task, train, None, prop, units, config, recipe=UserRecipe(user_model, user_train))
    assert zoo.gold.shape == (2, 8, 4)
    assert np.array_equal(zoo.loo, user.loo) and np.array_equal(zoo.gold, user.gold)
    assert np.abs(zoo.gold).max() > 0  # leaving a point out changed something


def test_training_function_that_ignores_its_data_is_refused(data, tmp_path):
    global _GLOBAL
    train, test = data
    _GLOBAL = (torch.as_tensor(train.X), torch.as_tensor(train.y))
    r = Retrainer(
        RetrainSpec(recipe=UserRecipe(user_model, ignores_data)), tmp_path, SerialExecutor(), train, test
    )
    with pytest.raises(GGDAError, match="ignores its data"):
        r.run([np.array([], dtype=np.int64), np.arange(20)], [0])


def test_lambda_factory_with_process_backend_is_refused(data, tmp_path):
    train, test = data
    spec = RetrainSpec(recipe=UserRecipe(lambda seed: user_model(seed), user_train))
    with pytest.raises(GGDAError, match="module level"):
        Retrainer(spec, tmp_path, make_executor("local", workers=2), train, test)
    Retrainer(spec, tmp_path / "serial", SerialExecutor(), train, test)  # fine in process


def test_gold_loop_that_never_reports_epochs_is_refused(data):
    train, test = data
    task = AttributionTask(user_model(0))
    units = select_units(Grouping.singleton(len(train)), n_units=2, seed=0)
    config = GoldConfig(epochs=2, removal="sampler")
    with pytest.raises(GGDAError, match="on_epoch"):
        compute_gold(
            task,
            train,
            None,
            ExampleLoss(test.X[:2], test.y[:2]),
            units,
            config,
            recipe=UserRecipe(user_model, never_reports),
        )
    with pytest.raises(GGDAError, match="removal='sampler'"):
        compute_gold(
            task, train, None, ExampleLoss(test.X[:2], test.y[:2]), units, GoldConfig(), recipe=_zoo()
        )
