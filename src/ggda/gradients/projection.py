"""Random projections of gradients (TRAK's P, Johnson–Lindenstrauss sketches), blockwise.

Why: TRAK-style methods need k-dimensional features ``Pᵀ g`` of p-dimensional gradients, with
p up to millions. Neither the p × k matrix P nor an n × p gradient matrix may ever be held at
once (DATA-SOURCES §3: a 10k × 100k fp32 gradient matrix is 4 GB and was OOM-killed). So:

* P is defined **row-block by row-block**: rows ``[b·B, (b+1)·B)`` are drawn from their own
  generator seeded from ``(seed, stream, b)``. Any block can be (re)generated on its own, in any
  order, and is always the same numbers — so projecting in one go, chunk by chunk, or from the
  materialised matrix gives the same result (up to float summation order).
* Gradients are projected **chunk by chunk** as they stream out of
  :func:`ggda.gradients.iter_group_gradients`; only (rows × k) outputs are kept.
* When P fits ``cache_mb`` (default :data:`DEFAULT_CACHE_MB` = 512 MB, i.e. p·k ≤ 134M fp32 entries:
  an MLP 784-128-10 at k = 1024 still fits) its blocks are kept after first use, so one attribution
  generates P once; otherwise they are regenerated at every ``project`` call (compute for memory).
  Regenerating dominated TRAK's run time (p = 101,770, k = 512 is 208 MB: over the old 128 MB
  default, P was redrawn for every block of gradients). Cached or not, the numbers are identical:
  every block comes from its own seeded generator.
* A Rademacher P too large to keep keeps its random *words* instead (32 signs per int32, 1/32 of
  the float32 matrix) when they fit ``cache_mb``; a pass then only unpacks signs (three integer
  passes through the float's sign bit, no generator), a cache-sized slice at a time, each slice
  multiplied while it is in cache. On MiniLM's last layer + head (p = 1.77M, k = 2,048: 14.5 GB
  of P, 454 MB of words) that makes a projection pass of a few rows 2–2.7× faster
  (docs/performance.md).

Entries are i.i.d. N(0, 1/k) (Gaussian) or ±1/√k (Rademacher), so E[P Pᵀ] = I and inner products
are preserved *in expectation*: E[(Pᵀa)ᵀ(Pᵀb)] = aᵀb, with relative error O(1/√k) (JL).

:class:`LayerwiseProjector` is the block-diagonal variant: every layer gets its own projection
(its share of the k dimensions), so features keep per-layer structure and no dense block mixes
layers — the layer-wise sketch used by TRAK's chunked projector and LoGra-style methods. A layer
smaller than its share is kept exactly (identity), and the unused dimensions go to the others.

Determinism: the same (kind, p, k, seed, stream, block_rows, device type, dtype) always gives the
same P. Blocks are generated on the projector's device (fast on CUDA); CPU and CUDA generators
produce different — equally valid — matrices.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from ggda.buffers import empty_huge
from ggda.errors import GGDAError

PROJECTIONS = ("gaussian", "rademacher", "identity")
DEFAULT_BLOCK_ROWS = 2048
DEFAULT_CACHE_MB = 512.0
#: Bytes of P per GEMM in :meth:`RandomProjector.project`: about an L2 cache (0.5–2 MB gave the
#: same speed on the machines measured, docs/performance.md); whole 8–16 MB blocks ran 1.5–3× slower.
SUB_BLOCK_BYTES = 2**21


class Projector(ABC):
    """A linear map R^p → R^k applied to row vectors: ``project(G (m, p)) -> (m, k)``."""

    p: int
    k: int

    @abstractmethod
    def project(self, G: torch.Tensor) -> torch.Tensor:
        """(m, k) = G Pᵀ-rows, i.e. each row g ↦ Pᵀg."""

    def matrix(self) -> torch.Tensor:
        """The dense (p, k) matrix P (for tests and small p only)."""
        eye = torch.eye(self.p, dtype=self.dtype, device=self.device)
        return self.project(eye)

    def _check(self, G: torch.Tensor) -> None:
        if G.ndim != 2 or G.shape[1] != self.p:
            raise GGDAError(
                f"The projector maps {self.p}-dimensional rows but got shape {tuple(G.shape)}; "
                "project gradients of the same task (same layers) it was built for."
            )


class IdentityProjector(Projector):
    """P = I (k = p): exact features, for small models and closed-form checks."""

    def __init__(self, p: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.p = self.k = int(p)
        self.device, self.dtype = torch.device(device), dtype

    def project(self, G: torch.Tensor) -> torch.Tensor:
        self._check(G)
        return G


_INT_OF_WIDTH = {16: torch.int16, 32: torch.int32, 64: torch.int64}
_SIGN_SHIFTS: dict[tuple[float, torch.dtype, torch.device], tuple[torch.Tensor, int, torch.dtype]] = {}


def _unpack_signs(
    words: torch.Tensor, scale: float, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(rows, 32·w) entries ±scale from (rows, w) int32 words: entry 32·i + j is +scale where bit j
    of word i is set, −scale where it is clear.

    Written through the float's sign bit: the only difference between +scale and −scale is that
    bit, so shifting bit j of every word to the sign position (one broadcast shift), masking it
    and XOR-ing the bit pattern of −scale gives the exact floats in three vectorised integer
    passes over the output — about twice as fast as the former byte-table lookup (index_select
    of eight floats per byte), and the same numbers: the table held ``bit·(2·scale) − scale`` in
    ``dtype``, i.e. exactly ±(scale rounded to dtype). Shifts are arithmetic on values, so the
    entry order does not depend on the machine's byte order.
    ``out``: a buffer of at least rows·32·w elements of ``dtype`` to write into (memory that is
    reused, and in cache, is faster than fresh pages).
    """
    rows, w = words.shape
    key = (float(scale), dtype, words.device)
    if key not in _SIGN_SHIFTS:
        bits = torch.finfo(dtype).bits
        shift_type = torch.int64 if bits == 64 else torch.int32
        top = 63 if bits == 64 else 31  # bit j goes to the top of the word it is shifted in
        shifts = (top - torch.arange(32)).to(shift_type).to(words.device)
        negative = int(torch.tensor(-scale, dtype=dtype).view(_INT_OF_WIDTH[bits]))  # bit pattern of −scale
        _SIGN_SHIFTS[key] = (shifts, negative, _INT_OF_WIDTH[bits])
    shifts, negative, itype = _SIGN_SHIFTS[key]
    if out is None:
        out = torch.empty(rows * 32 * w, dtype=dtype, device=words.device)
    x = out.view(-1)[: rows * 32 * w].view(itype).view(rows, w, 32)
    if itype == torch.int64:  # the (sign-extended) word's bit j to bit 63
        torch.bitwise_left_shift(words.long()[..., None], shifts, out=x)
    elif itype == torch.int32:
        torch.bitwise_left_shift(words[..., None], shifts, out=x)
    else:  # bit j to bit 31, then (arithmetic shift) to bit 15 of the 16-bit word
        x.copy_(torch.bitwise_left_shift(words[..., None], shifts).bitwise_right_shift_(16))
    x.bitwise_and_(torch.iinfo(itype).min).bitwise_xor_(negative)  # keep the sign bit: set → +scale
    return x.view(dtype).view(rows, 32 * w)


