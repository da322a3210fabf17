"""Buffers and the only code that relies on torch internals or OS memory advice.

Why one module: the fast gradient paths reuse output blocks (recycling memory the consumer has
dropped, detected through reference and storage use counts) and ask Linux for huge pages for
large buffers that are written whole (``madvise`` through ``ctypes``); TRAK recognises blocks
written in place into its stage by comparing storages. These touch private torch APIs
(``Tensor._use_count``, ``torch._C._storage_Use_Count``) and the C library: a torch upgrade or
another OS should break — or degrade to plain allocations — here and nowhere else. Every
function keeps the numbers unchanged; only where memory comes from differs.

Huge pages: a fresh multi-MB tensor is page-faulted in on its first write, 4 KB at a time. On the
machines we measure on, first-touching 81 MB (200 group gradients of an MLP with p = 101,770)
takes ~45 ms — as long as the matrix products that fill it — and ~10 ms with 2 MB pages.
Linux gives a region huge pages only when asked (``/sys/kernel/mm/transparent_hugepage/enabled``
is ``madvise`` by default), so buffers that are about to be written whole (group-gradient
blocks, the dense Hessian, staging matrices) are allocated through :func:`empty_huge`. The
advice is only a hint: elsewhere (other OSes, CUDA tensors, small tensors, a kernel that
ignores it) the result is a plain ``torch.empty``.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

_MADV_HUGEPAGE = 14  # Linux
_HUGE = 2 * 2**20
_MIN_BYTES = 4 * 2**20  # below this the saving is negligible
_madvise = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - no libc symbol
        _madvise = None


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask the kernel to back the 2 MB-aligned part of ``t``'s memory with huge pages.

    Returns whether the advice was given (False on non-Linux, CUDA or small tensors). Call it
    before the first write: pages already touched keep their size.
    """
    if _madvise is None or t.device.type != "cpu":
        return False
    nbytes = t.untyped_storage().nbytes()
    if nbytes < _MIN_BYTES:
        return False
    addr = t.untyped_storage().data_ptr()
    start = (addr + _HUGE - 1) & ~(_HUGE - 1)
    stop = (addr + nbytes) & ~(_HUGE - 1)
    if stop <= start:
        return False
    return _madvise(start, stop - start, _MADV_HUGEPAGE) == 0


_BLOCK_MIN, _BLOCK_MAX, _BLOCK_FALLBACK = 1 * 2**20, 16 * 2**20, 2 * 2**20


def _parse_size(text: str) -> int:
    """Bytes of a sysfs cache size such as ``32768K`` or ``1M``."""
    text = text.strip().upper()
    unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * unit


def _cpu_count(cpu_list: str) -> int:
    """Number of CPUs in a sysfs list such as ``0-1,4``."""
    total = 0
    for part in cpu_list.strip().split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total


