"""One gold-standard problem: θ^f, the training data, the property, the units and the settings.

The problem is what every job needs. It is written once to ``OUT/problem.pt`` so process and Ray
workers load it by path (jobs stay small), and cached per process. Its *fingerprint* hashes
everything that changes the numbers (parameters, data, targets, units, settings, engine path and
chunking) and prefixes every result key, so a restarted run reuses exactly the results that a
fresh run would recompute.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ggda.data.batches import ExampleInputs, InputView
from ggda.data.dataset import Dataset
from ggda.errors import GGDAError
from ggda.gold.config import GoldConfig
from ggda.gold.units import Units
from ggda.io import atomic_open
from ggda.models.recipe import TrainingRecipe
from ggda.properties import Property
from ggda.task import AttributionTask

#: Bump when an engine change alters numbers, so resumed runs never mix old and new results.
ENGINE_VERSION = 3  # 3: hand-written stacked-MLP kernel (rounding-level differences)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_CACHE: dict[str, GoldProblem] = {}


@dataclass
class GoldProblem:
    """Everything a further-training job reads. ``path`` is the engine actually used."""

    task: AttributionTask
    X: torch.Tensor | InputView  # the whole-set tensor, or a batch-fetching view of lazy inputs
    y: torch.Tensor
    prop: Property
    units: Units
    config: GoldConfig
    path: str
    chunk: int
    fingerprint: str = ""
    recipe: TrainingRecipe | None = None  # path "recipe": the user's training function further-trains
    data: Dataset | None = None  # the training set as a Dataset (what a recipe trains on)

    @property
    def n(self) -> int:
        return len(self.y)

    def unit_label(self, k: int | None) -> str:
        if k is None:
            return "full"
        return f"{'point' if self.units.kind == 'points' else 'group'} {int(self.units.ids[k])}"

    def runs(self, start: int, stop: int) -> list[np.ndarray]:
        return self.units.members[start:stop]


def build_task(task: AttributionTask, dtype: str) -> AttributionTask:
    """The task in the requested precision (a copy when the dtype changes)."""
    want = _DTYPES[dtype]
    if task.dtype == want:
        return task
    import copy

    model = copy.deepcopy(task.model).to(want)
    clone = copy.copy(task)
    clone.model, clone.dtype = model.to(task.device).eval(), want
    return clone


def _hash_arrays(h, *arrays) -> None:
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())


def property_fingerprint(prop: Property) -> list:
    inner = getattr(prop, "inner", prop)
    h = hashlib.sha1(type(prop).__name__.encode())
    if hasattr(inner, "X") and hasattr(inner, "y"):
        _hash_arrays(h, inner.X, inner.y)
    else:
        h.update(repr(getattr(prop, "name", "")).encode())
    return [type(prop).__name__, h.hexdigest()[:16]]


def fingerprint(problem: GoldProblem) -> str:
    h = hashlib.sha1()
    state = problem.task.model.state_dict()
    for k in sorted(state):
        h.update(k.encode())
        _hash_arrays(h, state[k].detach().cpu().numpy())
    if isinstance(problem.X, InputView):
        h.update(problem.X.inputs.fingerprint().encode())
    else:
        _hash_arrays(h, problem.X.cpu().numpy())
    _hash_arrays(h, problem.y.cpu().numpy())
    for m in problem.units.members:
        _hash_arrays(h, m)
    desc = {
        "config": problem.config.to_dict(),
        "path": problem.path,
        "chunk": problem.chunk,
        "params": problem.task.param_names,
        "property": property_fingerprint(problem.prop),
        "units": problem.units.kind,
        "device": problem.task.device.type,
        "engine": ENGINE_VERSION,
        "recipe": None if problem.recipe is None else problem.recipe.describe(),
    }
    h.update(json.dumps(desc, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def make_problem(
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    prop: Property,
    units: Units,
    config: GoldConfig,
    path: str,
    chunk: int,
    recipe: TrainingRecipe | None = None,
    data: Dataset | None = None,
) -> GoldProblem:
    if recipe is None:  # a recipe trains the user's model in its own precision
        task = build_task(task, config.dtype)
    Xt, yt = task.to_tensor(X, y)
    for k, members in enumerate(units.members):
        if len(members) and (members.min() < 0 or members.max() >= len(yt)):
            raise GGDAError(f"Unit {int(units.ids[k])} has members outside the {len(yt)} training points.")
    problem = GoldProblem(task, Xt, yt, prop, units, config, path, chunk, recipe=recipe, data=data)
    problem.fingerprint = fingerprint(problem)
    return problem


def save_problem(problem: GoldProblem, file: Path) -> None:
    """Write the problem for worker processes (atomic)."""
    payload = {
        "task": problem.task,  # the task itself: a subclass's forward and the loss kind travel too
        "X": problem.X.inputs if isinstance(problem.X, InputView) else problem.X.cpu(),
        "y": problem.y.cpu(),
        "prop": problem.prop,
        "units": problem.units,
        "config": problem.config,
        "path": problem.path,
        "chunk": problem.chunk,
        "fingerprint": problem.fingerprint,
        "recipe": problem.recipe,
        "data": problem.data,
    }
    try:
        with atomic_open(file) as fh:
            torch.save(payload, fh)
    except GGDAError:
        raise  # the disk (named by atomic_open)
    except Exception as exc:  # lambdas in a custom loss/property cannot be pickled
        raise GGDAError(
            f"The problem cannot be sent to worker processes ({type(exc).__name__}: {exc}); use "
            "backend='serial' or module-level loss/property functions."
        ) from exc


def register_problem(file: str, problem: GoldProblem) -> None:
    """Make the in-memory problem available to in-process jobs under ``file``."""
    _CACHE[file] = problem


def load_problem(file: str) -> GoldProblem:
    """The problem that :func:`compute_gold` wrote to ``OUT/problem.pt`` for its own workers.

    Internal: this unpickles (the task object, with a user's model class, travels whole), so it
    is only ever given the file :func:`compute_gold` has just written, never a path from the
    user. User-facing model files load with ``weights_only=True``
    (:func:`ggda.models.checkpoint.load_state`).
    """
    cached = _CACHE.get(file)
    if cached is not None:
        return cached
    payload = torch.load(file, map_location="cpu", weights_only=False)
    task = payload["task"]
    task.model.to(task.device)
    X = payload["X"]
    Xt, yt = task.to_tensor(X if isinstance(X, ExampleInputs) else X.numpy(), payload["y"].numpy())
    problem = GoldProblem(
        task,
        Xt,
        yt,
        payload["prop"],
        payload["units"],
        payload["config"],
        payload["path"],
        payload["chunk"],
        payload["fingerprint"],
        recipe=payload.get("recipe"),
        data=payload.get("data"),
    )
    _CACHE[file] = problem
    return problem