def block_seed(seed: int, stream: int, block: int) -> int:
    """A 64-bit generator seed for one block, statistically independent across (seed, stream, block)."""
    words = np.random.SeedSequence([int(seed) % 2**32, int(stream), int(block)]).generate_state(2, np.uint32)
    return (int(words[0]) << 32) | int(words[1])


class RandomProjector(Projector):
    """Dense Gaussian or Rademacher P (p × k), generated and applied in row blocks.

    Args:
        p, k: input and output dimensions.
        kind: ``"gaussian"`` (N(0, 1/k) entries) or ``"rademacher"`` (±1/√k).
        seed: the matrix's seed (ensembles give every model its own).
        stream: sub-stream id, so several projectors with one seed stay independent (layers).
        block_rows: rows of P per generated block; part of P's definition.
        cache_mb: keep the generated blocks when the whole P is at most this size (MB); 0 never
            caches. Does not change the numbers, only memory vs. regeneration time. A kept P lives
            in one buffer advised to use huge pages (:mod:`ggda.buffers`), which makes
            first-touching it cheaper than generating it again: the second pass (the target
            gradients) is then a plain GEMM. A Rademacher P too large to keep keeps its random
            words instead when they fit (one bit per entry, 1/32 of P in float32: 454 MB for
            p = 1.77M, k = 2,048), so later passes skip the generator and only unpack signs.

    Projection passes (:meth:`project`) multiply G by P in sub-blocks of about
    :data:`SUB_BLOCK_BYTES` of P: with few rows in G (a few groups, a few targets) a GEMM against
    a whole 2,048-row block runs at a third to a half of the speed of the same products against
    cache-sized slices, and a regenerated Rademacher P is unpacked one such slice at a time
    into one reused buffer, so its entries are multiplied while still in cache.
    """

    def __init__(
        self,
        p: int,
        k: int,
        kind: str = "gaussian",
        seed: int = 0,
        stream: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        cache_mb: float = DEFAULT_CACHE_MB,
    ) -> None:
        if kind not in ("gaussian", "rademacher"):
            raise GGDAError(f"Unknown random projection '{kind}'; choose gaussian or rademacher.")
        if p < 1 or k < 1 or block_rows < 1:
            raise GGDAError(f"Projection sizes must be positive (p={p}, k={k}, block_rows={block_rows}).")
        self.p, self.k, self.kind = int(p), int(k), kind
        self.seed, self.stream = int(seed), int(stream)
        self.device, self.dtype = torch.device(device), dtype
        self.block_rows = int(block_rows)
        self.n_blocks = math.ceil(self.p / self.block_rows)
        self.scale = 1.0 / math.sqrt(self.k)
        nbytes = self.p * self.k * torch.finfo(dtype).bits / 8
        self._cacheable = nbytes <= cache_mb * 2**20
        self._cache: dict[int, torch.Tensor] = {}  # block -> view of _store
        self._store: torch.Tensor | None = None
        words_bytes = self.p * self._n_words() * 4
        self._words_cacheable = (
            kind == "rademacher" and not self._cacheable and words_bytes <= cache_mb * 2**20
        )
        self._word_cache: dict[int, torch.Tensor] = {}  # block -> view of _word_store
        self._word_store: torch.Tensor | None = None

    def _n_words(self) -> int:
        return -(-self.k // 32)  # int32 words of signs per row

    def _width(self) -> int:
        return 32 * self._n_words()  # unpacked entries per row (k rounded up to whole words)

    def _rows_of(self, b: int) -> int:
        return min(self.block_rows, self.p - b * self.block_rows)

    def words(self, b: int) -> torch.Tensor:
        """(rows, ⌈k/32⌉) int32 random words of Rademacher block b: entry (i, 32w + j) of the block
        is +1/√k where bit j of word (i, w) is set. Kept when ``cache_mb`` allows (class doc)."""
        if b in self._word_cache:
            return self._word_cache[b]
        rows, out = self._rows_of(b), None
        if self._words_cacheable:
            if self._word_store is None:
                self._word_store = torch.empty(self.p, self._n_words(), dtype=torch.int32, device=self.device)
            out = self._word_store[b * self.block_rows : b * self.block_rows + rows]
        gen = torch.Generator(device=self.device).manual_seed(block_seed(self.seed, self.stream, b))
        shape = (rows, self._n_words())
        words = torch.randint(
            -(2**31), 2**31, shape, generator=gen, device=self.device, dtype=torch.int32, out=out
        )  # drawn straight into the store when kept (same numbers as a fresh tensor: tested)
        if out is not None:
            self._word_cache[b] = words
        return words

    def block(self, b: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[b·block_rows, (b+1)·block_rows)`` of P, always the same numbers.

        ``scratch``: a buffer from :meth:`_scratch` to generate into when P is not kept (the
        result is then only valid until the next call with the same buffer).
        """
        if b in self._cache:
            return self._cache[b]
        rows = self._rows_of(b)
        buf = scratch
        if self._cacheable:
            if self._store is None:
                self._store = empty_huge(self.p, self._width(), dtype=self.dtype, device=self.device)
            buf = self._store[b * self.block_rows : b * self.block_rows + rows]
        if self.kind == "gaussian":
            gen = torch.Generator(device=self.device).manual_seed(block_seed(self.seed, self.stream, b))
            out = None if buf is None else buf.view(-1)[: rows * self.k].view(rows, self.k)
            P = torch.randn(rows, self.k, generator=gen, device=self.device, dtype=self.dtype, out=out)
            P.mul_(self.scale)
        else:  # 32 signs per random int32 (bit j of a word = entry j)
            P = _unpack_signs(self.words(b), self.scale, self.dtype, buf)[:, : self.k]
        if self._cacheable:
            self._cache[b] = P
        return P

    def _scratch(self) -> torch.Tensor | None:
        """One block's worth of memory, reused for every regenerated block of a pass (None when P
        is kept): generating into memory already touched, and in cache, is ~2× faster than into
        fresh pages."""
        if self._cacheable:
            return None
        return empty_huge(self.block_rows * self._width(), dtype=self.dtype, device=self.device)

    def _sub_rows(self, m: int) -> int:
        """Rows of P per GEMM in :meth:`project` for m rows of G: about :data:`SUB_BLOCK_BYTES` of
        P, and at least 4·m, since every GEMM also reads and writes the (m, k) output — with many
        rows that traffic, not P, would dominate a thin slice (851 rows: whole blocks, as before)."""
        row_bytes = self._width() * torch.finfo(self.dtype).bits // 8
        return max(1, min(self.block_rows, max(4 * int(m), SUB_BLOCK_BYTES // row_bytes)))

    def project(self, G: torch.Tensor) -> torch.Tensor:
        self._check(G)
        G = G.to(self.dtype)
        out = torch.zeros(G.shape[0], self.k, dtype=self.dtype, device=G.device)
        sub = self._sub_rows(G.shape[0])
        unpack = self.kind == "rademacher" and not self._cacheable
        # slices are under 2·sub rows (below); one buffer for all, huge pages when it is large
        rows_max = min(self.block_rows, 2 * sub)
        buf = (
            empty_huge(rows_max * self._width(), dtype=self.dtype, device=self.device)
            if unpack
            else self._scratch()
        )
        for b in range(self.n_blocks):
            start = b * self.block_rows
            rows = self._rows_of(b)
            words = self.words(b) if unpack else None
            P = None if unpack else self.block(b, buf)
            step = -(-rows // max(1, rows // sub))  # equal slices of about ``sub`` rows, none thin
            for lo in range(0, rows, step):
                hi = min(rows, lo + step)
                if unpack:  # this slice of P, unpacked into the same cache-sized buffer every time
                    Ps = _unpack_signs(words[lo:hi], self.scale, self.dtype, buf)[:, : self.k]
                else:
                    Ps = P[lo:hi]
                out.addmm_(G[:, start + lo : start + hi], Ps.to(G.device))
        return out

    def matrix(self) -> torch.Tensor:
        return torch.cat([self.block(b) for b in range(self.n_blocks)])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of P, a (stop − start, k) copy assembled from its blocks (kept
        ones when P is cached). Why: a caller that projects one parameter block by a structured
        route (TRAK's shared-input ensembles) needs just that block of P."""
        if not 0 <= start <= stop <= self.p:
            raise GGDAError(f"Rows {start}:{stop} are outside the projection's {self.p} rows.")
        parts = []
        for b in range(start // self.block_rows, -(-stop // self.block_rows)):
            lo = b * self.block_rows
            parts.append(self.block(b)[max(start - lo, 0) : stop - lo])
        if not parts:
            return torch.zeros(0, self.k, dtype=self.dtype, device=self.device)
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def allocate_dims(sizes: Sequence[int], k: int) -> list[int]:
    """Split k output dimensions over layers of the given sizes: equal shares, water-filled.

    A layer no larger than its share keeps all its coordinates (it is projected exactly); what it
    leaves unused is shared among the remaining layers. Every layer gets at least one dimension.
    """
    sizes = [int(s) for s in sizes]
    if k < len(sizes):
        raise GGDAError(
            f"A per-layer projection needs proj_dim >= the number of layers ({len(sizes)}); got {k}."
        )
    dims = [0] * len(sizes)
    open_ = list(range(len(sizes)))
    budget = k
    while open_:
        share = budget // len(open_)
        small = [i for i in open_ if sizes[i] <= share]
        if not small:
            extra = budget - share * len(open_)
            for rank, i in enumerate(sorted(open_, key=lambda i: -sizes[i])):
                dims[i] = share + (1 if rank < extra else 0)
            break
        for i in small:
            dims[i] = sizes[i]
            budget -= sizes[i]
            open_.remove(i)
    return dims


class LayerwiseProjector(Projector):
    """Block-diagonal projection: each layer's slice of the gradient has its own P_l.

    Features are the concatenation ``[P_1ᵀ g_1, …, P_Lᵀ g_L]``; their inner product is
    Σ_l ⟨P_lᵀa_l, P_lᵀb_l⟩, still unbiased for aᵀb.
    """

    def __init__(
        self,
        slices: Sequence[slice],
        k: int,
        kind: str = "gaussian",
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        cache_mb: float = DEFAULT_CACHE_MB,
        names: Sequence[str] | None = None,
    ) -> None:
        self.slices = list(slices)
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.slices))]
        sizes = [s.stop - s.start for s in self.slices]
        self.p = sum(sizes)
        self.device, self.dtype = torch.device(device), dtype
        self.dims = allocate_dims(sizes, k)
        self.k = sum(self.dims)
        self.parts: list[Projector] = []
        for layer, (size, dim) in enumerate(zip(sizes, self.dims, strict=True)):
            if dim >= size:
                self.parts.append(IdentityProjector(size, device, dtype))
            else:
                share_mb = cache_mb * size * dim / max(1, self.p * self.k)
                self.parts.append(
                    RandomProjector(size, dim, kind, seed, layer + 1, device, dtype, block_rows, share_mb)
                )

    def project(self, G: torch.Tensor) -> torch.Tensor:
        self._check(G)
        return torch.cat([part.project(G[:, s]) for part, s in zip(self.parts, self.slices, strict=True)], 1)


