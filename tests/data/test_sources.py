"""The data boundary: every method and grouping gives the same answer whatever form the data take.

Arrays (the in-memory adapter), a map-style torch ``Dataset`` of (x, y) items, a ``Dataset`` of
dict items fed to a model with keyword inputs, unshuffled ``DataLoader``s of several batch sizes
and a Hugging Face ``datasets.Dataset`` must give the same scores (float32 rounding) and groupings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ggda.data import Dataset
from ggda.data.batches import ExampleInputs, InputView
from ggda.data.sources import as_dataset, from_huggingface, from_loader, from_torch
from ggda.errors import GGDAError
from ggda.groups import random_grouping
from ggda.groups.make import make_grouping
from ggda.methods import make_method
from ggda.models import TrainConfig, build_model, train_model
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask

N, D, C = 48, 6, 3


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N + 8, D)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1).astype(np.int64)
    train = Dataset(X[:N], y[:N])
    test = Dataset(X[N:], y[N:], n_classes=train.n_classes)
    model = build_model("mlp-s", D, C, seed=0)
    result = train_model(model, train, TrainConfig(epochs=3, lr=0.1, batch_size=16), checkpoint_dir=None)
    return train, test, result.model


class DictItems(torch.utils.data.Dataset):
    """Items as dicts, the layout of tokenised text: {"features": x, "label": y}."""

    def __init__(self, X, y):
        self.X, self.y = torch.as_tensor(X), torch.as_tensor(y)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.X[i], "label": self.y[i]}


class KeywordModel(nn.Module):
    """The same MLP called as model(features=...)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, features):
        return self.inner(features)


def _sources(train: Dataset):
    X, y = torch.as_tensor(train.X), torch.as_tensor(train.y)
    tensors = TensorDataset(X, y)
    out = {
        "arrays": (train, False),
        "torch-dataset": (from_torch(tensors), False),
        "loader-bs1": (from_loader(DataLoader(tensors, batch_size=1)), False),
        "loader-bs7": (as_dataset(DataLoader(tensors, batch_size=7)), False),
        "dict-items": (from_torch(DictItems(train.X, train.y)), True),
    }
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_dict({"features": train.X.tolist(), "label": train.y.tolist()})
    out["huggingface"] = (from_huggingface(hf, label="label"), True)
    return out


def _task(model, keyword: bool) -> AttributionTask:
    return AttributionTask(KeywordModel(model) if keyword else model)


METHODS = {
    "grad-dot": {},
    "grad-cos": {},
    "if-explicit": {"damping": 1e-2},
    "if-cg": {"damping": 1e-2},
    "if-lissa": {"damping": 1e-1, "depth": 20},
    "if-arnoldi": {"damping": 1e-2},
    "ekfac": {"damping": 1e-2},
    "datainf": {"damping": 1e-2},
    "trak": {"proj_dim": 64},
    "repsim": {},
    "if-group-fisher": {"damping": 1e-2},
}


@pytest.fixture(scope="module")
def reference(arrays):
    train, test, model = arrays
    prop = ExampleLoss(test.X, test.y)
    grouping = random_grouping(N, 12, seed=1)
    out = {}
    for name, opts in METHODS.items():
        for g in (None, grouping):
            out[name, g is None] = (
                make_method(name, AttributionTask(model), **opts).cache(train, g).attribute(prop)
            )
    return out, grouping


@pytest.mark.parametrize("source", ["torch-dataset", "loader-bs1", "loader-bs7", "dict-items", "huggingface"])
def test_every_method_same_scores_for_every_source(arrays, reference, source):
    train, test, model = arrays
    ref, grouping = reference
    data, keyword = _sources(train)[source]
    assert isinstance(data.X, ExampleInputs)
    test_data = from_torch(DictItems(test.X, test.y)) if keyword else test
    prop = ExampleLoss(test_data)  # a data source as the target set
    for name, opts in METHODS.items():
        if name == "if-group-fisher" and keyword:
            opts = {**opts}
        for g in (None, grouping):
            task = _task(model, keyword)
            scores = make_method(name, task, **opts).cache(data, g).attribute(prop)
            expect = ref[name, g is None]
            tol = 1e-3 * max(1e-8, float(np.abs(expect).max()))
            assert np.allclose(scores, expect, rtol=1e-3, atol=tol), (source, name, g is None)


@pytest.mark.parametrize("method", ["random", "kmeans", "repr-kmeans", "grad-kmeans"])
def test_groupings_same_for_every_source(arrays, method):
    train, _, model = arrays
    want = make_grouping(method, train, n_groups=6, task=AttributionTask(model), seed=0)
    for name, (data, keyword) in _sources(train).items():
        if keyword and method == "kmeans":
            with pytest.raises(GGDAError, match="repr-kmeans"):
                make_grouping(method, data, n_groups=6, task=_task(model, keyword), seed=0)
            continue
        got = make_grouping(method, data, n_groups=6, task=_task(model, keyword), seed=0)
        assert np.array_equal(got.labels, want.labels), (name, method)


