"""Run directories: the named on-disk artifacts that connect the pipeline stages.

:class:`Run` is the one writer and reader of a run directory: ``Run.create`` (``ggda train``,
``ggda experiment``) trains and saves one, ``Run.load`` (every later command: attribute, group,
gold, compare, evaluate, features) reads it back, and the run hands out what later stages need —
``run.data()``, ``run.task(device)``, ``run.method(name, **overrides)`` (with the options a run
provides, such as its weight decay and checkpoints, offered in one place) and
``run.executor(backend)``. The data are *not* copied: ``run.json`` records how to rebuild them exactly
(data source, split seed, standardisation, label noise), and ``split.npz`` pins the ids.

Layout::

    RUN/run.json            data spec, model spec, train config, metrics
    RUN/split.npz           train_ids, test_ids (the noisy mask when labels were flipped, the
                            group names when the data have a group column)
    RUN/model.pt            final model (self-describing)
    RUN/checkpoints/*.pt    checkpoints with epoch, step and learning rate (TracInCP)
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from ggda.arrays import read_npz
from ggda.data.dataset import Dataset
from ggda.data.preprocess import TargetScaler
from ggda.data.spec import DataSpec, prepare_data
from ggda.errors import GGDAError
from ggda.io import save_json, save_npz
from ggda.models.checkpoint import Checkpoint, check_spec, load_into, load_model, load_state, save_model
from ggda.models.training import TrainConfig, accuracy, regression_metrics, resolve_device, train_model
from ggda.models.zoo import ModelSpec, build_model

if TYPE_CHECKING:
    from ggda.execution import Executor
    from ggda.methods.base import Attributor
    from ggda.task import AttributionTask


def offered_options(name: str, provided: dict, overrides: dict) -> dict:
    """Keyword options for method ``name``: ``overrides``, plus each ``provided`` option that the
    method's constructor accepts, is not ``None`` and the overrides do not set.

    The one place where what a trained model provides (its training weight decay, its
    checkpoints) reaches a method, whichever command or application builds it.
    """
    import ggda.methods  # noqa: F401  (registers every method)
    from ggda.methods.base import METHODS, method_options

    accepts = method_options(METHODS[name]) if name in METHODS else set()
    options = {k: v for k, v in provided.items() if k in accepts and v is not None and k not in overrides}
    options.update(overrides)
    return options


_RUN_FIX = "retrain the run with `ggda train` (or restore the file)."


def read_run_config(path: Path) -> dict:
    """``run.json`` of run directory ``path``: a dict with ``data``, ``model`` and ``train``
    records; anything else (missing, empty, truncated, not JSON) is one error line naming it."""
    if not path.exists():
        raise GGDAError(f"Run directory {path} does not exist; create it with `ggda train --out {path}`.")
    if not path.is_dir():
        raise GGDAError(f"{path} is a file, not a run directory; pass the directory `ggda train` wrote.")
    cfg_file = path / "run.json"
    if not cfg_file.exists():
        raise GGDAError(f"{path} is not a ggda run directory (no run.json); create one with `ggda train`.")
    try:
        config = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GGDAError(
            f"{cfg_file} is not valid JSON (empty, truncated or overwritten); {_RUN_FIX}"
        ) from exc
    if not isinstance(config, dict) or not all(
        isinstance(config.get(k), dict) for k in ("data", "model", "train")
    ):
        raise GGDAError(f"{cfg_file} lacks its data, model or train record; {_RUN_FIX}")
    return config


def config_data_spec(path: Path, config: dict) -> DataSpec:
    """The :class:`DataSpec` recorded in a run's ``run.json`` (checked like a new one)."""
    record = dict(config["data"])
    record.setdefault("standardize_target", False)  # runs written before targets were scaled
    try:
        return DataSpec(**record)
    except TypeError as exc:
        raise GGDAError(f"{path / 'run.json'} has an invalid data record ({exc}); {_RUN_FIX}") from exc
    except GGDAError as exc:
        raise GGDAError(f"{path / 'run.json'}: {exc} {_RUN_FIX}") from exc


