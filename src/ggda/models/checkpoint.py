"""Saving and loading models and checkpoints as self-describing files.

A file holds the :class:`ModelSpec` as a plain dict (when the model came from the zoo), the state
dict and training metadata (epoch, step, learning rate). TracIn reads the learning rate from here.

Files are read with ``torch.load(weights_only=True)``: only tensors and plain containers are
unpickled, so a crafted model file cannot run code. Anything else (a truncated, empty or foreign
file, a pickled object) is one :class:`GGDAError` line naming the file.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ggda.errors import GGDAError
from ggda.io import save_torch
from ggda.models.zoo import ModelSpec, build_model


@dataclass
class Checkpoint:
    """A saved model state along the training trajectory."""

    path: Path
    epoch: int
    step: int
    lr: float


def learning_rate(lr: object, where: str = "A checkpoint") -> float | dict[str, float]:
    """A checkpoint's learning rate, checked: a number, or ``{parameter name: rate}`` when the
    optimizer's parameter groups had different rates (TracIn then weighs each parameter by its own)."""
    if isinstance(lr, dict):
        if lr and all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in lr.items()):
            return {k: float(v) for k, v in lr.items()}
    elif isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr)
    raise GGDAError(
        f"{where}'s learning rate must be a number or a non-empty {{parameter name: rate}} map, not {lr!r}; "
        "pass (state, lr) pairs or record the training run again."
    )


def save_model(path: str | Path, model: nn.Module, **meta) -> Path:
    """Write ``{"spec": dict | None, "state_dict": ..., "meta": meta}`` atomically (tensors and
    plain values only, so it loads with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = getattr(model, "ggda_spec", None)
    payload = {
        "spec": spec.to_dict() if spec else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    save_torch(path, payload)  # atomic: a crash or a full disk never leaves a half-written model
    return path


def load_state(path: str | Path) -> dict:
    """The payload of a model or checkpoint file, unpickling tensors and plain containers only."""
    path = Path(path)
    if not path.exists():
        raise GGDAError(f"Model file {path} does not exist; train one with `ggda train` first.")
    if path.is_dir():
        raise GGDAError(f"Model file {path} is a directory; pass a .pt file written by `ggda train`.")
    retrain = "retrain with `ggda train` (or pass a file it wrote)."
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise GGDAError(
            f"{path} holds Python objects other than tensors, which ggda does not unpickle (it could run "
            f"code); {retrain}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, KeyError) as exc:
        raise GGDAError(
            f"{path} is not a readable model file (empty, truncated or corrupt); {retrain}"
        ) from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise GGDAError(f"{path} is not a ggda model file (no state_dict); {retrain}")
    if payload.get("spec") is not None and not isinstance(payload["spec"], dict):
        raise GGDAError(f"{path} has a model spec that is not a dict; {retrain}")
    if not isinstance(payload.get("meta", {}), dict):
        raise GGDAError(f"{path} has metadata that is not a dict; {retrain}")
    payload.setdefault("meta", {})
    return payload


def file_spec(path: str | Path, payload: dict) -> ModelSpec | None:
    """The :class:`ModelSpec` a model file records (``None`` for a custom module)."""
    if payload.get("spec") is None:
        return None
    try:
        return ModelSpec.from_dict(payload["spec"])
    except TypeError as exc:
        raise GGDAError(f"{path} records a malformed model spec ({exc}); retrain with `ggda train`.") from exc


def load_model(
    path: str | Path, model: nn.Module | None = None, expect: ModelSpec | None = None
) -> nn.Module:
    """Load a saved model. Pass ``model`` to load into your own architecture, or ``expect`` (a
    run's recorded architecture) to refuse a file of another architecture by name."""
    payload = load_state(path)
    spec = file_spec(path, payload)
    if expect is not None:
        check_spec(path, payload, expect)
        spec = expect
    if model is None:
        if spec is None:
            raise GGDAError(f"{path} was saved from a custom module; pass model=YourModule() to load it.")
        model = build_model(spec)
    load_into(model, payload["state_dict"], source=str(path))
    return model


def check_spec(path: str | Path, payload: dict, expect: ModelSpec) -> None:
    """Refuse, by name, a model file whose recorded architecture is not ``expect``."""
    spec = file_spec(path, payload)
    if spec is not None and spec != expect:
        raise GGDAError(
            f"{path} holds a {_describe(spec)} model but the run records {_describe(expect)}; use the "
            "model files this run trained, or retrain with `ggda train`."
        )


def _describe(spec: ModelSpec) -> str:
    shape = f", input shape {tuple(spec.input_shape)}" if spec.input_shape else ""
    hidden = f", hidden {spec.hidden}" if spec.name in ("mlp-s", "mlp-m") else ""
    return f"'{spec.name}' ({spec.in_features} inputs, {spec.n_outputs} outputs{hidden}{shape})"


def load_into(model: nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Load a state dict, turning shape/key mismatches into a one-line error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else "") + (
            f" unexpected {unexpected[:3]}" if unexpected else ""
        )
        if wrong:
            k = wrong[0]
            detail += f" shape of {k}: model {tuple(own[k].shape)} vs file {tuple(state_dict[k].shape)}"
        raise GGDAError(
            f"{source} does not match the model ({detail.strip()}); load it with the architecture and "
            "data it was trained with."
        )
    model.load_state_dict(state_dict)
