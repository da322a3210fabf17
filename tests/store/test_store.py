"""Feature store: chunked writes, resume, and block-wise scores equal to in-memory attribution."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ggda.errors import GGDAError
from ggda.execution import SerialExecutor
from ggda.gradients.group import group_gradients
from ggda.gradients.projection import make_projector
from ggda.groups import random_grouping
from ggda.methods import GradDot
from ggda.models import TrainConfig, build_model, train_model
from ggda.properties import ExampleLoss, MeanLoss
from ggda.store import FeatureStore, build_gradient_store, score_store, self_scores, target_features
from ggda.task import AttributionTask


@pytest.fixture(scope="module")
def mlp_task(trained_mlp):
    return AttributionTask(trained_mlp)


@pytest.fixture(scope="module")
def logreg_task(small_digits):
    train, _ = small_digits
    model = build_model("logreg", train.n_features, train.n_outputs, seed=0)
    train_model(model, train, TrainConfig(epochs=3, lr=0.05, batch_size=32))
    return AttributionTask(model)


def _chunk_bytes(store: FeatureStore) -> list[bytes]:
    return [store.chunk_path(c).read_bytes() for c in range(store.n_chunks)]


@pytest.mark.parametrize("groups", [None, 37])
def test_store_scores_equal_in_memory_graddot(mlp_task, small_digits, tmp_path, groups):
    train, test = small_digits
    grouping = None if groups is None else random_grouping(len(train), groups, seed=0)
    store = build_gradient_store(tmp_path / "s", mlp_task, train.X, train.y, grouping, chunk_rows=16)
    assert store.complete and store.n_chunks == -(-store.n_rows // 16)
    G = group_gradients(mlp_task, train.X, train.y, grouping)
    np.testing.assert_array_equal(
        FeatureStore.open(tmp_path / "s").to_array(), G.numpy()
    )  # re-read = written
    prop = ExampleLoss(test.X, test.y)
    Q = target_features(store, mlp_task, prop)
    res = score_store(store, Q, top_k=5, full="memory", target_block=7)
    exact = (Q.double() @ G.double().T).numpy()  # the in-memory product, without float32 rounding
    # float32 accumulation error is bounded by a few ulps of Σ_j |q_j g_j| (a cancelling sum can be
    # far smaller than its terms); a wrong block, row or scale is off by orders of magnitude more
    magnitude = (Q.double().abs() @ G.double().abs().T).numpy()
    assert np.all(np.abs(res.scores - exact) <= 1e-6 * magnitude + 1e-12)
    ref = GradDot(mlp_task).cache(train, grouping).attribute(prop)
    np.testing.assert_allclose(res.scores, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(res.top_indices, np.argsort(-res.scores, axis=1, kind="stable")[:, :5])
    if groups is not None:  # mean aggregate = score / group size, as GradDot(aggregate="mean")
        mean = score_store(store, Q, top_k=3, full="memory", aggregate="mean")
        ref_mean = GradDot(mlp_task, aggregate="mean").cache(train, grouping).attribute(prop)
        np.testing.assert_allclose(mean.scores, ref_mean, rtol=1e-5, atol=1e-5 * np.abs(ref_mean).max())


def test_streamed_topk_and_memmap_match_full(logreg_task, small_digits, tmp_path):
    train, test = small_digits
    store = build_gradient_store(tmp_path / "s", logreg_task, train.X, train.y, chunk_rows=23)
    Q = target_features(store, logreg_task, ExampleLoss(test.X, test.y))
    res = score_store(store, Q, top_k=7, bottom_k=4, full=tmp_path / "scores.npy", target_block=9)
    full = np.load(tmp_path / "scores.npy")
    assert full.shape == (len(test), len(train))
    for t in range(len(test)):
        order = np.argsort(-full[t], kind="stable")
        np.testing.assert_array_equal(res.top_scores[t], full[t, order[:7]])
        np.testing.assert_array_equal(res.bottom_scores[t], full[t, order[::-1][:4]])
        assert set(res.top_indices[t]) == set(order[:7])
    streamed = score_store(store, Q, top_k=7, bottom_k=4)  # no full matrix held
    assert streamed.scores is None
    np.testing.assert_array_equal(streamed.top_indices, res.top_indices)
    tiny = score_store(store, Q, top_k=7, bottom_k=4, full="memory", score_mb=1e-3)  # 5-column score blocks
    np.testing.assert_allclose(tiny.scores, full, rtol=0, atol=1e-6 * np.abs(full).max())
    np.testing.assert_allclose(tiny.top_scores, res.top_scores, rtol=0, atol=1e-6 * np.abs(full).max())
    np.testing.assert_allclose(tiny.bottom_scores, res.bottom_scores, rtol=0, atol=1e-6 * np.abs(full).max())
    cos = score_store(store, Q, top_k=3, normalize=True, full="memory").scores
    G = store.to_array()
    expect = (Q / Q.norm(dim=1, keepdim=True)).numpy() @ (G / np.linalg.norm(G, axis=1, keepdims=True)).T
    np.testing.assert_allclose(cos, expect, rtol=1e-5, atol=1e-6)
    assert np.abs(cos).max() <= 1 + 1e-5


def test_interrupted_build_resumes_to_identical_files(logreg_task, small_digits, tmp_path):
    train, _ = small_digits
    grouping = random_grouping(len(train), 50, seed=1)
    whole = build_gradient_store(tmp_path / "a", logreg_task, train.X, train.y, grouping, chunk_rows=8)

    class Crash(Exception):
        pass

    def crash_after_third(c: int) -> None:
        if c == 2:
            raise Crash

    with pytest.raises(Crash):
        build_gradient_store(
            tmp_path / "b", logreg_task, train.X, train.y, grouping, chunk_rows=8, on_chunk=crash_after_third
        )
    partial = FeatureStore.open(tmp_path / "b")
    assert not partial.complete and partial.missing_chunks() == list(range(3, partial.n_chunks))
    (partial.path / "chunks" / ".c000003.999.npy.part").write_bytes(b"half a chunk")  # crash mid-write
    with pytest.raises(GGDAError, match="incomplete"):
        score_store(partial, np.zeros((1, partial.dim), np.float32))
    written = []
    resumed = build_gradient_store(
        tmp_path / "b", logreg_task, train.X, train.y, grouping, chunk_rows=8, on_chunk=written.append
    )
    assert written == list(range(3, whole.n_chunks))  # finished chunks were not recomputed
    assert resumed.complete and _chunk_bytes(resumed) == _chunk_bytes(whole)
    assert (
        json.loads((tmp_path / "b" / "manifest.json").read_text())["fingerprint"]
        == whole.manifest["fingerprint"]
    )
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "sizes.npy"), grouping.sizes)


def test_other_model_is_refused_and_overwrite(logreg_task, small_digits, tmp_path):
    train, test = small_digits
    build_gradient_store(tmp_path / "s", logreg_task, train.X, train.y, chunk_rows=100)
    other = AttributionTask(build_model("logreg", train.n_features, train.n_outputs, seed=5))
    with pytest.raises(GGDAError, match="another configuration"):
        build_gradient_store(tmp_path / "s", other, train.X, train.y, chunk_rows=100)
    with pytest.raises(GGDAError, match="another model"):
        target_features(FeatureStore.open(tmp_path / "s"), other, ExampleLoss(test.X, test.y))
    store = build_gradient_store(tmp_path / "s", other, train.X, train.y, chunk_rows=100, overwrite=True)
    np.testing.assert_array_equal(store.to_array(), group_gradients(other, train.X, train.y).numpy())
    with pytest.raises(GGDAError, match="not a feature store"):
        FeatureStore.open(tmp_path / "nothing")


def test_projected_store_equals_projecting_in_memory(mlp_task, small_digits, tmp_path):
    train, test = small_digits
    grouping = random_grouping(len(train), 60, seed=2)
    store = build_gradient_store(
        tmp_path / "s",
        mlp_task,
        train.X,
        train.y,
        grouping,
        projection="gaussian",
        proj_dim=64,
        chunk_rows=13,
    )
    assert store.dim == 64
    P = make_projector("gaussian", mlp_task.n_params, 64, 0)
    Phi = P.project(group_gradients(mlp_task, train.X, train.y, grouping)).numpy()
    np.testing.assert_allclose(store.to_array(), Phi, rtol=1e-5, atol=1e-5 * np.abs(Phi).max())
    prop = ExampleLoss(test.X, test.y)
    Q = target_features(store, mlp_task, prop)
    np.testing.assert_allclose(Q.numpy(), P.project(prop.gradients(mlp_task)).numpy(), rtol=1e-5, atol=1e-6)
    res = score_store(store, Q, top_k=5, full="memory")
    expect = Q.double().numpy() @ Phi.astype(np.float64).T  # Grad-Dot in the sketched space
    np.testing.assert_allclose(res.scores, expect, rtol=0, atol=1e-5 * np.abs(expect).max())


def test_fisher_kernel_closed_form(logreg_task, small_digits, tmp_path):
    train, test = small_digits
    grouping = random_grouping(len(train), 30, seed=3)
    store = build_gradient_store(tmp_path / "s", logreg_task, train.X, train.y, grouping, chunk_rows=7)
    G = store.to_array().astype(np.float64)
    N, d = len(train), store.dim
    F = G.T @ G / N
    lam = 0.1 * np.trace(F) / d
    M = np.linalg.inv(F + lam * np.eye(d)) / N
    prop = MeanLoss(test.X, test.y)  # a non-per-example property goes through prop.gradients
    Q = target_features(store, logreg_task, prop)
    res = score_store(store, Q, kernel="fisher", full="memory", top_k=3)
    expect = Q.numpy().astype(np.float64) @ M @ G.T
    np.testing.assert_allclose(res.scores, expect, rtol=0, atol=1e-5 * np.abs(expect).max())
    assert res.info["damping"] == pytest.approx(lam)
    np.testing.assert_allclose(self_scores(store, "fisher"), np.einsum("ij,jk,ik->i", G, M, G), rtol=1e-8)
    np.testing.assert_allclose(self_scores(store), (G * G).sum(1), rtol=1e-10)


def test_executor_build_identical_and_target_store(logreg_task, small_digits, tmp_path):
    train, test = small_digits
    inproc = build_gradient_store(tmp_path / "a", logreg_task, train.X, train.y, chunk_rows=64)
    jobs = build_gradient_store(
        tmp_path / "b", logreg_task, train.X, train.y, chunk_rows=64, executor=SerialExecutor()
    )
    assert _chunk_bytes(jobs) == _chunk_bytes(inproc)
    # Targets can be a store too (scored target-chunk by training-chunk).
    targets = build_gradient_store(tmp_path / "t", logreg_task, test.X, test.y, chunk_rows=9)
    by_store = score_store(inproc, targets, top_k=4, full="memory", target_block=4)
    by_array = score_store(inproc, torch.from_numpy(targets.to_array()), top_k=4, full="memory")
    scale = np.abs(by_array.scores).max()
    np.testing.assert_allclose(by_store.scores, by_array.scores, rtol=0, atol=1e-6 * scale)  # blocking only
    np.testing.assert_allclose(by_store.top_scores, by_array.top_scores, rtol=0, atol=1e-6 * scale)
