"""Compute the further-training gold standard resumably and assemble eq. 17 / eq. 13.

Jobs are (seed, chunk of units) plus one full-data run per seed, each a keyed result in a
:class:`~ggda.execution.ResultStore` under ``OUT/store``; an executor skips finished keys, so a
killed run restarted with the same settings recomputes only what is missing and ends with the
same numbers. Assembly (NOTES B2, with ``loo[s,e,t,i]`` and ``full[s,e,t]``):

- eq. 17 (``gold_raw``):     a_i = mean_s [ loo[s,·,·,i] − full[s] ]
- eq. 13 (``gold_centred``): ã_i = mean_s [ loo[s,·,·,i] − mean_j loo[s,·,·,j] ], algebraically
  a_i − mean_j a_j; written this way the full run cancels *exactly*, not just up to rounding.

Positive = removing the unit raises the property (a loss): the unit is helpful.
"""

from __future__ import annotations

import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.execution import Executor, Job, ResultStore, SerialExecutor, job_key
from ggda.execution.lock import DirectoryLock
from ggda.gold.config import VECTORISE_LIMIT, GoldConfig
from ggda.gold.problem import GoldProblem, load_problem, make_problem, register_problem, save_problem
from ggda.gold.removal import record_steps, steps_per_epoch
from ggda.gold.units import Units
from ggda.io import CorruptFile, file_digest, read_json, save_json, save_npz, verify_digest
from ggda.models.recipe import TrainingRecipe
from ggda.properties import Property
from ggda.task import AttributionTask

MAX_AUTO_CHUNK = 64
CHECKSUMS = "checksums"  # gold.json entry holding gold.npz's SHA-256


