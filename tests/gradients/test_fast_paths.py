"""Fast layer-factor paths == the generic torch.func paths (to 1e-5), and the fallbacks."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ggda.gradients import group_gradients, iter_group_gradients, per_example_gradients
from ggda.gradients.fast_factors import fast_plan, plan_layers
from ggda.groups import Grouping, random_grouping
from ggda.methods import GradCos, GradDot, make_method
from ggda.properties import ExampleLoss, Margin, MeanLoss
from ggda.task import AttributionTask


def mixed_grouping(n: int, seed: int = 0) -> Grouping:
    """Two large groups (> max_batch), several mid-sized, many pairs and singletons."""
    big = [0] * (n // 3) + [1] * (n // 4)
    rest = n - len(big)
    mid = [2 + i // 7 for i in range(rest // 2)]
    k = 2 + (rest // 2 + 6) // 7
    small = [k + i // 2 if i < rest // 2 else 0 for i in range(rest - len(mid))]
    labels = np.array(big + mid + small)
    labels = np.unique(labels, return_inverse=True)[1]
    return Grouping(np.random.default_rng(seed).permutation(labels))


def reference(task, X, y, grouping, fn=None):
    return group_gradients(task.generic(), X, y, grouping, fn=fn, max_batch=64)


def close(a, b, tol=1e-5):
    scale = float(b.abs().max())
    return torch.allclose(a, b, rtol=tol, atol=tol * scale)


class Net(nn.Module):
    """Conv (strided, padded, reused) + inplace ReLU + Linear on a 3-D tensor + Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, stride=2)
        self.conv2 = nn.Conv2d(4, 4, 2, dilation=1)
        self.act = nn.ReLU(inplace=True)
        self.tok = nn.Linear(4, 5)
        self.head = nn.Linear(5 * 9, 10)

    def forward(self, x):
        x = self.act(self.conv(x.view(-1, 1, 8, 8)))  # (B, 4, 4, 4)
        x = self.act(self.conv2(x))  # (B, 4, 3, 3)
        x = self.tok(x.flatten(2).transpose(1, 2))  # (B, 9, 5): Linear with L = 9 positions
        return self.head(torch.tanh(x).flatten(1))


@pytest.fixture(scope="module")
def data(small_digits):
    train, test = small_digits
    return train.X[:160], train.y[:160], test


@pytest.mark.parametrize("arch", ["mlp", "cnn", "net"])
def test_group_gradients_equal_reference(data, trained_mlp, arch):
    from ggda.models import build_model

    X, y, _ = data
    model = {
        "mlp": trained_mlp,
        "cnn": build_model("cnn", 64, 10, input_shape=(1, 8, 8), seed=0),
        "net": Net(),
    }[arch]
    task = AttributionTask(model)
    assert plan_layers(task) is not None
    grouping = mixed_grouping(len(X))
    fast = group_gradients(task, X, y, grouping, max_batch=40)  # forces the large-group path too
    assert close(fast, reference(task, X, y, grouping))
    # singletons == per-example gradients, fast vs vmap
    pe = per_example_gradients(task, X[:30], y[:30], chunk_size=7)
    assert close(pe, per_example_gradients(task.generic(), X[:30], y[:30]))


def test_fast_path_is_used_and_batch_independent(data, trained_mlp):
    X, y, _ = data
    task = AttributionTask(trained_mlp)
    Xt, yt = task.to_tensor(X, y)
    assert fast_plan(task, Xt, yt, task.loss_fn, task.params()) is not None
    grouping = random_grouping(len(X), 23, seed=3)
    a = group_gradients(task, X, y, grouping, max_batch=16)
    b = group_gradients(task, X, y, grouping, max_batch=4096)
    assert close(a, b)
    seen = np.concatenate(
        [g for g, _ in iter_group_gradients(task, X, y, grouping, max_batch=16, memory_mb=0.01)]
    )
    assert sorted(seen.tolist()) == list(range(23))


