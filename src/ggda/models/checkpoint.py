"""Saving and loading models and checkpoints as self-describing files.

A file holds the :class:`ModelSpec` (when the model came from the zoo), the state dict and
training metadata (epoch, step, learning rate). TracIn reads the learning rate from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ggda.errors import GGDAError
from ggda.models.zoo import ModelSpec, build_model


@dataclass
class Checkpoint:
    """A saved model state along the training trajectory."""

    path: Path
    epoch: int
    step: int
    lr: float


def save_model(path: str | Path, model: nn.Module, **meta) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = getattr(model, "ggda_spec", None)
    payload = {"spec": spec.to_dict() if spec else None, "state_dict": model.state_dict(), "meta": meta}
    tmp = path.with_suffix(path.suffix + ".part")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written model
    return path


def load_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise GGDAError(f"Model file {path} does not exist; train one with `ggda train` first.")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_model(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a saved model. Pass ``model`` to load into your own architecture."""
    payload = load_state(path)
    if model is None:
        if payload.get("spec") is None:
            raise GGDAError(f"{path} was saved from a custom module; pass model=YourModule() to load it.")
        model = build_model(ModelSpec.from_dict(payload["spec"]))
    load_into(model, payload["state_dict"], source=str(path))
    return model


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