def test_custom_loss_object_keeps_fast_paths(arrays, monkeypatch):
    """nn.CrossEntropyLoss(reduction='none') is recognised: same scores, and the layer-factor and
    closed-form paths run (the generic vmap path is made to fail to prove it)."""
    from ggda.gradients.backend import GenericBackend

    train, test, model = arrays
    prop = ExampleLoss(test.X, test.y)
    own = make_method("if-cg", AttributionTask(model), damping=1e-2).cache(train).attribute(prop)
    user = AttributionTask(model, loss=nn.CrossEntropyLoss(reduction="none"))
    assert user.loss_kind == "cross-entropy"

    def generic(*a, **k):
        raise AssertionError("generic per-example path used")

    monkeypatch.setattr(GenericBackend, "per_example", generic)
    monkeypatch.setattr(GenericBackend, "group_sums", generic)
    got = make_method("if-cg", user, damping=1e-2).cache(train).attribute(prop)
    assert np.allclose(got, own, rtol=1e-5, atol=1e-7)
    trak = make_method("trak", user, proj_dim=32)
    assert trak.output == "margin"  # TRAK's output choice follows the declared loss kind


def test_declared_loss_kind_is_checked(arrays):
    train, test, model = arrays

    def not_ce(out, y):
        return (out**2).sum(1)

    task = AttributionTask(model, loss=not_ce, loss_kind="cross-entropy")
    with pytest.raises(GGDAError, match="loss_kind='custom'"):
        make_method("grad-dot", task).cache(train).attribute(ExampleLoss(test.X, test.y))


def test_scalar_loss_is_refused(arrays):
    train, test, model = arrays
    task = AttributionTask(model, loss=nn.CrossEntropyLoss(), loss_kind="cross-entropy")
    with pytest.raises(GGDAError, match="one loss per example"):
        make_method("grad-dot", task).cache(train).attribute(ExampleLoss(test.X, test.y))


def test_shuffling_loader_is_refused(arrays):
    train, _, _ = arrays
    ds = TensorDataset(torch.as_tensor(train.X), torch.as_tensor(train.y))
    with pytest.raises(GGDAError, match="shuffle=False"):
        from_loader(DataLoader(ds, batch_size=4, shuffle=True))


def test_labels_of_wrong_length_are_refused(arrays):
    train, _, _ = arrays
    ds = TensorDataset(torch.as_tensor(train.X), torch.as_tensor(train.y))
    with pytest.raises(GGDAError, match="one label per example"):
        from_torch(ds, labels=np.zeros(3))


def test_loader_workers_and_collate_are_used(arrays):
    """A DataLoader with worker processes and its own collate function (here: inputs doubled):
    the scores equal those of the doubled arrays, so every batch went through the collate."""
    train, test, model = arrays

    ds = TensorDataset(torch.as_tensor(train.X), torch.as_tensor(train.y))
    data = from_loader(DataLoader(ds, batch_size=5, num_workers=2, collate_fn=doubling_collate))
    assert data.X.num_workers == 2 and data.X.collate_fn is doubling_collate
    prop = ExampleLoss(test.X, test.y)
    task = AttributionTask(model)
    want = make_method("grad-dot", task).cache(Dataset(2 * train.X, train.y)).attribute(prop)
    got = make_method("grad-dot", task, max_batch=16).cache(data).attribute(prop)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.array_equal(data.y, train.y)


def doubling_collate(items):
    x, y = torch.utils.data.default_collate(items)
    return 2 * x, y


class CountingDataset(torch.utils.data.Dataset):
    """Records the largest batch of items read between two collations, to prove no whole-set
    tensor is built."""

    def __init__(self, X, y):
        self.X, self.y = torch.as_tensor(X), torch.as_tensor(y)
        self.reads = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        return self.X[i], self.y[i]


def test_no_whole_set_tensor_is_built(arrays, monkeypatch):
    """Every input batch a method sees is at most the chunk size (never n rows)."""
    train, test, model = arrays
    data = from_torch(CountingDataset(train.X, train.y))
    largest = []
    original = InputView.__getitem__

    def spy(self, index):
        batch = original(self, index)
        largest.append(len(batch) if isinstance(batch, torch.Tensor) else 0)
        return batch

    monkeypatch.setattr(InputView, "__getitem__", spy)
    task = AttributionTask(model)
    options = {"grad-dot": {}, "if-cg": {"damping": 1e-2, "chunk_size": 16}, "trak": {"proj_dim": 16}}
    options["ekfac"] = {"damping": 1e-2, "chunk_size": 16}
    for name, opts in options.items():
        method = make_method(name, task, max_batch=16, **opts)
        method.cache(data, random_grouping(N, 5)).attribute(ExampleLoss(test.X, test.y))
    assert largest and max(largest) <= 16
