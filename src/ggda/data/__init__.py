"""Data sets: one in-memory abstraction, bundled loaders, user-file loaders, preprocessing."""

from ggda.data.bundled import BUNDLED_DATASETS, load_dataset
from ggda.data.dataset import Dataset
from ggda.data.files import load_file
from ggda.data.preprocess import Standardizer, flip_labels, train_test_split

__all__ = [
    "BUNDLED_DATASETS",
    "Dataset",
    "Standardizer",
    "flip_labels",
    "load_dataset",
    "load_file",
    "train_test_split",
]
