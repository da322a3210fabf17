"""The further-training gold standard: semantics of every removal mode against hand-written
training loops, pairing, eq. 17/13 arithmetic, vectorised = sequential, resume, groups, sign."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.execution import ResultStore
from ggda.gold import GoldConfig, GoldResult, compute_gold, select_units
from ggda.gold.optim import StackedOptimizer
from ggda.models.training import TrainConfig, make_optimizer
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask
from tests.gold.conftest import reference_run


def gold_of(model_data, units, path="sequential", out=None, **cfg):
    model, X, y, Xt, yt = model_data
    config = GoldConfig(**{"epochs": 2, "seeds": 2, "lr": 0.3, "batch_size": 16, "path": path, **cfg})
    return compute_gold(AttributionTask(model), X, y, ExampleLoss(Xt, yt), units, config, out=out)


def point_units(n, ids):
    return select_units(Grouping.singleton(n), ids=ids)


# -- semantics of each removal mode, against an explicit training loop ---------------------------


@pytest.mark.parametrize("path", ["sequential", "vectorised"])
@pytest.mark.parametrize(
    "removal,opt",
    [
        ("mask", {}),
        ("mask", {"optimizer": "sgd", "momentum": 0.9}),
        ("sampler", {}),
        ("weight", {"epsilon": 0.05}),
    ],
)
def test_modes_match_explicit_training(tiny, path, removal, opt):
    model, X, y, Xt, yt = tiny
    units = point_units(len(y), [3, 17, 40])
    res = gold_of(tiny, units, path=path, removal=removal, **opt)
    for s, seed in enumerate([0, 1]):
        kw = dict(seed=seed, epochs=2, batch_size=16, lr=0.3, momentum=opt.get("momentum", 0.0))
        full = reference_run(model, X, y, Xt, yt, **kw)
        np.testing.assert_allclose(res.full[s], full, rtol=0, atol=1e-12)
        for k, i in enumerate(units.ids):
            ref = reference_run(
                model, X, y, Xt, yt, drop=[int(i)], mode=removal, eps=opt.get("epsilon"), **kw
            )
            np.testing.assert_allclose(res.loo[s, :, :, k], ref, rtol=0, atol=1e-12)
    assert np.abs(res.gold_raw).max() > 1e-6  # removal had an effect


def test_paired_seeds_full_run_is_train_model(tiny):
    """Same seed -> same permutation: the full run is train_model(seed=s); two calls are identical."""
    from ggda.data.dataset import Dataset

    model, X, y, Xt, yt = tiny
    units = point_units(len(y), [1, 2])
    a = gold_of(tiny, units, path="vectorised")
    b = gold_of(tiny, units, path="vectorised")
    assert np.array_equal(a.full, b.full) and np.array_equal(a.loo, b.loo)
    import copy

    from ggda.models.training import train_model

    m = copy.deepcopy(model)
    train_model(m, Dataset(X=X, y=y), TrainConfig(epochs=2, batch_size=16, lr=0.3, momentum=0.0, seed=1))
    task = AttributionTask(m)
    np.testing.assert_allclose(a.full[1, -1], ExampleLoss(Xt, yt).values(task).numpy(), atol=1e-6)


def test_group_unit_removes_all_members(tiny):
    model, X, y, Xt, yt = tiny
    labels = np.arange(len(y)) % 9
    units = select_units(Grouping(labels), ids=[2, 5])
    assert units.kind == "groups"
    for removal in ("mask", "sampler"):
        res = gold_of(tiny, units, path="vectorised", removal=removal)
        for k, g in enumerate(units.ids):
            ref = reference_run(
                model,
                X,
                y,
                Xt,
                yt,
                seed=0,
                epochs=2,
                batch_size=16,
                lr=0.3,
                drop=np.flatnonzero(labels == g),
                mode=removal,
            )
            np.testing.assert_allclose(res.loo[0, :, :, k], ref, rtol=0, atol=1e-12)


# -- eq. 17 / eq. 13 arithmetic -------------------------------------------------------------------


def test_eq17_eq13_hand_made():
    # 2 seeds, 1 epoch, 1 target, 3 units
    loo = np.array([[[[1.0, 2.0, 6.0]]], [[[3.0, 2.0, 1.0]]]])
    full = np.array([[[2.0]], [[1.0]]])
    gold, raw, centred = GoldResult.assemble(loo, full, center=True)
    np.testing.assert_allclose(raw[0, 0], [0.5, 0.5, 2.0])  # mean_s(loo - full)
    np.testing.assert_allclose(centred[0, 0], [0.5 - 1.0, 0.5 - 1.0, 2.0 - 1.0])  # minus mean over I
    assert np.array_equal(gold, centred)
    assert np.array_equal(GoldResult.assemble(loo, full, center=False)[0], raw)


def test_centring_makes_full_run_irrelevant(tiny):
    units = point_units(len(tiny[1]), [0, 9, 33, 50])
    res = gold_of(tiny, units)
    other = GoldResult.assemble(
        res.loo, res.full + np.random.default_rng(0).normal(size=res.full.shape), True
    )
    assert np.array_equal(other[0], res.gold)  # exactly, not just up to rounding
    assert not np.allclose(other[1], res.gold_raw)
    np.testing.assert_allclose(
        res.gold_centred, res.gold_raw - res.gold_raw.mean(-1, keepdims=True), atol=1e-15
    )


# -- vectorised = sequential ----------------------------------------------------------------------


@pytest.mark.parametrize("removal", ["mask", "sampler", "weight"])
@pytest.mark.parametrize(
    "opt", [{"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.01}, {"optimizer": "adam"}]
)
def test_vectorised_equals_sequential(tiny_mlp, removal, opt):
    n = len(tiny_mlp[2])  # 65 = 4 batches of 16 + 1: deleting a member drops a batch (idle steps)
    units = select_units(Grouping(np.arange(n) % 13), ids=[0, 4, 12])
    cfg = {"removal": removal, "record_every": 3, "lr": 0.05 if opt["optimizer"] == "sgd" else 0.01, **opt}
    seq = gold_of(tiny_mlp, units, path="sequential", **cfg)
    vec = gold_of(tiny_mlp, units, path="vectorised", **cfg)
    assert seq.loo.shape == vec.loo.shape and len(seq.steps) > 2
    np.testing.assert_allclose(vec.loo, seq.loo, rtol=0, atol=1e-12)
    np.testing.assert_allclose(vec.gold, seq.gold, rtol=0, atol=1e-12)
    assert np.abs(seq.gold).max() > 1e-5


def test_vectorised_equals_sequential_float32(tiny_mlp):
    units = point_units(len(tiny_mlp[2]), [1, 2, 3, 30])
    seq = gold_of(tiny_mlp, units, path="sequential", dtype="float32", lr=0.1)
    vec = gold_of(tiny_mlp, units, path="vectorised", dtype="float32", lr=0.1)
    np.testing.assert_allclose(vec.loo, seq.loo, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_stacked_optimizer_matches_torch_optim(kind):
    """Functional updates = torch.optim, including idle rows that must not move."""
    torch.manual_seed(0)
    shapes = {"w": (3, 4), "b": (3,)}
    R = 3
    cfg = GoldConfig(optimizer=kind, lr=0.05, momentum=0.9 if kind == "sgd" else 0.0, weight_decay=0.1)
    init = {k: torch.randn(R, *s, dtype=torch.float64) for k, s in shapes.items()}
    stacked = {k: v.clone() for k, v in init.items()}
    opt = StackedOptimizer(cfg, stacked)
    refs = []
    for r in range(R):
        module = torch.nn.Module()
        for k in shapes:
            module.register_parameter(k, torch.nn.Parameter(init[k][r].clone()))
        refs.append((module, make_optimizer(module, cfg.train_config(0))))
    for t in range(6):
        grads = {k: torch.randn(R, *s, dtype=torch.float64) for k, s in shapes.items()}
        active = torch.tensor([True, t % 2 == 0, True])
        opt.step(stacked, grads, active if t else None)
        for r, (module, o) in enumerate(refs):
            if t and not active[r]:
                continue
            for k in shapes:
                getattr(module, k).grad = grads[k][r].clone()
            o.step()
    for r, (module, _) in enumerate(refs):
        for k in shapes:
            torch.testing.assert_close(stacked[k][r], getattr(module, k).detach(), rtol=0, atol=1e-14)


# -- resume ---------------------------------------------------------------------------------------


def test_resume_gives_identical_numbers(tiny, tmp_path):
    units = point_units(len(tiny[1]), [0, 5, 6, 20, 44])
    first = gold_of(tiny, units, path="vectorised", out=tmp_path, chunk=2, seeds=3)
    store = ResultStore(tmp_path / "store")
    keys = store.keys()
    assert len(keys) == 3 * (1 + 3)  # per seed: the full run + 3 chunks of units
    for key in keys[::3]:  # "kill" part of the work
        (store.root / f"{key}.npz").unlink()
    again = gold_of(tiny, units, path="vectorised", out=tmp_path, chunk=2, seeds=3)
    assert again.meta["jobs_run_now"] == len(keys[::3])
    for name in ("gold", "gold_raw", "loo", "full"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    loaded = GoldResult.load(tmp_path)
    assert np.array_equal(loaded.gold, first.gold) and loaded.meta["fingerprint"] == first.meta["fingerprint"]
    # other settings -> other keys: nothing reused, the old results are reported as stale
    other = gold_of(tiny, units, path="vectorised", out=tmp_path, chunk=2, seeds=3, lr=0.2)
    assert other.meta["jobs_run_now"] == len(keys) and other.meta["stale_results_in_store"] == len(keys)


@pytest.mark.slow
def test_process_pool_matches_serial(tiny, tmp_path):
    from ggda.execution import LocalExecutor

    model, X, y, Xt, yt = tiny
    units = point_units(len(y), [4, 8, 15])
    cfg = GoldConfig(epochs=2, seeds=2, lr=0.3, batch_size=16, chunk=2)
    task, prop = AttributionTask(model), ExampleLoss(Xt, yt)
    serial = compute_gold(task, X, y, prop, units, cfg)
    pooled = compute_gold(
        task, X, y, prop, units, cfg, out=tmp_path, executor=LocalExecutor(workers=2, threads_per_worker=1)
    )
    assert np.array_equal(serial.loo, pooled.loo) and np.array_equal(serial.full, pooled.full)


# -- sign, recording, errors ------------------------------------------------------------------------


def test_removing_a_duplicate_of_the_target_raises_its_loss(tiny):
    """Positive gold = helpful: a training copy of the test point helps it, so removing it hurts."""
    model, X, y, Xt, yt = tiny
    Xd = np.vstack([X, Xt[:1]])
    yd = np.concatenate([y, yt[:1]])  # a training copy of the target with its label
    units = point_units(len(yd), [len(yd) - 1, 0, 10, 20, 30])
    res = gold_of((model, Xd, yd, Xt[:1], yt[:1]), units, epochs=3, center=False)
    assert np.all(res.gold_raw[:, 0, 0] > 0)
    assert res.gold_raw[-1, 0, 0] == res.gold_raw[-1, 0].max()


def test_record_every_k_steps(tiny):
    units = point_units(len(tiny[1]), [2, 3])
    res = gold_of(tiny, units, record_every=2, path="vectorised")
    # 70 points, batch 16 -> 5 steps per epoch; records at 2, 4, 5, 6, 8, 10
    assert res.steps.tolist() == [2, 4, 5, 6, 8, 10]
    np.testing.assert_allclose(res.epochs, np.array([2, 4, 5, 6, 8, 10]) / 5)
    plain = gold_of(tiny, units, path="vectorised")
    np.testing.assert_allclose(res.loo[:, [2, 5]], plain.loo, atol=1e-14)


def test_bad_inputs(tiny):
    n = len(tiny[1])
    with pytest.raises(GGDAError, match="epochs"):
        GoldConfig(epochs=0)
    with pytest.raises(GGDAError, match="seeds"):
        GoldConfig(seeds=0)
    with pytest.raises(GGDAError, match="lr"):
        GoldConfig(lr=0)
    with pytest.raises(GGDAError, match="removal"):
        GoldConfig(removal="drop")
    with pytest.raises(GGDAError, match="training point 70"):
        point_units(n, [1, n])
    with pytest.raises(GGDAError, match="group id 9"):
        select_units(Grouping(np.arange(n) % 9), ids=[9])
    with pytest.raises(GGDAError, match="only 9"):
        select_units(Grouping(np.arange(n) % 9), n_units=10)


@pytest.mark.parametrize("path", ["sequential", "vectorised"])
def test_divergence_names_the_run_and_keeps_finished_jobs(tiny, tmp_path, path):
    """Ascending one point's loss enormously (weight mode, huge ε) blows up only that run."""
    units = point_units(len(tiny[1]), [5])
    with pytest.raises(GGDAError, match=r"diverged .* in run point 5, seed 0, epoch 1"):
        gold_of(tiny, units, path=path, removal="weight", epsilon=1e300, lr=1e10, out=tmp_path, seeds=1)
    store = ResultStore(tmp_path / "store")
    assert len(store) == 1 and store.keys()[0].endswith("units=full")  # the full run was kept
