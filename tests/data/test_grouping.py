import numpy as np
import pytest

from ggda.errors import GGDAError
from ggda.groups import Grouping, random_grouping


def test_validation_messages():
    with pytest.raises(GGDAError, match="no empty group"):
        Grouping(np.array([0, 2, 2]))
    with pytest.raises(GGDAError, match="negative"):
        Grouping(np.array([0, -1]))
    with pytest.raises(GGDAError, match="integers"):
        Grouping(np.array([0.5, 1.0]))
    with pytest.raises(GGDAError, match="one group id per training point"):
        Grouping(np.array([0, 1])).check_matches(3)


def test_random_equal_sizes_and_seeded():
    g = random_grouping(103, 10, seed=4)
    assert g.n_groups == 10 and g.sizes.min() >= 10 and g.sizes.max() <= 11
    assert np.array_equal(g.labels, random_grouping(103, 10, seed=4).labels)


def test_from_ids_expand_and_save(tmp_path):
    g = Grouping.from_ids(np.array(["b", "a", "b", "c"]))
    assert g.labels.tolist() == [1, 0, 1, 2] and g.meta["names"] == ["a", "b", "c"]
    assert np.allclose(g.expand(np.array([[3.0, 4.0, 5.0]])), [[2.0, 3.0, 2.0, 5.0]])
    for name in ("g.npy", "g.parquet"):
        assert np.array_equal(Grouping.load(g.save(tmp_path / name)).labels, g.labels)
