"""Models (a small zoo + any user nn.Module) and a deterministic training loop with checkpoints."""

from ggda.models.checkpoint import Checkpoint, load_model, save_model
from ggda.models.training import TrainConfig, TrainResult, train_model
from ggda.models.zoo import MODEL_NAMES, ModelSpec, build_model

__all__ = [
    "MODEL_NAMES",
    "Checkpoint",
    "ModelSpec",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "load_model",
    "save_model",
    "train_model",
]