def test_layer_subset_and_custom_fn(data, trained_mlp):
    X, y, test = data
    task = AttributionTask(trained_mlp, layers=["2.weight"])
    grouping = random_grouping(len(X), 9, seed=1)

    def fn(out, t):  # any per-example function of the outputs
        return 0.5 * (out**2).sum(-1) + out[:, 0] * t.to(out.dtype)

    fast = group_gradients(task, X, y, grouping, fn=fn)
    assert fast.shape == (9, task.n_params)
    assert close(fast, reference(task, X, y, grouping, fn=fn))
    # Margin is not vmappable (one_hot): the fast path still serves it, verified by plain grads
    G = per_example_gradients(task, test.X[:5], test.y[:5], fn=Margin(test.X, test.y).example_fn(task))
    assert G.shape == (5, task.n_params) and torch.isfinite(G).all()


class Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.w


class LinearSub(nn.Linear):
    def forward(self, x):  # a subclass with its own forward must not be hooked
        return super().forward(2 * x)


@pytest.mark.parametrize("kind", ["custom", "subclass"])
def test_unsupported_layers_fall_back(data, kind):
    X, y, _ = data
    torch.manual_seed(0)
    if kind == "custom":
        model = nn.Sequential(Scale(64), nn.Linear(64, 10))
    else:
        model = nn.Sequential(LinearSub(64, 10))
    task = AttributionTask(model)
    assert plan_layers(task) is None
    grouping = mixed_grouping(len(X))
    G = group_gradients(task, X, y, grouping)
    # brute force: sum of plain per-example backwards
    ref = torch.zeros_like(G)
    for i in range(len(X)):
        model.zero_grad()
        nn.functional.cross_entropy(
            model(torch.as_tensor(X[i : i + 1])), torch.as_tensor(y[i : i + 1])
        ).backward()
        ref[grouping.labels[i]] += torch.cat([p.grad.flatten() for p in model.parameters()])
    assert close(G, ref)


