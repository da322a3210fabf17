"""Example inputs fetched in batches: the data boundary every method, grouping and evaluation reads.

Why: the people ggda is for bring their own data pipeline — a map-style ``torch`` ``Dataset``
(images decoded and transformed per item), an unshuffled ``DataLoader``, a Hugging Face
``datasets.Dataset`` of token ids and attention masks — and none of these should have to become
one (n, d) float matrix. Everything downstream therefore reads inputs *by position, a batch at a
time*: memory grows with the batch size, plus documented O(n) state (labels, ids, group ids,
factor caches).

Two layers:

* **batch helpers** — a *batch* is a tensor, a tuple/list or a dict of tensors (nested allowed)
  whose leaves share the leading example dimension. :func:`take`, :func:`to_device`,
  :func:`batch_len` … treat every such structure alike, so ``torch.func.vmap`` (which maps over
  these structures natively), per-example gradients and hooks work on dict inputs unchanged.
* **lazy inputs** — :class:`ExampleInputs` is n examples with stable positions. ``fetch(rows)``
  collates those rows into one batch; ``inputs[index]`` is a lazy subset that keeps positions
  into the same source (no copy). :class:`TorchInputs` reads a map-style torch ``Dataset``
  (through its ``DataLoader`` settings: ``collate_fn``, ``num_workers``, ``pin_memory``);
  :class:`HFInputs` reads a Hugging Face ``datasets.Dataset``. In-memory NumPy arrays stay plain
  arrays (the array adapter is the existing :class:`ggda.data.Dataset`): they are already in
  memory, and their tensor paths are the fastest.

:class:`InputView` is the device side: what :meth:`ggda.task.AttributionTask.to_tensor` returns
for lazy inputs. It answers ``view[rows]`` (a slice, positions, or a 2-D index for padded tiles)
with a batch on the task's device, so code written against a whole-set tensor ``Xt[rows]`` runs
unchanged on any source. Sequential chunk requests are served by a ``DataLoader`` iterator with
the source's workers, so ``num_workers`` and pinned memory work as PyTorch users expect.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ggda.errors import GGDAError

Batch = Any  # torch.Tensor | tuple | list | dict of those
LABEL_KEYS = ("label", "labels", "y", "target", "targets")


# -- batch helpers ---------------------------------------------------------------------------------
def tree_map(fn: Callable[[torch.Tensor], Any], batch: Batch) -> Batch:
    """Apply ``fn`` to every tensor leaf of a batch, keeping its structure."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: tree_map(fn, v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(tree_map(fn, v) for v in batch)
    if hasattr(batch, "keys") and hasattr(batch, "__getitem__"):  # e.g. transformers' BatchEncoding
        return {k: tree_map(fn, batch[k]) for k in batch.keys()}
    raise GGDAError(
        f"A batch holds a {type(batch).__name__}; inputs must be tensors, or tuples/lists/dicts of "
        "tensors (convert other fields in your Dataset's __getitem__ or collate_fn)."
    )


def leaves(batch: Batch) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    tree_map(out.append, batch)
    return out


def batch_len(batch: Batch) -> int:
    """Number of examples in a batch (the leading dimension of its leaves)."""
    first = leaves(batch)
    if not first:
        raise GGDAError("A batch has no tensors; the inputs must hold at least one tensor per example.")
    return int(first[0].shape[0])


def take(batch: Batch, index) -> Batch:
    """Rows ``index`` (slice, int positions, or an N-D index giving leading dims) of every leaf;
    of an :class:`InputView`, the fetched batch."""
    if isinstance(batch, InputView):
        return batch[index]
    if isinstance(index, torch.Tensor) and index.ndim == 1:
        return tree_map(lambda t: t.index_select(0, index.to(t.device)), batch)
    return tree_map(lambda t: t[index], batch)


def unsqueeze(batch: Batch) -> Batch:
    """One example as a batch of one (``x[None]`` for every leaf)."""
    return tree_map(lambda t: t[None], batch)


