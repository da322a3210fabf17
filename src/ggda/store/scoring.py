"""Block-wise scoring of targets against a :class:`FeatureStore`, with streamed top-k.

score(t, j) = q_tᵀ M φ_j, where φ_j is row j of the store (group j's — possibly projected —
gradient), q_t the target's feature in the same space, and M

* ``kernel="none"``: the identity — **Grad-Dot** (with ``normalize=True``, Grad-Cos) in the
  store's space; with an identity projection these are exactly ``ggda.methods.GradDot``'s scores;
* ``kernel="fisher"``: (F + λI)⁻¹ / N with F = ΦᵀΦ / N the empirical Fisher of the stored
  features (N = training points; for singletons this is the library's mean-over-training-set
  curvature), λ = ``damping`` or ``damping_scale`` × λ₀, λ₀ = tr(F)/d (the mean squared
  per-example feature entry, Grosse et al.; an over-estimate for groups, whose rows are sums).
  This is the projected Gauss–Newton/Fisher influence estimate of f(θ_{−S}) − f(θ) used by
  TRAK-style and LoGra-style methods on one model, on the same scale as ``ggda.methods`` IFs.

Positive = helpful (same convention as every ggda method). The loop runs over training chunks ×
target blocks; at any time it holds one (chunk_rows × d) training block, one (target_block ×
chunk_rows) score block and the running top-k, never the (T × K) score matrix — unless it is
asked for (``full="memory"`` or a ``.npy`` path, written block by block as a memmap).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.gradients.per_example import iter_per_example_gradients
from ggda.properties import ExampleProperty, Property
from ggda.store.build import projector_for, task_fingerprint
from ggda.store.features import FeatureStore
from ggda.task import AttributionTask

KERNELS = ("none", "fisher")


@dataclass
class StoreScores:
    """Result of :func:`score_store`. Indices are group ids (rows of the store)."""

    top_indices: np.ndarray  # (T, top_k) most helpful first
    top_scores: np.ndarray
    bottom_indices: np.ndarray  # (T, bottom_k) most harmful first
    bottom_scores: np.ndarray
    scores: np.ndarray | None = None  # (T, K) only when asked for (in memory or a memmap)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.float64 if dtype == np.float64 else torch.float32  # float16 stores score in fp32


def _load(block: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.array(block)).to(device=device, dtype=dtype)


def target_features(
    store: FeatureStore, task: AttributionTask, prop: Property, block: int = 512
) -> torch.Tensor:
    """(T, d) target features in the store's space: the property's gradients, projected like the rows.

    Refuses a task whose model differs from the one the store was built from (rows and targets would
    live in different spaces). Per-example properties are streamed in ``block``-sized pieces.
    """
    cfg = store.config
    if cfg.get("model") not in (None, task_fingerprint(task)) or cfg.get("params") not in (
        None,
        task.n_params,
    ):
        raise GGDAError(
            f"The store at {store.path} was built from another model (or other layers); score it with the "
            "same run and layers, or rebuild it."
        )
    proj = cfg.get("projection", {"projection": "identity"})
    built_on = cfg.get("device_type", task.device.type)
    if proj["projection"] != "identity" and built_on == "cuda" and not torch.cuda.is_available():
        raise GGDAError(
            f"The store at {store.path} was projected with a CUDA-generated matrix; score it on a CUDA machine "
            "(--device cuda) or rebuild it on CPU."
        )
    gen_device = task.device if built_on == task.device.type else torch.device(built_on)
    projector = projector_for(
        task,
        proj["projection"],
        proj.get("proj_dim"),
        proj.get("seed", 0),
        proj.get("layerwise", False),
        gen_device,
    )
    if projector.k != store.dim:
        raise GGDAError(
            f"Projected targets have {projector.k} dims but the store has {store.dim}; rebuild the store."
        )
    if isinstance(prop, ExampleProperty):
        parts = [
            projector.project(G)
            for _, G in iter_per_example_gradients(
                task, prop.X, prop.y, fn=prop.example_fn(task), chunk_size=block
            )
        ]
        return torch.cat(parts)
    return projector.project(prop.gradients(task))


def check_store_grouping(
    store: FeatureStore, grouping: Grouping, train_ids: np.ndarray | None = None
) -> None:
    """Refuse ``grouping`` unless it is the one the store's rows were built over (same group of
    every training point), so the data ids written for a row's members are that row's members."""
    from ggda.data.digest import content_digest

    built = store.config.get("grouping")
    if grouping.n_groups != store.n_rows or (built is not None and built != content_digest(grouping.labels)):
        raise GGDAError(
            f"The store at {store.path} was built over another grouping than "
            f"{store.config.get('grouping_spec', 'the one given')} gives now ({grouping.n_groups} groups for "
            f"{store.n_rows} rows); score it with the run it was built from, or rebuild it."
        )
    if train_ids is not None and store.n_points not in (None, len(train_ids)):
        raise GGDAError(
            f"The store at {store.path} holds {store.n_points} training points, the run has {len(train_ids)}; "
            "score it with the run it was built from."
        )


def store_gram(store: FeatureStore, device: str | torch.device = "cpu") -> torch.Tensor:
    """ΦᵀΦ (d × d, float64) accumulated chunk by chunk."""
    dev = torch.device(device)
    gram = torch.zeros(store.dim, store.dim, dtype=torch.float64, device=dev)
    for _, block in store.iter_chunks():
        F = _load(block, dev, torch.float64)
        gram += F.T @ F
    return gram


def fisher_preconditioner(
    store: FeatureStore,
    damping: float | None = None,
    damping_scale: float = 0.1,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, dict]:
    """M = (ΦᵀΦ/N + λI)⁻¹ / N as a dense (d × d) float64 matrix, and the λ used."""
    gram = store_gram(store, device)
    N, d = store.n_points, store.dim
    fisher = gram / N
    lam0 = float(torch.trace(fisher)) / d
    lam = float(damping) if damping is not None else damping_scale * lam0
    if lam <= 0 and damping is None:
        raise GGDAError(
            "All stored features are zero; the Fisher kernel is undefined (check the model/data)."
        )
    eye = torch.eye(d, dtype=torch.float64, device=gram.device)
    try:
        chol = torch.linalg.cholesky(fisher + lam * eye)
    except RuntimeError as exc:
        raise GGDAError(f"F + λI is not positive definite (λ={lam:.3g}); pass a larger damping.") from exc
    M = torch.cholesky_inverse(chol) / N
    return M, {"damping": lam, "lambda0": lam0, "n_points": N}


class _TopK:
    """Running top-k (largest or smallest) over column blocks, per target row."""

    def __init__(self, T: int, k: int, largest: bool, device: torch.device, dtype: torch.dtype) -> None:
        self.k, self.largest = k, largest
        fill = float("-inf") if largest else float("inf")
        self.values = torch.full((T, k), fill, dtype=dtype, device=device)
        self.indices = torch.full((T, k), -1, dtype=torch.int64, device=device)

    def update(self, rows: slice, scores: torch.Tensor, first_col: int) -> None:
        """Merge a (rows × B) score block: top-k of the block first, then of 2k candidates (no B-wide copies)."""
        if self.k == 0:
            return
        k_block = min(self.k, scores.shape[1])
        block_vals, block_pos = torch.topk(scores, k_block, dim=1, largest=self.largest, sorted=False)
        vals = torch.cat([self.values[rows], block_vals], dim=1)
        idx = torch.cat([self.indices[rows], block_pos + first_col], dim=1)
        best, pos = torch.topk(vals, self.k, dim=1, largest=self.largest, sorted=True)
        self.values[rows] = best
        self.indices[rows] = idx.gather(1, pos)


def _query_blocks(
    queries: torch.Tensor | np.ndarray | FeatureStore, block: int, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[slice, torch.Tensor]]:
    if isinstance(queries, FeatureStore):
        for rows, arr in queries.iter_chunks():
            for s in range(0, rows.stop - rows.start, block):
                yield (
                    slice(rows.start + s, min(rows.start + s + block, rows.stop)),
                    _load(arr[s : s + block], device, dtype),
                )
        return
    Q = torch.as_tensor(queries).to(device=device, dtype=dtype)
    for s in range(0, len(Q), block):
        yield slice(s, min(s + block, len(Q))), Q[s : s + block]


def score_store(
    store: FeatureStore,
    queries: torch.Tensor | np.ndarray | FeatureStore,
    top_k: int = 10,
    bottom_k: int = 0,
    kernel: str = "none",
    damping: float | None = None,
    damping_scale: float = 0.1,
    normalize: bool = False,
    aggregate: str = "sum",
    full: str | Path | None = None,
    target_block: int = 1024,
    score_mb: float = 64.0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> StoreScores:
    """Score every target against every stored row, block-wise; see the module docstring.

    Args:
        queries: (T, d) target features (:func:`target_features`) or a store of them.
        top_k / bottom_k: most helpful / most harmful groups kept per target (streamed).
        kernel: ``none`` (Grad-Dot) or ``fisher`` (projected empirical-Fisher influence).
        normalize: cosine similarity instead of the inner product (``kernel="none"`` only).
        aggregate: ``sum`` (library default) or ``mean`` (score / group size).
        full: also return the (T × K) matrix: ``"memory"`` or a ``.npy`` path (written as a memmap).
        target_block: targets scored at once.
        score_mb: budget of one score block (target_block × columns); a training chunk is split into
            column blocks to stay under it.
        device: where the block products run (``cuda`` for large stores when available).
    """
    if kernel not in KERNELS:
        raise GGDAError(f"Unknown kernel '{kernel}'; choose one of {', '.join(KERNELS)}.")
    if normalize and kernel != "none":
        raise GGDAError("normalize (cosine) applies to kernel='none' only.")
    if aggregate not in ("sum", "mean"):
        raise GGDAError(f"Unknown aggregate '{aggregate}'; choose sum or mean.")
    if not store.complete:
        raise GGDAError(f"The store at {store.path} is incomplete; resume its build before scoring.")
    dev = torch.device(device)
    dtype = _torch_dtype(store.dtype)
    T = queries.n_rows if isinstance(queries, FeatureStore) else len(queries)
    q_dim = queries.dim if isinstance(queries, FeatureStore) else queries.shape[1]
    if q_dim != store.dim:
        raise GGDAError(
            f"Targets have {q_dim} dims but the store rows have {store.dim}; use target_features()."
        )
    t0 = time.perf_counter()
    info: dict = {"kernel": kernel, "normalize": normalize, "aggregate": aggregate}
    M = None
    if kernel == "fisher":
        M, extra = fisher_preconditioner(store, damping, damping_scale, dev)
        info.update(extra)
    sizes = None
    if aggregate == "mean":
        stored = store.sizes()
        sizes = torch.as_tensor(stored if stored is not None else np.ones(store.n_rows)).to(dev, dtype)
    top = _TopK(T, min(top_k, store.n_rows), True, dev, dtype)
    bottom = _TopK(T, min(bottom_k, store.n_rows), False, dev, dtype)
    tmp = None
    if full is None:
        out = None
    elif str(full) == "memory":
        out = np.empty((T, store.n_rows), dtype=np.float32)
    else:
        out, tmp = _open_scores(Path(full), (T, store.n_rows))
    try:
        _score_all(
            store,
            queries,
            M,
            normalize,
            sizes,
            top,
            bottom,
            out,
            target_block,
            score_mb,
            dev,
            dtype,
            progress,
        )
        if tmp is not None:
            try:
                out.flush()
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, Path(full))  # the finished matrix appears under its name at once
            except OSError as exc:
                raise GGDAError(
                    f"Could not write {full} ({exc.strerror}); free disk space or choose another --out."
                ) from exc
            tmp = None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return StoreScores(
        top.indices.cpu().numpy(),
        top.values.cpu().numpy(),
        bottom.indices.cpu().numpy(),
        bottom.values.cpu().numpy(),
        out,
        time.perf_counter() - t0,
        info,
    )


def _open_scores(path: Path, shape: tuple[int, int]) -> tuple[np.memmap, Path]:
    """A (T × K) float32 ``.npy`` memmap at a temporary name beside ``path``, its space reserved
    up front (a full disk fails here, not as a bus error while scores are written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        if hasattr(os, "posix_fallocate"):
            with open(tmp, "rb+") as fh:
                size = os.fstat(fh.fileno()).st_size
                try:
                    os.posix_fallocate(fh.fileno(), 0, size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise GGDAError(
            f"Could not write {path} ({exc.strerror}); free disk space or choose another --out."
        ) from exc
    return out, tmp


def _score_all(
    store, queries, M, normalize, sizes, top, bottom, out, target_block, score_mb, dev, dtype, progress
) -> None:
    """The chunk × target-block loop (fills ``top``, ``bottom`` and ``out``)."""

    def prepared() -> Iterator[tuple[slice, torch.Tensor]]:
        for qrows, Q in _query_blocks(queries, target_block, dev, dtype):
            if M is not None:
                Q = (Q.to(torch.float64) @ M).to(dtype)
            if normalize:
                Q = Q / Q.norm(dim=1, keepdim=True).clamp_min(1e-30)
            yield qrows, Q

    # Targets held in memory are prepared once; a target *store* is streamed for every chunk.
    cached = None if isinstance(queries, FeatureStore) else list(prepared())
    from ggda.progress import progress as progress_bar

    chunks = progress_bar(
        store.iter_chunks(), total=store.n_chunks, desc="score", disable=not progress, leave=False
    )
    for rows, block in chunks:
        F = _load(block, dev, dtype)
        if normalize:
            F = F / F.norm(dim=1, keepdim=True).clamp_min(1e-30)
        for qrows, Q in cached if cached is not None else prepared():
            cols = max(1, int(score_mb * 2**20 // (Q.shape[0] * Q.element_size())))
            for c0 in range(0, F.shape[0], cols):
                sub = slice(rows.start + c0, min(rows.start + c0 + cols, rows.stop))
                _score_block(Q, F[c0 : c0 + cols], qrows, sub, sizes, top, bottom, out)


def _score_block(Q, F, qrows, rows, sizes, top, bottom, out) -> None:
    S = Q @ F.T
    if sizes is not None:
        S = S / sizes[rows][None, :]
    top.update(qrows, S, rows.start)
    bottom.update(qrows, S, rows.start)
    if out is not None:
        out[qrows, rows] = S.cpu().numpy()


def self_scores(
    store: FeatureStore, kernel: str = "none", damping: float | None = None, damping_scale: float = 0.1,
    device: str | torch.device = "cpu",
) -> np.ndarray:  # fmt: skip
    """(K,) self-influence φ_jᵀ M φ_j per row, chunk by chunk (mislabelled points score high)."""
    if kernel not in KERNELS:
        raise GGDAError(f"Unknown kernel '{kernel}'; choose one of {', '.join(KERNELS)}.")
    dev = torch.device(device)
    M = fisher_preconditioner(store, damping, damping_scale, dev)[0] if kernel == "fisher" else None
    out = np.empty(store.n_rows, dtype=np.float64)
    for rows, block in store.iter_chunks():
        F = _load(block, dev, torch.float64)
        out[rows] = ((F @ M) * F).sum(1).cpu().numpy() if M is not None else (F * F).sum(1).cpu().numpy()
    return out