class BatchMixer(nn.Module):
    """Examples interact within a batch (like training-mode batch norm): factors are invalid."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        h = self.fc(x)
        return h - h.mean(0, keepdim=True)


def test_verification_catches_batch_interaction(data):
    X, y, _ = data
    task = AttributionTask(BatchMixer())
    assert plan_layers(task) is not None  # structurally supported ...
    Xt, yt = task.to_tensor(X, y)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert fast_plan(task, Xt, yt, task.loss_fn, task.params()) is None  # ... but rejected
    assert any("generic path" in str(m.message) for m in w)


def test_verification_remembered_per_task_and_mode(data):
    """The check runs once per task, loss and module modes: a model switched to train mode (where
    it mixes examples, as batch norm does) is checked again and rejected."""

    class MixWhenTraining(nn.Module):
        def forward(self, h):
            return h - h.mean(0, keepdim=True) if self.training else h

    X, y, _ = data
    model = nn.Sequential(nn.Linear(64, 16), MixWhenTraining(), nn.ReLU(), nn.Linear(16, 10))
    task = AttributionTask(model)
    Xt, yt = task.to_tensor(X, y)
    first = fast_plan(task, Xt, yt, task.loss_fn, task.params())
    assert first is not None and first.row_bytes > 0
    again = fast_plan(task, Xt[:5], yt[:5], task.loss_fn, task.params())
    assert again is not None and again.row_bytes == first.row_bytes  # remembered, not re-derived
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert fast_plan(task, Xt, yt, task.loss_fn, task.params()) is None
    model.eval()
    assert fast_plan(task, Xt, yt, task.loss_fn, task.params()) is not None


def test_batch_norm_in_train_mode_falls_back_instead_of_raising(data):
    """A model that mutates state in its forward (batch norm updating running statistics) cannot
    be checked by torch.func at all: the fast path is refused (the generic path is used)."""
    X, y, _ = data
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    task = AttributionTask(model, layers=["0", "3"])
    model.train()
    Xt, yt = task.to_tensor(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warned once per model class and parameter names
        assert fast_plan(task, Xt, yt, task.loss_fn, task.params()) is None


@pytest.mark.parametrize("cls", [GradDot, GradCos])
def test_factor_scoring_equals_dense(small_digits, trained_mlp, cls):
    train, test = small_digits
    task = AttributionTask(trained_mlp)
    for prop in [ExampleLoss(test.X[:12], test.y[:12]), MeanLoss(test.X, test.y)]:
        for grouping in [None, random_grouping(len(train), 150, seed=0)]:
            m = cls(task).cache(train, grouping)
            ref = cls(task.generic()).cache(train, grouping)
            assert not (ref.side.mode == "factors")
            expected = ref.attribute(prop)
            assert (m.side.mode == "factors") == (grouping is None or cls is GradDot)
            got = m.attribute(prop)
            assert np.allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_factor_scoring_streams_and_preconditioned_subclass(small_digits, trained_mlp):
    train, test = small_digits
    task = AttributionTask(trained_mlp)
    prop = ExampleLoss(test.X[:6], test.y[:6])
    expected = GradDot(task).cache(train).attribute(prop)
    streamed = GradDot(task, memory_mb=0.05, max_batch=64).cache(train)
    assert (streamed.side.mode == "factors") and streamed.side.factors is None
    assert np.allclose(streamed.attribute(prop), expected, rtol=1e-4, atol=1e-6)

    with pytest.raises(TypeError, match="preconditioned = True"):

        class Undeclared(GradDot):  # overriding precondition() must be declared
            def precondition(self, target_grads):
                return target_grads

    class Scaled(GradDot):  # a preconditioned method (dense targets) on the factor path
        preconditioned = True

        def precondition(self, target_grads):
            return 3.0 * target_grads

    m = Scaled(task, memory_mb=1.0).cache(train)  # n x p does not fit: factor scoring
    assert m.side.mode == "factors"
    assert np.allclose(m.attribute(prop), 3.0 * expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_targets", [1, 2, 5])
def test_preconditioned_groups_scored_through_factors_or_streamed(small_digits, trained_mlp, n_targets):
    """K group gradients larger than the factors: a preconditioned method caches factors and scores
    few targets through them, more targets against streamed group gradients; same scores."""
    train, test = small_digits
    task = AttributionTask(trained_mlp)
    grouping = random_grouping(len(train), len(train) // 2, seed=0)  # K x p > factor bytes

    class Scaled(GradDot):
        preconditioned = True

        def precondition(self, target_grads):
            return -2.0 * target_grads

    prop = ExampleLoss(test.X[:n_targets], test.y[:n_targets])
    m = Scaled(task).cache(train, grouping)
    assert (m.side.mode == "factors") and m.side.G is None
    ref = Scaled(task.generic()).cache(train, grouping)
    assert not (ref.side.mode == "factors")
    expected = ref.attribute(prop)
    assert np.allclose(
        expected, -2.0 * GradDot(task).cache(train, grouping).attribute(prop), rtol=1e-4, atol=1e-6
    )
    assert np.allclose(m.attribute(prop), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_if_cg_unchanged_by_fast_path(small_digits, trained_mlp):
    train, test = small_digits
    task = AttributionTask(trained_mlp, layers=["2"])
    prop = ExampleLoss(test.X[:4], test.y[:4])
    grouping = random_grouping(len(train), 30, seed=0)
    got = make_method("if-cg", task, damping=1e-2).cache(train, grouping).attribute(prop)
    ref = make_method("if-cg", task.generic(), damping=1e-2).cache(train, grouping).attribute(prop)
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_recycled_blocks_never_overwrite_what_the_consumer_holds(data, trained_mlp):
    from ggda.buffers import BlockRecycler

    X, y, _ = data
    task = AttributionTask(trained_mlp)
    grouping = random_grouping(len(X), 80, seed=4)
    ref = reference(task, X, y, grouping)
    # blocks of 2 groups (memory cap) so many blocks are produced and recycled
    kept = list(iter_group_gradients(task, X, y, grouping, memory_mb=2 * task.n_params * 4 / 2**20))
    views = [(g, G[:, :50]) for g, G in iter_group_gradients(task, X, y, grouping, memory_mb=0.08)]
    assert len(kept) > 10
    for g, G in kept:
        assert close(G, ref[torch.as_tensor(g)])
    for g, V in views:
        assert close(V, ref[torch.as_tensor(g)][:, :50])
    # and a consumer that drops blocks does get recycled memory
    r = BlockRecycler()
    ptrs = []
    for _ in range(6):
        B = r.empty((3, 4), torch.float32, torch.device("cpu"))
        ptrs.append(B.data_ptr())
    assert len(set(ptrs)) < 6


@pytest.mark.parametrize("small_bytes", [0, None])  # 0: every layer multiplied block by block
@pytest.mark.parametrize("sizes", ["equal", "mixed"])
def test_chunk_blocks_equal_reference(data, trained_mlp, monkeypatch, small_bytes, sizes):
    """Blocks of a chunk (one group each, or all at once) = the generic path, whichever layers are
    precomputed for the whole chunk and whether the chunk's groups need padding."""
    from ggda.gradients.fast_group import ChunkGroups

    if small_bytes is not None:
        monkeypatch.setattr(ChunkGroups, "_SMALL_BYTES", small_bytes)
    X, y, _ = data
    task = AttributionTask(trained_mlp)
    grouping = random_grouping(len(X), 20, seed=1) if sizes == "equal" else mixed_grouping(len(X))
    assert (sizes == "equal") == bool((grouping.sizes == grouping.sizes[0]).all())
    ref = reference(task, X, y, grouping)
    for block_mb in [None, 1e-6]:  # one block per chunk; one group per block
        blocks = list(iter_group_gradients(task, X, y, grouping, max_batch=64, block_mb=block_mb))
        assert block_mb is None or all(len(g) == 1 for g, _ in blocks)
        fast = torch.zeros_like(ref)
        for gids, G in blocks:
            fast[torch.as_tensor(gids)] = G
        assert close(fast, ref)


