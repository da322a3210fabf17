import numpy as np
import pytest
import torch

from ggda.errors import GGDAError
from ggda.models import TrainConfig, build_model, load_model, save_model, train_model
from ggda.models.training import accuracy, resolve_device


@pytest.mark.parametrize("name", ["logreg", "mlp-s", "mlp-m", "cnn"])
def test_models_train_and_learn(name, small_digits):
    train, test = small_digits
    model = build_model(name, train.n_features, 10, input_shape=train.input_shape, seed=0)
    train_model(model, train, TrainConfig(epochs=8, lr=0.05, batch_size=32))
    assert accuracy(model, test) > 0.6


def test_same_seed_bit_identical(small_digits):
    train, _ = small_digits
    states = []
    for _ in range(2):
        m = build_model("mlp-m", train.n_features, 10, seed=1)
        train_model(m, train, TrainConfig(epochs=2, seed=7, optimizer="adam", lr=1e-3, weight_decay=1e-4))
        states.append(torch.cat([p.flatten() for p in m.parameters()]))
    assert torch.equal(states[0], states[1])
    m = build_model("mlp-m", train.n_features, 10, seed=1)
    train_model(m, train, TrainConfig(epochs=2, seed=8, optimizer="adam", lr=1e-3))
    assert not torch.equal(states[0], torch.cat([p.flatten() for p in m.parameters()]))


def test_checkpoints_record_lr(small_digits, tmp_path):
    train, _ = small_digits
    m = build_model("logreg", train.n_features, 10, seed=0)
    res = train_model(m, train, TrainConfig(epochs=4, lr=0.03, checkpoint_every=2), checkpoint_dir=tmp_path)
    assert [c.epoch for c in res.checkpoints] == [2, 4]
    assert all(c.lr == 0.03 and c.path.exists() for c in res.checkpoints)
    loaded = load_model(res.checkpoints[-1].path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), m.parameters(), strict=True))


def test_zero_weights_leave_model_unchanged(small_digits):
    """Weight 0 removes a point from the objective: all-zero weights never move the model."""
    train, _ = small_digits
    sub = train.subset(np.arange(20))
    cfg = TrainConfig(epochs=1, batch_size=1, lr=0.1, momentum=0.0, seed=0)
    a = build_model("logreg", sub.n_features, 10, seed=0)
    w = np.ones(20)
    w[:] = 0
    train_model(a, sub, cfg, sample_weight=w)
    b = build_model("logreg", sub.n_features, 10, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_nan_loss_names_the_fix(small_digits):
    train, _ = small_digits
    m = build_model("mlp-s", train.n_features, 10, seed=0)
    with pytest.raises(GGDAError, match="lower the learning rate"):
        train_model(m, train, TrainConfig(epochs=3, lr=1e12, momentum=0.0))


def test_checkpoint_mismatch(small_digits, tmp_path):
    train, _ = small_digits
    m = build_model("mlp-s", train.n_features, 10, seed=0)
    save_model(tmp_path / "m.pt", m)
    other = build_model("mlp-m", train.n_features, 10, seed=0)
    with pytest.raises(GGDAError, match="does not match the model"):
        load_model(tmp_path / "m.pt", model=other)


def test_unknown_device_and_model():
    with pytest.raises(GGDAError, match="Unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(GGDAError, match="--device cpu"):
            resolve_device("cuda")
    with pytest.raises(GGDAError, match="logreg"):
        build_model("resnet", 4, 2)
