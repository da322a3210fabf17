"""examples/fashion_mnist_cnn.py on a tiny synthetic uint8 image set (no Debian files needed):
model, a 1-epoch training loop with checkpoints, TracIn, EK-FAC and TRAK per point and on
Grad-K-Means groups (read a batch at a time: no whole-set tensor is collated), and a retraining
score through the user's training function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import import_example

N_TRAIN, N_TEST, ROWS = 64, 8, 16


@pytest.fixture(scope="module")
def example():
    return import_example("fashion_mnist_cnn")


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 28, 28) images: a bright class-dependent row band plus noise; labels 0..9."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(y):
        images[i, 2 * c + 4 : 2 * c + 7] = 220
    return images, y


@pytest.fixture(scope="module")
def data(example):
    train_set = example.FashionImages(*_images(N_TRAIN, 0))
    test_set = example.FashionImages(*_images(N_TEST, 1))
    return train_set, test_set


def test_dataset_is_lazy_uint8(example, data):
    train_set, _ = data
    assert train_set.images.dtype == np.uint8
    x, y = train_set[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3
    assert torch.equal(train_set[3][0], x)  # deterministic transform


def test_fashion_example_end_to_end(example, data, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    train_set, test_set = data
    model = example.make_model(0, width=4)
    checkpoints = example.train(model, train_set, 0, default_epochs=1, batch_size=16, n_checkpoints=2)
    assert len(checkpoints) == 2 and all(lr == 3e-3 for _, lr in checkpoints)
    assert 0.0 <= example.evaluate(model, test_set) <= 1.0

    # every batch ggda collates from the Dataset has at most ROWS images: no whole-set tensor
    import torch.utils.data as tud

    sizes: list[int] = []
    collate = tud.default_collate

    def recording(items):
        sizes.append(len(items))
        return collate(items)

    monkeypatch.setattr(tud, "default_collate", recording)
    out = example.attribute(
        model, train_set, test_set, test_set, methods=example.METHODS, checkpoints=checkpoints, n_groups=10,
        rows=ROWS, log=lambda *_: None,
    )  # fmt: skip
    monkeypatch.undo()
    assert sizes and max(sizes) <= ROWS

    grouping, res = out["grouping"], out["methods"]["tracin"]
    assert grouping.n_groups == 10 and len(grouping.labels) == N_TRAIN
    for name in example.METHODS:
        r = out["methods"][name]
        assert r["points"].shape == (N_TEST, N_TRAIN) and np.isfinite(r["points"]).all(), name
        assert r["groups"].shape == (N_TEST, 10) and np.isfinite(r["groups"]).all(), name
        assert r["groups_mean_loss"].shape == (1, 10), name
    # TracIn is linear in the training examples: a group's score is the sum of its members'
    summed = np.stack([res["points"][:, grouping.labels == g].sum(1) for g in range(10)], axis=1)
    assert np.allclose(res["groups"], summed, rtol=1e-3, atol=1e-3 * np.abs(summed).max())
    memory = out["memory"]
    assert {"grouping", "ekfac points", "trak groups", "tracin mean-loss"} <= set(memory.phases)
    assert memory.peak_mb >= 0.0

    removal = example.retraining(
        train_set,
        test_set,
        {"tracin-grad-kmeans": (res["groups_mean_loss"], grouping)},
        tmp_path / "retrains",
        width=4,
        epochs=1,
        fractions=(0.25,),
        seeds=(0,),
    )
    table = removal.table()
    assert set(table["label"]) == {"tracin-grad-kmeans", "random"}
    assert (table["n_removed"] == 16).all()
    assert table["acc_mean"].between(0.0, 1.0).all()


def test_missing_data_is_one_error_line(example, tmp_path, capsys):
    assert example.main(["--quick", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "make data" in err[0]


def test_quick_flags(example):
    args = example.parse_args(["--quick", "--methods", "tracin,trak", "--fractions", "0.05,0.1"])
    assert (args.n_train, args.n_test, args.epochs, args.groups) == (2000, 500, 1, 40)
    assert args.methods == ["tracin", "trak"] and args.fractions == (0.05, 0.1)
    with pytest.raises(SystemExit):
        example.parse_args(["--methods", "nope"])