class ResBlockNet(nn.Module):
    """ResNet-style: bias-free convs, BatchNorm (eval), a residual sum, a strided 1x1 shortcut,
    a dilated conv and one conv module called twice per forward."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)  # called twice
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2)
        self.short = nn.Conv2d(4, 6, 1, stride=2, bias=False)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x.view(-1, 1, 8, 8))))
        x = torch.relu(self.conv(torch.relu(self.conv(x))) + x)
        x = torch.relu(self.down(x) + self.short(x))
        return self.head(x.mean(dim=(2, 3)))


class TinyAttention(nn.Module):
    """One self-attention layer over 4 tokens of 16 features (Q, K, V, O as nn.Linear) + head."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = x.view(-1, 4, 16)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 4.0, dim=-1)
        h = h + self.o(att @ self.v(h))
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("arch", ["resnet", "attention"])
def test_group_gradients_equal_per_point_sums(data, arch):
    """Every way group sums are formed (equal sizes in one chunk, mixed sizes padded, groups
    larger than a chunk, singletons) equals per-example gradients summed over the members."""
    X, y, _ = data
    torch.manual_seed(0)
    model = ResBlockNet() if arch == "resnet" else TinyAttention()
    if arch == "resnet":
        with torch.no_grad():  # non-trivial running statistics, then frozen (eval mode)
            model.train()(torch.as_tensor(X[:64]).float())
    model.eval()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    task = AttributionTask(model, layers=names)
    assert plan_layers(task) is not None
    per_point = per_example_gradients(task.generic(), X, y)
    for grouping in (random_grouping(len(X), 16, seed=2), mixed_grouping(len(X)), Grouping.singleton(len(X))):
        expected = torch.zeros(grouping.n_groups, task.n_params).index_add_(
            0, torch.as_tensor(grouping.labels), per_point
        )
        for max_batch in (40, 160):  # 40: the largest groups span several chunks
            fast = group_gradients(task, X, y, grouping, max_batch=max_batch)
            assert close(fast, expected), (arch, grouping.n_groups, max_batch)


def test_groups_in_data_order_read_their_rows_in_place(data, trained_mlp):
    """Groups of consecutive rows (the data's own order) take chunks that are slices of X, not
    gathers, and still equal the generic path; only an exact ascending run counts as a slice."""
    from ggda.gradients.fast_group import _as_range

    assert _as_range(torch.arange(5, 12)) == slice(5, 12)
    assert _as_range(torch.tensor([3])) == slice(3, 4)
    for rows in ([5, 7, 6], [5, 6, 8], [6, 5, 7], []):
        assert _as_range(torch.tensor(rows, dtype=torch.long)) is None
    X, y, _ = data
    task = AttributionTask(trained_mlp)
    grouping = Grouping(np.arange(len(X)) // 6)  # equal groups of 6 and one of 4, in data order
    ref = reference(task, X, y, grouping)
    fast = torch.zeros_like(ref)
    for gids, G in iter_group_gradients(task, X, y, grouping, max_batch=48):
        fast[torch.as_tensor(gids)] = G
    assert close(fast, ref)
