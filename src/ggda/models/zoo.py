"""The model zoo of both papers: logistic regression, ANN-S / ANN-M MLPs, a small CNN and a small
ResNet (residual blocks with BatchNorm; GGDA's CIFAR-10 model family).

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

MODEL_NAMES = ("logreg", "mlp-s", "mlp-m", "cnn", "resnet")


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


class ResidualBlock(nn.Module):
    """Two 3×3 conv + BatchNorm layers and a shortcut (1×1 conv + BatchNorm when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem (conv + BatchNorm, max-pooled) -> residual blocks at width w, 2w, 4w (the last two
    halve the resolution) -> global average pool -> linear head.

    Why BatchNorm matters to ggda: training (``train_model``, every retrain) runs it in train mode
    (batch statistics, running averages updated); attribution, groupings and evaluation run the
    model in eval mode (``AttributionTask`` calls ``.eval()``), so every per-example gradient is a
    function of that example alone, computed with the stored running statistics. The running
    statistics are buffers: saved with the model and passed through ``functional_call``, never
    attributed. The last Linear layer keeps Grad-K-Means' closed-form last-layer gradients.
    """

    def __init__(self, input_shape: tuple[int, ...], n_outputs: int, width: int = 16) -> None:
        super().__init__()
        channels, height, w = input_shape
        if min(height, w) < 4:
            raise GGDAError(f"The resnet model needs images of at least 4×4 pixels, got {height}×{w}.")
        self.unflatten = nn.Unflatten(1, tuple(input_shape))
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.layer1 = ResidualBlock(width, width)
        self.layer2 = ResidualBlock(width, 2 * width, stride=2)
        self.layer3 = ResidualBlock(2 * width, 4 * width, stride=2)
        self.fc = nn.Linear(4 * width, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(self.unflatten(x)))))
        return self.fc(x.mean(dim=(2, 3)))


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
                f"The {spec.name} model needs image data with an input shape (C, H, W), e.g. digits or "
                "mnist; use logreg/mlp-s/mlp-m for tabular data."
            )
        image_model = SmallResNet if spec.name == "resnet" else SmallCNN
        model = image_model(shape, out, width=int(spec.extra.get("width", 16)))
    model.ggda_spec = spec  # type: ignore[attr-defined]  # travels with the module for saving
    return model