def to_device(batch: Batch, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
    """Move every leaf to ``device``; floating leaves take ``dtype`` (integer ids stay integers)."""

    def move(t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t.to(device, non_blocking=t.is_pinned())

    return tree_map(move, batch)


def cat(batches: Sequence[Batch]) -> Batch:
    """Concatenate batches of the same structure along the example dimension."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches))
    if isinstance(first, dict):
        return {k: cat([b[k] for b in batches]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(cat([b[i] for b in batches]) for i in range(len(first)))
    raise GGDAError(f"Cannot concatenate batches of type {type(first).__name__}.")


def signature(batch: Batch) -> tuple:
    """Structure, per-example shapes and dtypes: equal for batches a model treats alike."""
    if isinstance(batch, torch.Tensor):
        return (tuple(batch.shape[1:]), batch.dtype)
    if isinstance(batch, dict):
        return tuple((k, signature(v)) for k, v in batch.items())
    return tuple(signature(v) for v in batch)


def is_batch(obj: Any) -> bool:
    """Whether ``obj`` is a tensor batch (tensor, or a tuple/list/dict of tensors)."""
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return bool(obj) and all(is_batch(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return bool(obj) and all(is_batch(v) for v in obj)
    return False


def split_example(item: Any, label_key: str | None = None) -> tuple[Any, Any]:
    """Default split of one item (or one collated batch) into (inputs, label).

    ``(x, y)`` → x, y; ``(x1, x2, y)`` → (x1, x2), y; a dict → the dict without its label key
    (``label_key``, or the first of ``label``, ``labels``, ``y``, ``target(s)`` present).
    """
    if isinstance(item, dict) or (hasattr(item, "keys") and hasattr(item, "__getitem__")):
        keys = list(item.keys())
        key = label_key or next((k for k in LABEL_KEYS if k in keys), None)
        if key is None or key not in keys:
            raise GGDAError(
                f"Dataset items are dicts with keys {keys} and no label key; pass label_key='...' "
                "(or labels=...) to say which field holds the label."
            )
        return {k: item[k] for k in keys if k != key}, item[key]
    if isinstance(item, (tuple, list)):
        if len(item) < 2:
            raise GGDAError(
                "Dataset items are 1-tuples; return (inputs, label) from __getitem__ or pass labels=..."
            )
        inputs = item[0] if len(item) == 2 else tuple(item[:-1])
        return inputs, item[-1]
    raise GGDAError(
        f"Dataset items are {type(item).__name__}; return (inputs, label) or a dict with a label key "
        "from __getitem__."
    )


# -- lazy inputs ------------------------------------------------------------------------------------
class ExampleInputs(ABC):
    """n example inputs with stable positions, fetched a batch at a time (never all at once).

    ``index`` maps this collection's positions to the positions of the underlying source, so a
    subset (``inputs[rows]``) shares the source and copies nothing. Subclasses implement
    :meth:`_fetch_source` (collate source positions into a CPU batch) and may override
    :meth:`_stream` for fast sequential reading.
    """

    def __init__(self, n_source: int, index: np.ndarray | None = None) -> None:
        self.n_source = int(n_source)
        self.index = None if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return self.n_source if self.index is None else len(self.index)

    def _source_positions(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and (positions.min() < -len(self) or positions.max() >= len(self)):
            raise GGDAError(f"Positions out of range for {len(self)} examples.")
        positions = np.where(positions < 0, positions + len(self), positions)
        return positions if self.index is None else self.index[positions]

    @abstractmethod
    def _fetch_source(self, source_positions: np.ndarray) -> Batch:
        """One CPU batch of the examples at these *source* positions, in that order."""

    def fetch(self, positions: np.ndarray | Sequence[int]) -> Batch:
        """One batch (CPU) of the examples at ``positions`` (positions in this collection)."""
        return self._fetch_source(self._source_positions(np.asarray(positions)))

    def _stream(self, source_positions: np.ndarray, batch_size: int) -> Iterator[Batch]:
        """Consecutive batches of ``batch_size`` over these source positions (default: fetch each)."""
        for start in range(0, len(source_positions), batch_size):
            yield self._fetch_source(source_positions[start : start + batch_size])

    def iter_batches(self, batch_size: int = 256) -> Iterator[tuple[slice, Batch]]:
        """``(rows, batch)`` over the whole collection in order, ``batch_size`` rows at a time."""
        all_pos = self._source_positions(np.arange(len(self)))
        for k, batch in enumerate(self._stream(all_pos, batch_size)):
            start = k * batch_size
            yield slice(start, min(start + batch_size, len(self))), batch

    def _with_index(self, index: np.ndarray) -> ExampleInputs:
        import copy

        clone = copy.copy(self)
        clone.index = index
        return clone

    def __getitem__(self, index) -> ExampleInputs:
        """A lazy subset (positions or a slice or a boolean mask); no data is read."""
        pos = np.arange(len(self))[index]
        if np.ndim(pos) == 0:
            raise GGDAError("Index ExampleInputs with a slice or an array of positions; use fetch([i]).")
        return self._with_index(self._source_positions(np.asarray(pos).reshape(-1)))

    @property
    def shape(self) -> tuple[int, ...]:
        """(n, *per-example shape) when the inputs are single tensors; (n,) otherwise."""
        first = self.fetch([0]) if len(self) else None
        if isinstance(first, torch.Tensor):
            return (len(self), *first.shape[1:])
        return (len(self),)

    def example_signature(self) -> tuple:
        """Structure, per-example shapes and dtypes of one example (read once, then remembered)."""
        sig = getattr(self, "_signature", None)
        if sig is None:
            sig = self._signature = signature(self.fetch([0]))
        return sig

    def fingerprint(self) -> str:
        """A digest of the collection (type, size, and the content of up to 16 spread examples).

        Result stores key their entries with it; reading every example would cost a full pass.
        """
        h = hashlib.sha1(f"{type(self).__name__}:{len(self)}:{self.n_source}".encode())
        if self.index is not None:
            h.update(np.ascontiguousarray(self.index).tobytes())
        if len(self):
            probe = np.unique(np.linspace(0, len(self) - 1, num=min(16, len(self))).astype(np.int64))
            for leaf in leaves(self.fetch(probe)):
                h.update(str((leaf.dtype, tuple(leaf.shape))).encode())
                h.update(leaf.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        return f"{type(self).__name__}({len(self)} examples)"


def _identity_collate(items):
    return items


class TorchInputs(ExampleInputs):
    """Inputs of a map-style ``torch.utils.data.Dataset``, collated as its DataLoader would.

    Args:
        dataset: any map-style dataset (``__getitem__`` by position, ``__len__``).
        split: item → (inputs, label); default :func:`split_example` (tuples and dicts).
        collate_fn: the DataLoader's collate function (default ``default_collate``), applied to
            whole items before the split, exactly as a training loop would see them.
        num_workers, pin_memory: used for sequential passes (a ``DataLoader`` over the rows).
        label_key: which dict field is the label (for dict items).
    """

    def __init__(
        self,
        dataset,
        split: Callable[[Any], tuple[Any, Any]] | None = None,
        collate_fn: Callable | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        label_key: str | None = None,
        index: np.ndarray | None = None,
    ) -> None:
        try:
            n = len(dataset)
        except TypeError as exc:
            raise GGDAError(
                f"{type(dataset).__name__} has no len(); ggda needs a map-style Dataset (positions are "
                "stable ids): wrap an IterableDataset's examples in a list or a map-style Dataset."
            ) from exc
        super().__init__(n, index)
        self.dataset = dataset
        self.split = split
        self.collate_fn = collate_fn
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.label_key = label_key

    def _collate(self, items: list) -> Any:
        from torch.utils.data import default_collate

        return (self.collate_fn or default_collate)(items)

    def _inputs_of(self, collated: Any) -> Batch:
        inputs, _ = (self.split or (lambda b: split_example(b, self.label_key)))(collated)
        return inputs

    def _fetch_source(self, source_positions: np.ndarray) -> Batch:
        batch = self._collate([self.dataset[int(i)] for i in source_positions])
        return self._inputs_of(batch)

    def _loader(self, source_positions: np.ndarray, batch_size: int):
        from torch.utils.data import DataLoader, Subset

        return DataLoader(
            Subset(self.dataset, source_positions.tolist()),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )

    def _stream(self, source_positions: np.ndarray, batch_size: int) -> Iterator[Batch]:
        if self.num_workers == 0:
            yield from super()._stream(source_positions, batch_size)
            return
        for batch in self._loader(source_positions, batch_size):
            yield self._inputs_of(batch)

    def labels(self, batch_size: int = 512) -> np.ndarray:
        """Every example's label, in order (one pass; a ``targets``/``labels`` attribute is used
        when the dataset has one of the right length and no subset or custom split is involved)."""
        if self.index is None and self.split is None:
            for attr in ("targets", "labels"):
                values = getattr(self.dataset, attr, None)
                if values is not None and not callable(values):
                    arr = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
                    if arr.ndim >= 1 and len(arr) == len(self):
                        return arr
        split = self.split or (lambda b: split_example(b, self.label_key))
        out = []
        all_pos = self._source_positions(np.arange(len(self)))
        if self.num_workers:
            batches = (split(b)[1] for b in self._loader(all_pos, batch_size))
        else:
            batches = (
                split(self._collate([self.dataset[int(i)] for i in all_pos[s : s + batch_size]]))[1]
                for s in range(0, len(all_pos), batch_size)
            )
        for labels in batches:
            out.append(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class HFInputs(ExampleInputs):
    """Inputs of a Hugging Face ``datasets.Dataset``: the chosen columns, as torch tensors.

    Rows are read by position with the dataset's own batched indexing (Arrow, no full copy).
    Columns of unequal lengths per row (unpadded token ids) need a ``collate_fn`` that pads,
    e.g. ``transformers.DataCollatorWithPadding(tokenizer)``.
    """

    def __init__(
        self,
        dataset,
        columns: Sequence[str],
        collate_fn: Callable | None = None,
        index: np.ndarray | None = None,
    ) -> None:
        missing = [c for c in columns if c not in dataset.column_names]
        if missing:
            raise GGDAError(
                f"Columns {missing} are not in the Hugging Face dataset (it has {dataset.column_names}); "
                "pass inputs=[...] naming existing columns."
            )
        super().__init__(len(dataset), index)
        self.dataset = dataset
        self.columns = list(columns)
        self.collate_fn = collate_fn

    def _fetch_source(self, source_positions: np.ndarray) -> Batch:
        view = self.dataset.select_columns(self.columns)
        if self.collate_fn is not None:
            rows = view[[int(i) for i in source_positions]]
            items = [{c: rows[c][k] for c in self.columns} for k in range(len(source_positions))]
            return dict(self.collate_fn(items))
        rows = view.with_format("torch")[[int(i) for i in source_positions]]
        out = {}
        for c in self.columns:
            value = rows[c]
            if not isinstance(value, torch.Tensor):
                try:
                    value = torch.stack([torch.as_tensor(v) for v in value])
                except (RuntimeError, TypeError) as exc:
                    raise GGDAError(
                        f"Column '{c}' has rows of different lengths; pad it when tokenizing "
                        "(padding='max_length') or pass collate_fn=DataCollatorWithPadding(tokenizer)."
                    ) from exc
            out[c] = value
        return out


# -- device side ------------------------------------------------------------------------------------
#: Slices shorter than this (probes of a few rows) are read in process, not through worker processes.
_STREAM_MIN_ROWS = 32


class InputView:
    """Lazy inputs as seen from a device: ``view[rows]`` is a batch on ``device``.

    Stands where code once held the whole input tensor ``Xt``: slices, position arrays, 1-D index
    tensors (``index_select``) and 2-D index tensors (padded tiles: leaves get leading dims
    (k, s)) are answered by fetching just those rows. Consecutive equal-sized slices (the common
    chunked pass) are read through one ``DataLoader`` iterator, so workers prefetch ahead.
    """

    def __init__(self, inputs: ExampleInputs, device: torch.device, dtype: torch.dtype) -> None:
        self.inputs, self.device, self.dtype = inputs, device, dtype
        self._stream: Iterator[Batch] | None = None
        self._next: tuple[int, int] | None = None  # (start, step) the stream serves next

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self),)

    def element_size(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    def _move(self, batch: Batch) -> Batch:
        return to_device(batch, self.device, self.dtype)

    def _slice(self, start: int, stop: int) -> Batch:
        step = stop - start
        if self._next == (start, step) and self._stream is not None:
            batch = next(self._stream, None)
            if batch is not None:
                self._next = (stop, step) if stop < len(self) else None
                return batch
        if getattr(self.inputs, "num_workers", 0) and stop < len(self) and step >= _STREAM_MIN_ROWS:
            pos = self.inputs._source_positions(np.arange(start, len(self)))
            self._stream = self.inputs._stream(pos, step)
            self._next = (stop, step)
            return next(self._stream)
        self._stream, self._next = None, None
        return self.inputs.fetch(np.arange(start, stop))

    def __getitem__(self, index) -> Batch:
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return self._move(self._slice(start, max(start, stop)))
            index = np.arange(start, stop, step)
        if isinstance(index, int):
            return take(self._move(self.inputs.fetch([index])), 0)
        idx = index.detach().cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        flat = self._move(self.inputs.fetch(idx.reshape(-1)))
        if idx.ndim == 1:
            return flat
        lead = idx.shape
        return tree_map(lambda t: t.reshape(*lead, *t.shape[1:]), flat)

    def index_select(self, dim: int, index: torch.Tensor) -> Batch:
        if dim != 0:
            raise GGDAError("Inputs are selected along the example dimension only.")
        return self[index]


def input_signature(X) -> tuple:
    """What a model sees of a whole-set tensor or an :class:`InputView` (cache keys)."""
    if isinstance(X, torch.Tensor):
        return (tuple(X.shape[1:]), X.dtype)
    if isinstance(X, InputView):
        return ("lazy", X.inputs.example_signature(), X.dtype)
    return ("batch", signature(X))


def as_inputs(X):
    """Inputs as stored by properties and datasets: lazy inputs kept, anything else an array."""
    if isinstance(X, ExampleInputs):
        return X
    return np.asarray(X)


def iter_rows(X, batch_size: int) -> Iterator[tuple[slice, Batch]]:
    """``(rows, X[rows])`` over a whole-set tensor or an :class:`InputView`, in order."""
    n = len(X)
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        yield rows, X[rows]