@dataclass
class Run:
    """A trained run: its data, final model and checkpoints, and the record in ``run.json``.

    ``config`` holds ``data`` (a :class:`DataSpec`), ``model`` (a :class:`ModelSpec`), ``train``
    (a :class:`TrainConfig`) and ``metrics``.
    """

    path: Path
    config: dict
    train: Dataset
    test: Dataset
    model: nn.Module
    checkpoints: list[Checkpoint]

    # -- writing ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        data: DataSpec,
        model: str,
        train: TrainConfig,
        device: str = "cpu",
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> Run:
        """Prepare the data, build the model (initialisation seeded by ``train.seed``), train it
        with checkpoints under ``PATH/checkpoints`` and save the run directory."""
        from ggda.outputs import check_output_dir

        path = check_output_dir(path)  # before any work: a file there, under a file, read-only, too long
        resolve_device(device)
        train_data, test_data, _ = prepare_data(data)
        data = replace(data, kind=train_data.kind)  # "auto" resolved: the run records what it trained
        notice = train_data.meta.get("kind_notice")
        if log is not None:
            if notice:
                log(f"note: {notice}")
            log(f"data  {train_data.describe()}; test n={len(test_data)}")
        mspec = ModelSpec(model, train_data.n_features, train_data.n_outputs, train_data.input_shape)
        net = build_model(mspec, seed=train.seed)
        t0 = time.perf_counter()
        result = train_model(
            net, train_data, train, device=device, checkpoint_dir=path / "checkpoints", progress=progress
        )
        metrics = {"train_seconds": time.perf_counter() - t0, "final_train_loss": result.losses[-1]}
        if train_data.kind == "classification":
            metrics["train_accuracy"] = accuracy(net, train_data, device)
            metrics["test_accuracy"] = accuracy(net, test_data, device)
        else:  # in the target's original units
            target = TargetScaler.of(train_data)
            for split, part in (("train", train_data), ("test", test_data)):
                m = regression_metrics(net, part, device, target.mean, target.scale)
                metrics[f"{split}_mse"], metrics[f"{split}_r2"] = m["mse"], m["r2"]
        config = {
            "data": data.to_dict(),
            "model": mspec.to_dict(),
            "train": train.to_dict(),
            "metrics": metrics,
        }
        if train_data.kind == "regression" and data.standardize_target:
            config["target"] = TargetScaler.of(train_data).to_meta()
        run = cls(path, config, train_data, test_data, net, list(result.checkpoints))
        return run.save()

    def save(self) -> Run:
        """Write ``model.pt``, ``split.npz`` and ``run.json`` (last, atomically: a run directory
        with a ``run.json`` is complete). Checkpoints are written by training."""
        self.path.mkdir(parents=True, exist_ok=True)
        save_model(self.path / "model.pt", self.model, epoch=self.config["train"].get("epochs"))
        split = {"train_ids": self.train.ids, "test_ids": self.test.ids}
        if self.train.noisy is not None:
            split["noisy"] = self.train.noisy
        if self.train.group_names is not None:  # the group column's values, by group id
            split["group_names"] = np.asarray(self.train.group_names, dtype=str)
        save_npz(self.path / "split.npz", **split)
        save_json(self.path / "run.json", self.config, default=str)  # last: the run is complete
        return self

    @classmethod
    def record(
        cls,
        path: str | Path,
        data: DataSpec,
        model: nn.Module,
        train_config: dict,
        train: Dataset,
        test: Dataset,
        metrics: dict,
        checkpoints: list[Checkpoint] | None = None,
        **extra: dict,
    ) -> Run:
        """Save a model trained elsewhere (``ggda text-train``) as a run directory every command
        reads: ``model`` must carry its ``ggda_spec`` (so ``Run.load`` rebuilds it), ``data``
        must rebuild ``train``/``test`` exactly; ``extra`` records go into ``run.json`` as well."""
        spec = getattr(model, "ggda_spec", None)
        if spec is None:
            raise GGDAError(
                "Run.record needs a model built from a ModelSpec (build_model); got a custom module."
            )
        config = {
            "data": data.to_dict(),
            "model": spec.to_dict(),
            "train": dict(train_config),
            "metrics": metrics,
        }
        config.update(extra)
        return cls(Path(path), config, train, test, model, list(checkpoints or [])).save()

    # -- reading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Run:
        """Rebuild a run's data (checked against the saved ids) and load its model and checkpoints."""
        path = Path(path)
        config = read_run_config(path)
        train, test, _ = prepare_data(config_data_spec(path, config))
        split = read_npz(
            path / "split.npz",
            "the run directory is incomplete or damaged; retrain it with `ggda train`.",
            required=("train_ids", "test_ids"),
        )
        if not np.array_equal(split["train_ids"], train.ids) or not np.array_equal(
            split["test_ids"], test.ids
        ):
            raise GGDAError(
                f"The data of {path} no longer match the ids it was trained on; re-run `ggda train`."
            )
        if "noisy" in split:  # which labels were flipped
            train = replace(train, noisy=split["noisy"])
        if "group_names" in split:
            names = split["group_names"].astype(str)
            if train.group_names is not None and not np.array_equal(names, train.group_names):
                raise GGDAError(
                    f"The group column of {path}'s data no longer matches the group names it was trained "
                    "with; re-run `ggda train`."
                )
            train, test = (replace(d, group_names=names) for d in (train, test))
        if "target" in config and train.kind == "regression":
            stored = config["target"]
            if not np.allclose(
                [stored.get("target_mean", np.nan), stored.get("target_scale", np.nan)],
                [train.meta.get("target_mean", 0.0), train.meta.get("target_scale", 1.0)],
                rtol=1e-6,
            ):
                raise GGDAError(
                    f"The target of {path}'s data no longer matches the scaling it was trained with; "
                    "re-run `ggda train`."
                )
        try:
            expect = ModelSpec.from_dict(config["model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise GGDAError(
                f"{path / 'run.json'} has no valid model record; retrain the run with `ggda train`."
            ) from exc
        model = load_model(path / "model.pt", expect=expect)  # another architecture is refused by name
        ckpts = []
        for f in sorted((path / "checkpoints").glob("epoch_*.pt")):
            payload = load_state(f)
            check_spec(f, payload, expect)
            meta = payload["meta"]
            try:
                ckpts.append(Checkpoint(f, int(meta["epoch"]), int(meta["step"]), float(meta["lr"])))
            except (KeyError, TypeError, ValueError) as exc:
                raise GGDAError(
                    f"Checkpoint {f} lacks its epoch, step or learning rate; delete it or retrain with `ggda train`."
                ) from exc
        return cls(path, config, train, test, model, ckpts)

    # -- what later stages need ---------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.config["data"].get("kind", "classification")

    @property
    def data_spec(self) -> DataSpec:
        return config_data_spec(self.path, self.config)

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.config["model"])

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.config["train"])

    @property
    def weight_decay(self) -> float:
        """The L2 coefficient of training (the objective had a (wd/2)‖θ‖² term)."""
        return float(self.config["train"].get("weight_decay", 0.0) or 0.0)

    def data(self) -> tuple[Dataset, Dataset]:
        """(train, test), as the model was trained and tested."""
        return self.train, self.test

    def model_at(self, checkpoint: str | Path | None = None) -> nn.Module:
        """The final model, or a copy holding another saved state of the same architecture."""
        if checkpoint is None:
            return self.model
        payload = load_state(checkpoint)
        check_spec(checkpoint, payload, self.model_spec)
        model = copy.deepcopy(self.model)
        load_into(model, payload["state_dict"], source=str(checkpoint))
        return model

    def task(self, device: str = "cpu", checkpoint: str | Path | None = None) -> AttributionTask:
        """The attribution task: the final model (or ``checkpoint``) with the run's loss."""
        from ggda.task import AttributionTask

        return AttributionTask(self.model_at(checkpoint), loss=self.kind, device=device)

    def provided_options(self) -> dict:
        """What this run offers methods: its training weight decay (influence methods add
        wd·I to the curvature) and its checkpoints (TracInCP, TRAK ensembles)."""
        return {"weight_decay": self.weight_decay or None, "checkpoints": self.checkpoints or None}

    def method_options(self, name: str, offer: dict | None = None, **overrides) -> dict:
        """The keyword options ``run.method`` passes to method ``name``.

        ``overrides`` win; ``offer`` adds options given only where the method accepts them
        (e.g. ``use_lr`` from ``ggda attribute --no-lr``) on top of :meth:`provided_options`.
        """
        return offered_options(name, {**self.provided_options(), **(offer or {})}, overrides)

    def method(
        self, name: str, task: AttributionTask | None = None, offer: dict | None = None, **overrides
    ) -> Attributor:
        """Method ``name`` (see ``ggda methods``) on this run, built by
        :func:`ggda.methods.make_method` with :meth:`method_options`; ``task`` defaults to
        ``run.task()`` (CPU)."""
        from ggda.methods import make_method

        return make_method(name, task or self.task(), **self.method_options(name, offer, **overrides))

    @staticmethod
    def executor(backend: str = "local", workers: int | None = None) -> Executor:
        """An executor for retrains and further training (``workers`` ignored by ``serial``)."""
        from ggda.execution import make_executor
        from ggda.options import COUNT, check

        check("--workers", workers, COUNT.optional())
        return make_executor(backend, **({"workers": workers} if workers and backend != "serial" else {}))