def last_level_cache_share(sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Bytes of the CPU's last-level cache per core that shares it (None where unknown).

    Read from Linux sysfs (``index*/level``, ``size``, ``shared_cpu_list``): the cache level with
    the largest number wins, divided by how many CPUs share it, because the other cores' work
    (another worker, another process) evicts the rest.
    """
    best: tuple[int, int] | None = None
    try:
        for entry in sysfs.glob("index*"):
            if (entry / "type").exists() and (entry / "type").read_text().strip() == "Instruction":
                continue
            level = int((entry / "level").read_text())
            share = _parse_size((entry / "size").read_text()) // max(
                1, _cpu_count((entry / "shared_cpu_list").read_text())
            )
            if best is None or level > best[0]:
                best = (level, share)
    except (OSError, ValueError):
        return None
    return None if best is None else best[1]


@functools.lru_cache(maxsize=8)
def cache_block_bytes(device_type: str = "cpu") -> int:
    """Size of the output blocks that group-gradient producers recycle, chosen from this machine.

    Why: a recycled block is written by the producer's matrix products and read at once by the
    consumer; when the few blocks in flight (the producer's, the consumer's, one spare: see
    :class:`BlockRecycler`) and the chunk's layer factors stay in the last-level cache, that
    round trip never reaches main memory. An eighth of the core's share of the last-level cache
    keeps the blocks in flight under half of it, leaving the other half to the chunk's factors
    (a 2,048-row chunk of a 784-input MLP is 8.6 MB: its gathered inputs and output gradients);
    2 MB on a 2-core machine with a 32 MB L3, where it measured best among 1, 1.5, 2, 2.5, 3 and
    4 MB (4 MB, a quarter, let the blocks and the factors overflow the share: 1.5-1.6x the floor
    against 1.4-1.5x under the same load). CUDA devices use an eighth of their L2 the same way.
    Clamped to 1–16 MB: smaller blocks pay per-call overheads, larger ones the page faults of
    fresh memory. Unknown cache (another OS, no sysfs): 2 MB.
    """
    share: int | None = None
    if device_type == "cuda" and torch.cuda.is_available():
        share = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", None)
    elif device_type == "cpu" and sys.platform.startswith("linux"):
        share = last_level_cache_share()
    if not share:
        return _BLOCK_FALLBACK
    return int(min(_BLOCK_MAX, max(_BLOCK_MIN, share // 8)))


def empty_huge(
    *shape: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``torch.empty(shape)`` whose memory, on Linux CPU, is advised to use huge pages."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    advise_huge_pages(t)
    return t


def zeros_huge(
    *shape: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``torch.zeros(shape)`` with :func:`empty_huge`'s page advice (zeroing is the first touch)."""
    return empty_huge(*shape, dtype=dtype, device=device).zero_()


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` lives in ``b``'s memory (a block written in place into a stage buffer)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def storage_key(tensors: Iterable[torch.Tensor]) -> tuple[int, ...]:
    """Where these tensors' data live: a cache key for views built on exactly these buffers."""
    return tuple(t.data_ptr() for t in tensors)


def _holders(t: torch.Tensor) -> tuple[int, int, int]:
    """(Python refs, tensor-impl refs, storage refs) of ``t``: any view, saved tensor, NumPy array
    or stored Python reference raises one of them."""
    use = getattr(torch._C, "_storage_Use_Count", None)
    storage = use(t.untyped_storage()._cdata) if use is not None else -1
    return sys.getrefcount(t), t._use_count(), storage


class BlockRecycler:
    """Output blocks for a generator, reusing the memory of earlier blocks once the consumer has
    dropped every reference to them.

    Why: on CPU a fresh multi-MB tensor is page-faulted in on first write, which costs as much
    as the matrix products that fill it (all K group gradients at K = n/10 are ~10× the
    training data). A block is reused only when nothing can observe it any more — no Python
    reference, no view, no autograd-saved copy, no NumPy alias — so a consumer that keeps blocks
    (``list(...)``) simply gets fresh ones. A few past blocks are pooled because a ``for`` loop
    still holds the previous block while the next one is produced. A request for fewer rows (the
    last block of a chunk) is served by the leading rows of a free pooled block: a fresh tensor
    there would page-fault every chunk and push a reusable block out of the pool.
    """

    def __init__(self, size: int = 3) -> None:
        self.size = size
        self._pool: list[torch.Tensor] = [torch.empty(1)]
        self._base = self._holders_at(0) if hasattr(torch.Tensor, "_use_count") else None
        self._pool.clear()

    def _holders_at(self, i: int) -> tuple[int, int, int]:
        t = self._pool[i]
        out = _holders(t)
        del t
        return out

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        out = None
        if self._base is not None:
            for i in range(len(self._pool)):  # not enumerate(): its reused tuple keeps a reference
                t = self._pool[i]
                match = (
                    t.device.type == "cpu"
                    and t.dtype == dtype
                    and t.dim() == len(shape)
                    and tuple(t.shape[1:]) == tuple(shape[1:])
                    and t.shape[0] >= shape[0]
                )
                del t
                if match and self._holders_at(i) == self._base:
                    out = self._pool.pop(i)
                    break
        if out is None:
            out = torch.empty(shape, dtype=dtype, device=device)
        self._pool.append(out)
        if len(self._pool) > self.size:
            self._pool.pop(0)
        return out if out.shape[0] == shape[0] else out[: shape[0]]