def resolve_path_and_chunk(config: GoldConfig, n_params: int, n_units: int) -> tuple[str, int]:
    """Engine and units per job: vectorised while ``n_params × chunk ≤ VECTORISE_LIMIT``."""
    fits = max(1, VECTORISE_LIMIT // max(n_params, 1))
    path = config.path
    if path == "auto":
        path = "vectorised" if fits >= min(n_units, 2) else "sequential"
    if config.chunk:
        chunk = config.chunk
    elif path == "vectorised":
        chunk = min(n_units, MAX_AUTO_CHUNK, fits)
    else:
        chunk = min(n_units, 8)
    return path, max(1, min(chunk, n_units))


def gold_job(problem_file: str, seed: int, start: int, stop: int, full: bool) -> dict[str, np.ndarray]:
    """One stored job: f after every recorded step for the full run or units ``start:stop``."""
    problem = load_problem(problem_file)
    if full:
        runs, labels = [None], [problem.unit_label(None)]
    else:
        runs = list(problem.runs(start, stop))
        labels = [problem.unit_label(k) for k in range(start, stop)]
    if problem.path == "recipe":
        from ggda.gold.recipe_path import train_with_recipe

        values = train_with_recipe(problem, seed, runs, labels)
    elif problem.path == "vectorised":
        from ggda.gold.vectorised import train_vectorised

        values = train_vectorised(problem, seed, runs, labels)
    else:
        from ggda.gold.sequential import train_sequential

        values = train_sequential(problem, seed, runs, labels)
    return {"values": values}


def plan_jobs(problem: GoldProblem, problem_file: str) -> tuple[list[Job], list[Job]]:
    """(full-run jobs, unit-chunk jobs) for every seed."""
    fp = {"fingerprint": problem.fingerprint}
    fulls, chunks = [], []
    U = len(problem.units)
    for s in problem.config.seed_values():
        fulls.append(
            Job(
                job_key(fp, seed=s, units="full"),
                gold_job,
                {"problem_file": problem_file, "seed": s, "start": 0, "stop": 0, "full": True},
                {"seed": s, "runs": 1},
            )
        )
        for a in range(0, U, problem.chunk):
            b = min(a + problem.chunk, U)
            chunks.append(
                Job(
                    job_key(fp, seed=s, units=f"{a}-{b}"),
                    gold_job,
                    {"problem_file": problem_file, "seed": s, "start": a, "stop": b, "full": False},
                    {"seed": s, "runs": b - a},
                )
            )
    return fulls, chunks


@dataclass
class GoldResult:
    """The gold standard and everything needed to re-analyse it.

    Attributes:
        gold: (E', T, U) eq. 13 if ``config.center`` else eq. 17; E' = recorded steps.
        gold_raw / gold_centred: eq. 17 and eq. 13 explicitly.
        loo: (S, E', T, U) property values after left-out runs; ``full``: (S, E', T).
        steps: (E',) global optimiser steps at each record; ``epochs``: (E',) the same in epochs.
        unit_ids: (U,) left-out point positions or group ids; ``unit_sizes``: (U,).
        meta: settings, timings and provenance.
    """

    gold: np.ndarray
    gold_raw: np.ndarray
    gold_centred: np.ndarray
    loo: np.ndarray
    full: np.ndarray
    steps: np.ndarray
    epochs: np.ndarray
    unit_ids: np.ndarray
    unit_sizes: np.ndarray
    meta: dict = field(default_factory=dict)

    @staticmethod
    def assemble(
        loo: np.ndarray, full: np.ndarray, center: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gold, eq. 17, eq. 13) from per-seed values (see the module docstring)."""
        raw = (loo - full[..., None]).mean(axis=0)
        centred = (loo - loo.mean(axis=-1, keepdims=True)).mean(axis=0)
        return (centred if center else raw), raw, centred

    def seed_diffs(self, center: bool | None = None) -> np.ndarray:
        """(S, E', T, U) per-seed differences (eq. 17 or eq. 13 terms) for seed-window studies."""
        center = self.meta.get("config", {}).get("center", True) if center is None else center
        if center:
            return self.loo - self.loo.mean(axis=-1, keepdims=True)
        return self.loo - self.full[..., None]

    ARRAYS = (
        "gold", "gold_raw", "gold_centred", "loo", "full", "steps", "epochs", "unit_ids", "unit_sizes",
    )  # fmt: skip

    def save(self, out: str | Path) -> Path:
        """Write ``gold.npz`` and then ``gold.json`` (the metadata and gold.npz's SHA-256), both atomically."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        npz = save_npz(out / "gold.npz", **{k: getattr(self, k) for k in self.ARRAYS})
        record = {**self.meta, CHECKSUMS: {"gold.npz": file_digest(npz)}}
        save_json(out / "gold.json", record, default=str)
        return npz

    @classmethod
    def load(cls, out: str | Path) -> GoldResult:
        """Read a saved gold standard, verified against the checksum in ``gold.json``."""
        out = Path(out)
        npz, jfile = out / "gold.npz", out / "gold.json"
        if not npz.exists():
            raise GGDAError(
                f"{out} holds no gold standard (gold.npz); compute one with `ggda gold --out {out}`."
            )
        fix = f"rerun `ggda gold --out {out}` with the same options to rebuild it from its stored results."
        meta = read_json(jfile, fix) if jfile.exists() else {}
        if not isinstance(meta, dict):
            raise CorruptFile(f"{jfile} does not hold a JSON object; {fix}")
        sums = meta.pop(CHECKSUMS, None)
        if isinstance(sums, dict):
            verify_digest(npz, sums.get("gold.npz"), fix)
        try:
            with np.load(npz, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise CorruptFile(f"{npz} cannot be read (truncated or overwritten); {fix}") from exc
        missing = [k for k in cls.ARRAYS if k not in arrays]
        if missing:
            raise CorruptFile(f"{npz} lacks {', '.join(missing)}; {fix}")
        return cls(**{k: arrays[k] for k in cls.ARRAYS}, meta=meta)


def compute_gold(
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray | None,
    prop: Property,
    units: Units,
    config: GoldConfig,
    out: str | Path | None = None,
    executor: Executor | None = None,
    progress: bool = False,
    meta: dict | None = None,
    recipe: TrainingRecipe | None = None,
) -> GoldResult:
    """Further-train θ^f (the task's model) with and without each unit; return the gold standard.

    Args:
        task: the final model θ^f and its per-example training loss (all its attributed
            parameters are further-trained; the others stay fixed).
        X, y: the training set D the units refer to (positions): arrays, lazy inputs, or a ggda
            ``Dataset`` / any data source as ``X`` with ``y=None``.
        prop: the property f (e.g. ``ExampleLoss(test targets)``), recorded after every epoch.
        units: the left-out set I (:func:`ggda.gold.select_units`).
        config: further-training and removal settings.
        out: directory for the result store (resumable) and ``gold.npz``; ``None``: a temporary
            store (nothing kept, nothing resumed). Claimed for the length of the call
            (:class:`~ggda.execution.lock.DirectoryLock`): a concurrent call on the same ``out``
            refuses with an error naming this one.
        executor: how jobs run (default serial, in process).
        meta: extra provenance stored in ``gold.json`` (e.g. the run directory, target ids).
        recipe: further-train with this :class:`~ggda.models.recipe.TrainingRecipe` (a user's
            own training loop, from a copy of θ^f, for ``config.epochs`` epochs, on the kept
            examples; needs ``removal="sampler"``) instead of ggda's functional engines. Any
            module works either way; the engines hold batch-norm statistics and dropout in
            eval mode, a recipe trains as the user's loop does.
    """
    data = None
    if y is None:
        from ggda.data.sources import as_dataset

        data = as_dataset(X)
        X, y = data.X, data.y
    if len(X) != len(y):
        raise GGDAError(f"X has {len(X)} rows but y has {len(y)}.")
    tmpdir = None
    if out is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="ggda-gold-")
        out = tmpdir.name
    out = Path(out)
    # One command per OUT: a second one refuses (naming the first) instead of redoing every job.
    lock = DirectoryLock(out).acquire() if tmpdir is None else None
    executor = executor or SerialExecutor()
    try:
        if recipe is not None:
            if config.removal != "sampler" or config.record_every:
                raise GGDAError(
                    "A training recipe trains on the kept examples and records once per epoch; use "
                    "removal='sampler' and record_every=0."
                )
            if data is None:
                kind = "regression" if task.loss_kind == "squared-error" else "classification"
                data = Dataset(X, y, kind=kind)
            path, chunk = "recipe", config.chunk or 1
        else:
            path, chunk = resolve_path_and_chunk(config, task.n_params, len(units))
        problem = make_problem(task, X, y, prop, units, config, path, chunk, recipe=recipe, data=data)
        problem_file = str(out / "problem.pt")
        if isinstance(executor, SerialExecutor) or getattr(executor, "workers", 0) == 1:
            register_problem(problem_file, problem)
            try:
                save_problem(problem, Path(problem_file))
            except GGDAError:  # in-process jobs use the registered problem; never a stale file
                Path(problem_file).unlink(missing_ok=True)
        else:
            save_problem(problem, Path(problem_file))
            register_problem(problem_file, problem)
        store = ResultStore(out / "store")
        fulls, chunks = plan_jobs(problem, problem_file)
        jobs = fulls + chunks
        prefix = job_key({"fingerprint": problem.fingerprint})
        stale = [k for k in store.keys() if not k.startswith(prefix)]
        t0 = time.perf_counter()
        ran = executor.run(jobs, store, progress=progress)
        wall = time.perf_counter() - t0
        result = _assemble(problem, store, fulls, chunks)
        seconds = [store.get(j.key)[1].get("seconds", float("nan")) for j in jobs]
        runs = [j.meta["runs"] for j in jobs]
        nb = steps_per_epoch(problem.n, config.batch_size)
        result.meta = {
            **(meta or {}),
            "config": config.to_dict(),
            "path": path,
            "chunk": chunk,
            "fingerprint": problem.fingerprint,
            "units": units.to_dict(),
            "property": type(prop).__name__,
            "n_targets": int(result.gold.shape[1]),
            "n_train": problem.n,
            "n_params": task.n_params,
            "steps_per_epoch": nb,
            "epsilon": config.resolved_epsilon(problem.n),
            "jobs": len(jobs),
            "jobs_run_now": ran,
            "stale_results_in_store": len(stale),
            "wall_seconds_this_call": wall,
            "compute_seconds": float(np.nansum(seconds)),
            "seconds_per_run": float(np.nansum(seconds) / max(sum(runs), 1)),
            "device": str(task.device),
        }
        if tmpdir is None:
            result.save(out)
        return result
    finally:
        if lock is not None:
            lock.release()
        if tmpdir is not None:
            tmpdir.cleanup()


def _assemble(problem: GoldProblem, store: ResultStore, fulls: list[Job], chunks: list[Job]) -> GoldResult:
    config = problem.config
    seeds = config.seed_values()
    full = np.stack([store.get(j.key)[0]["values"][..., 0] for j in fulls])  # (S, E', T)
    by_seed: dict[int, list[np.ndarray]] = {s: [] for s in seeds}
    for j in chunks:  # chunks are in unit order within each seed
        by_seed[j.kwargs["seed"]].append(store.get(j.key)[0]["values"])
    loo = np.stack([np.concatenate(by_seed[s], axis=-1) for s in seeds])  # (S, E', T, U)
    gold, raw, centred = GoldResult.assemble(loo, full, config.center)
    steps = record_steps(problem.n, config)
    nb = steps_per_epoch(problem.n, config.batch_size)
    return GoldResult(
        gold=gold,
        gold_raw=raw,
        gold_centred=centred,
        loo=loo,
        full=full,
        steps=steps,
        epochs=steps / nb,
        unit_ids=problem.units.ids.copy(),
        unit_sizes=np.array([len(m) for m in problem.units.members]),
    )
