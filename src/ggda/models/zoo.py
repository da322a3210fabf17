"""The model zoo of both papers: logistic regression, ANN-S / ANN-M MLPs and a small CNN.

Models take *flattened* inputs (the :class:`~ggda.data.Dataset` layout); the CNN unflattens them
itself, so one tensor layout serves every model, every gradient routine and every loader.
A :class:`ModelSpec` is everything needed to rebuild a model, so saved models and checkpoints
are self-describing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ggda.errors import GGDAError

MODEL_NAMES = ("logreg", "mlp-s", "mlp-m", "cnn")


@dataclass
class ModelSpec:
    """Architecture name + shapes: enough to rebuild the module."""

    name: str
    in_features: int
    n_outputs: int
    input_shape: tuple[int, ...] | None = None
    hidden: int = 128
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape) if self.input_shape else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        d = dict(d)
        if d.get("input_shape") is not None:
            d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)


class SmallCNN(nn.Module):
    """Two conv blocks + linear head; works for 8×8 (digits) and 28×28 (MNIST-like) images."""

    def __init__(self, input_shape: tuple[int, ...], n_outputs: int, width: int = 16) -> None:
        super().__init__()
        channels, height, w = input_shape
        self.unflatten = nn.Unflatten(1, tuple(input_shape))
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        flat = 2 * width * (height // 4) * (w // 4)
        self.fc1 = nn.Linear(flat, 64)
        self.fc2 = nn.Linear(64, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.unflatten(x)
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(self.act(self.fc1(x)))


def build_model(
    spec: ModelSpec | str,
    in_features: int | None = None,
    n_outputs: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Build a fresh model. ``seed`` makes the initialisation reproducible."""
    if isinstance(spec, str):
        if in_features is None or n_outputs is None:
            raise GGDAError("build_model(name, ...) needs in_features and n_outputs.")
        spec = ModelSpec(spec, in_features, n_outputs, input_shape)
    if spec.name == "minilm":  # the text classifier of `ggda text-train` runs (ggda.models.text)
        from ggda.models.text import build_text_model

        return build_text_model(spec, seed)
    if spec.name not in MODEL_NAMES:
        raise GGDAError(f"Unknown model '{spec.name}'; choose one of {', '.join(MODEL_NAMES)}.")
    if seed is not None:
        torch.manual_seed(seed)
    d, out, h = spec.in_features, spec.n_outputs, spec.hidden
    if spec.name == "logreg":
        model: nn.Module = nn.Sequential(nn.Linear(d, out))
    elif spec.name == "mlp-s":  # ANN-S: one hidden layer
        model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, out))
    elif spec.name == "mlp-m":  # ANN-M / FiMODA's MLP: in -> 128 -> 128 -> out
        model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, out))
    else:
        shape = spec.input_shape
        if shape is None or len(shape) != 3:
            raise GGDAError(
                "The cnn model needs image data with an input shape (C, H, W), e.g. digits or mnist; "
                "use logreg/mlp-s/mlp-m for tabular data."
            )
        model = SmallCNN(shape, out, width=int(spec.extra.get("width", 16)))
    model.ggda_spec = spec  # type: ignore[attr-defined]  # travels with the module for saving
    return model