class KroneckerProjector(Projector):
    """Per-layer Kronecker projection ``P_l = P_out ⊗ P_in`` (LoGra) applied to *materialised* rows.

    Why: the training side of a Kronecker sketch is computed from layer factors
    (:func:`ggda.gradients.fast_project.iter_projected_group_gradients`) without forming gradients;
    the few target gradients (and tests) still arrive as flat (m, p) rows, and must be mapped by the
    very same P. This wraps the factor path's :class:`~ggda.gradients.fast_project.KroneckerProjection`
    so both sides share one matrix.
    """

    def __init__(self, projection) -> None:
        self.projection = projection
        self.p = int(projection.plan.n_params)
        self.k = int(projection.dim)
        self.dtype = projection.P_in[0].dtype
        self.device = projection.P_in[0].device

    def project(self, G: torch.Tensor) -> torch.Tensor:
        from ggda.gradients.fast_project import dense_equivalent

        self._check(G)
        return dense_equivalent(self.projection, G.to(self.dtype))


def module_slices(task) -> tuple[list[str], list[slice]]:
    """Group a task's flat parameter slices by module (``0.weight`` + ``0.bias`` → layer ``0``)."""
    names: list[str] = []
    slices: list[slice] = []
    for name, s in task.layer_slices().items():
        module = name.rsplit(".", 1)[0] if "." in name else name
        if names and names[-1] == module and slices[-1].stop == s.start:
            slices[-1] = slice(slices[-1].start, s.stop)
        else:
            names.append(module)
            slices.append(s)
    return names, slices


def make_projector(
    kind: str,
    p: int,
    k: int | None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    layer_slices: Sequence[slice] | None = None,
    layer_names: Sequence[str] | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    cache_mb: float = DEFAULT_CACHE_MB,
) -> Projector:
    """Build a projector by name; ``layer_slices`` makes a per-layer (block-diagonal) one."""
    if kind not in PROJECTIONS:
        raise GGDAError(f"Unknown projection '{kind}'; choose one of {', '.join(PROJECTIONS)}.")
    if kind == "identity":
        return IdentityProjector(p, device, dtype)
    if k is None or k < 1:
        raise GGDAError(f"A {kind} projection needs proj_dim >= 1; got {k}.")
    if layer_slices is not None:
        total = sum(s.stop - s.start for s in layer_slices)
        if total != p:
            raise GGDAError(f"Layer slices cover {total} coordinates but the gradients have {p}.")
        return LayerwiseProjector(
            layer_slices, k, kind, seed, device, dtype, block_rows, cache_mb, names=layer_names
        )
    return RandomProjector(p, k, kind, seed, 0, device, dtype, block_rows, cache_mb)
