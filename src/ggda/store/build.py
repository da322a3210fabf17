"""Writing group gradients (or their random projections) into a :class:`FeatureStore`, resumably.

Chunk c of the store holds groups ``[c·R, (c+1)·R)``. Its rows are computed from *only those
groups' members*: :func:`~ggda.gradients.iter_group_gradients` streams their gradients (bounded by
``memory_mb``), each streamed block is projected at once (so a chunk never holds R × p raw
gradients when a projection is used) and the finished (R × d) chunk is written atomically.

Because a chunk's content depends on nothing but its own groups, a build interrupted after any
chunk and resumed later writes **byte-identical** files to an uninterrupted build, and chunks can be
computed in any order, in parallel, by any :class:`~ggda.execution.Executor` (one job per chunk;
with ``ray`` the store directory must be on a filesystem shared by the nodes).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from ggda.data.digest import content_digest
from ggda.data.grouping import Grouping
from ggda.errors import GGDAError
from ggda.execution.executor import Executor, Job
from ggda.execution.store import ResultStore
from ggda.gradients.group import ExampleFn, iter_group_gradients
from ggda.gradients.projection import PROJECTIONS, Projector, make_projector, module_slices
from ggda.store.features import FeatureStore
from ggda.task import AttributionTask

DEFAULT_CHUNK_MB = 64.0


def task_fingerprint(task: AttributionTask) -> str:
    """Hash of the attributed parameters' values (a different model gives different rows)."""
    return content_digest(*(p.detach().cpu().numpy() for p in task.params().values()))


def projector_for(
    task: AttributionTask,
    projection: str,
    proj_dim: int | None,
    seed: int,
    layerwise: bool,
    device: str | torch.device | None = None,
) -> Projector:
    """The store's projector. P is generated on ``device`` (default the task's: the GPU path when the
    task is on CUDA) and applied wherever the gradients are; CPU and CUDA generators give different
    (equally valid) matrices, so a store records the device type its P was generated on."""
    slices = names = None
    if layerwise and projection != "identity":
        names, slices = module_slices(task)
    device = task.device if device is None else torch.device(device)
    return make_projector(
        projection, task.n_params, proj_dim, seed, device, task.dtype, layer_slices=slices, layer_names=names
    )


def _chunk_groups(grouping: Grouping) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): members of groups [a, b) are ``order[starts[a]:starts[b]]`` (no per-group lists)."""
    order = np.argsort(grouping.labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(grouping.sizes)])
    return order, starts


def compute_chunk(
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    labels: np.ndarray,
    n_groups: int,
    projector: Projector,
    fn: ExampleFn | None = None,
    max_batch: int = 2048,
    memory_mb: float = 256.0,
) -> np.ndarray:
    """(n_groups × d) projected group gradients for the points ``X, y`` with local group ids ``labels``."""
    out = torch.zeros(n_groups, projector.k, dtype=projector.dtype, device=task.device)
    sub = Grouping(labels)
    if sub.n_groups != n_groups:
        raise GGDAError(f"A chunk's members cover {sub.n_groups} groups, expected {n_groups}.")
    for gids, G in iter_group_gradients(task, X, y, sub, fn=fn, max_batch=max_batch, memory_mb=memory_mb):
        out[torch.as_tensor(gids, device=out.device)] = projector.project(G)
    return out.cpu().numpy()


def _chunk_job(
    store_path: str,
    chunk: int,
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    labels: np.ndarray,
    n_groups: int,
    projection: dict,
    fn: ExampleFn | None,
    max_batch: int,
    memory_mb: float,
) -> dict:
    """Executor job: compute and write one chunk (idempotent: an existing chunk is kept)."""
    store = FeatureStore.open(store_path)
    t0 = time.perf_counter()
    if not store.has_chunk(chunk):
        projector = projector_for(task, **projection)
        store.write_chunk(
            chunk, compute_chunk(task, X, y, labels, n_groups, projector, fn, max_batch, memory_mb)
        )
    return {"chunk": np.array([chunk]), "seconds": np.array([time.perf_counter() - t0])}


def build_gradient_store(
    path,
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    grouping: Grouping | None = None,
    fn: ExampleFn | None = None,
    projection: str = "identity",
    proj_dim: int | None = None,
    proj_seed: int = 0,
    layerwise: bool = False,
    chunk_rows: int | None = None,
    dtype: str = "float32",
    max_batch: int = 2048,
    memory_mb: float = 256.0,
    executor: Executor | None = None,
    config: dict | None = None,
    overwrite: bool = False,
    progress: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> FeatureStore:
    """Write the (K × d) group-gradient features of ``X, y`` under ``path``; resumes a partial build.

    Args:
        grouping: groups (default singletons: per-example gradients).
        fn: per-example function whose group sums are differentiated (default: training loss).
        projection: ``identity`` (raw gradients, d = p), ``gaussian`` or ``rademacher`` (d = proj_dim).
        layerwise: block-diagonal projection, each layer its share of ``proj_dim``.
        chunk_rows: rows per chunk (default: ~64 MB chunks, at most 65,536 rows).
        memory_mb: budget for the streamed raw (rows × p) gradient blocks.
        executor: compute chunks as jobs (``local`` / ``ray``); default in this process, in order.
        config: extra entries that define the rows (e.g. the run directory), hashed into the manifest.
        on_chunk: called with each chunk index after it is written (progress hooks, tests).
    """
    grouping = grouping or Grouping.singleton(len(X))
    grouping.check_matches(len(X))
    if projection not in PROJECTIONS:
        raise GGDAError(f"Unknown projection '{projection}'; choose one of {', '.join(PROJECTIONS)}.")
    proj = {"projection": projection, "proj_dim": proj_dim, "seed": proj_seed, "layerwise": layerwise}
    projector = projector_for(task, **proj)
    dim = projector.k
    K = grouping.n_groups
    if chunk_rows is None:
        chunk_rows = int(max(1, min(65536, DEFAULT_CHUNK_MB * 2**20 // (dim * np.dtype(dtype).itemsize))))
    fn_name = getattr(fn, "__qualname__", repr(fn)) if fn is not None else "training-loss"
    full_config = {
        "model": task_fingerprint(task),
        "params": task.n_params,
        "layers": task.layers,
        "device_type": task.device.type,  # random projections are generated on this device type
        "data": content_digest(X, np.asarray(y)),
        "grouping": content_digest(grouping.labels),
        "fn": fn_name,
        "projection": {**proj, "kind": type(projector).__name__},
        **(config or {}),
    }
    store = FeatureStore.create(
        path, K, dim, chunk_rows, dtype, full_config, n_points=len(X), meta={"group_sizes": "sizes.npy"},
        overwrite=overwrite,
    )  # fmt: skip
    if store.sizes() is None:
        store.write_sizes(grouping.sizes)
    order, starts = _chunk_groups(grouping)
    todo = store.missing_chunks()
    t0 = time.perf_counter()

    def members(c: int) -> tuple[np.ndarray, np.ndarray, int]:
        rows = store.rows(c)
        idx = order[starts[rows.start] : starts[rows.stop]]
        return idx, grouping.labels[idx] - rows.start, rows.stop - rows.start

    if executor is None:
        from ggda.progress import progress as progress_bar

        for c in progress_bar(todo, desc="feature chunks", disable=not progress, leave=False):
            idx, labels, k = members(c)
            block = compute_chunk(task, X[idx], y[idx], labels, k, projector, fn, max_batch, memory_mb)
            store.write_chunk(c, block)
            if on_chunk is not None:
                on_chunk(c)
    else:
        jobs = []
        results = ResultStore(store.path / "jobs")
        for c in todo:
            idx, labels, k = members(c)
            kwargs = dict(
                store_path=str(store.path.resolve()), chunk=c, task=task, X=X[idx], y=y[idx], labels=labels,
                n_groups=k, projection=proj, fn=fn, max_batch=max_batch, memory_mb=memory_mb,
            )  # fmt: skip
            jobs.append(Job(f"{store.manifest['fingerprint'][:10]}_chunk={c}", _chunk_job, kwargs))
            results.delete(jobs[-1].key)  # the chunk is missing (or was corrupt): its job must run again
        executor.run(jobs, results, progress=progress)
    store.manifest["meta"]["build_seconds"] = store.manifest["meta"].get("build_seconds", 0.0) + (
        time.perf_counter() - t0
    )
    return store.finalize()
