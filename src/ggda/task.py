"""The attribution task: *what* is attributed, separate from *how* (the methods).

An :class:`AttributionTask` holds the model, its per-example training loss and which parameters
attribution looks at (all trainable ones by default, or chosen layers). It exposes the model as a
pure function of a parameter dict, ``forward(params, X)``, which is what ``torch.func`` needs for
per-example and group gradients, HVPs and vmapped further training.

The *property function* f(θ) (GGDA Definition 3) lives in :mod:`ggda.properties`; tasks and
properties are combined by the methods.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from ggda.data.batches import ExampleInputs, InputView, is_batch, take, to_device
from ggda.data.text import DEFAULT_FIELDS, unpack_tokens
from ggda.errors import GGDAError
from ggda.models.calling import (
    attention_forward_ad_notice,
    call_args,
    eager_attention_error,
    expands_padding_mask,
    is_forward_ad_attention_error,
    is_vmap_branch_error,
    model_output,
    use_eager_attention,
    vmap_branch_error,
)
from ggda.models.checkpoint import load_into, load_state
from ggda.models.losses import LOSS_KINDS, PerExampleLoss, loss_for, loss_kind_of
from ggda.models.training import resolve_device

Params = dict[str, torch.Tensor]
GRADIENT_PATHS = ("auto", "generic")


class AttributionTask:
    """Model + per-example training loss + the parameters attribution differentiates.

    Args:
        model: any ``nn.Module``. A batch of inputs reaches it as ``model(x)`` for a tensor,
            ``model(*x)`` for a tuple and ``model(**x)`` for a dict (token ids + attention mask);
            an output with ``.logits`` (Hugging Face) gives its logits. A Hugging Face encoder
            fed dicts gets its padding mask as the 4-D additive mask (vmap-safe; checked once to
            give the same outputs), and a model whose SDPA attention meets forward-mode AD
            (influence-function curvature products) is switched to ``eager`` attention with a
            warning — both in :mod:`ggda.models.calling`.
        loss: per-example loss ``(outputs, targets) -> (B,)`` (e.g.
            ``nn.CrossEntropyLoss(reduction="none")``), or ``"classification"``,
            ``"regression"``, ``"cross-entropy"``, ``"mse"``.
        loss_kind: what the loss computes, so closed forms (Gauss–Newton products, TRAK's
            output, the stacked further-training kernel) apply to a user's loss object:
            ``"cross-entropy"`` (softmax cross-entropy on logits), ``"squared-error"``
            (½‖out − y‖²) or ``"custom"``. Default: recognised from ``loss`` (ggda's losses and an
            unweighted ``nn.CrossEntropyLoss(reduction="none")``), else ``"custom"``. A declared
            kind is checked against the closed form on the first batch.
        layers: names (or name prefixes, e.g. ``"2"`` or ``"fc2"``) of the parameters to attribute
            through; the others are held fixed. Default: every trainable parameter.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        gradients: ``"auto"`` (layer-factor and closed-form paths wherever the model allows them,
            verified against ``torch.func`` on a few examples) or ``"generic"`` (``torch.func``
            everywhere; same scores, slower — benchmarks compare the two).

    Subclass and override :meth:`forward` for models that need more than the call above.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: PerExampleLoss | str = "classification",
        layers: Iterable[str] | None = None,
        device: str | torch.device | None = "cpu",
        loss_kind: str | None = None,
        gradients: str = "auto",
    ) -> None:
        if gradients not in GRADIENT_PATHS:
            raise GGDAError(f"Unknown gradients '{gradients}'; choose one of {', '.join(GRADIENT_PATHS)}.")
        self.gradients = gradients
        if not isinstance(model, nn.Module):
            raise GGDAError(f"The model is a {type(model).__name__}; pass an nn.Module.")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.loss_fn: PerExampleLoss = loss_for(loss) if isinstance(loss, str) else loss
        if not callable(self.loss_fn):
            raise GGDAError(
                f"The loss is a {type(loss).__name__}; pass a callable (outputs, targets) -> (B,)."
            )
        if loss_kind is not None and loss_kind not in LOSS_KINDS:
            raise GGDAError(f"Unknown loss_kind '{loss_kind}'; choose one of {', '.join(LOSS_KINDS)}.")
        self.loss_kind: str = loss_kind or loss_kind_of(self.loss_fn)
        self._loss_checked = loss_kind is None and self.loss_kind != "custom"  # ggda's own losses
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not named:
            raise GGDAError(
                "The model has no trainable parameters; unfreeze the layers to attribute through."
            )
        if layers is None:
            chosen = list(named)
        else:
            layers = list(layers)
            chosen = [n for n in named if any(n == s or n.startswith(s + ".") for s in layers)]
            if not chosen:
                raise GGDAError(f"No parameters match layers {layers}; choose from {list(named)}.")
        self.param_names: list[str] = chosen
        self.layers = None if layers is None else list(layers)
        self.dtype = next(self.model.parameters()).dtype
        expands_padding_mask(self.model)  # decided here, outside any torch.func transform

    # -- parameters ---------------------------------------------------------------------------
    def params(self) -> Params:
        """The attributed parameters, detached (a snapshot of the current model)."""
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.param_names}

    def fixed(self) -> dict[str, torch.Tensor]:
        """Everything the forward pass needs besides the attributed parameters."""
        state = {n: p.detach() for n, p in self.model.named_parameters() if n not in self.param_names}
        state.update({n: b for n, b in self.model.named_buffers()})
        return state

    def with_params(self, names: Iterable[str]) -> AttributionTask:
        """The same task attributing only the parameters ``names`` (the others held fixed)."""
        import copy

        names = list(names)
        unknown = [n for n in names if n not in self.param_names]
        if unknown or not names:
            raise GGDAError(f"Parameters {unknown or names} are not attributed by this task.")
        clone = copy.copy(self)
        clone.param_names = names
        return clone

    def __setstate__(self, state: dict) -> None:
        """Tasks pickled by an earlier version (a stored gold problem) lack newer attributes."""
        state.setdefault("gradients", "auto")
        state.setdefault("loss_kind", loss_kind_of(state.get("loss_fn")))
        state.setdefault("_loss_checked", True)
        self.__dict__.update(state)
        if "model" in state:
            expands_padding_mask(self.model)

    def generic(self) -> AttributionTask:
        """The same task with every gradient through ``torch.func`` (the reference for fast paths)."""
        import copy

        clone = copy.copy(self)
        clone.gradients = "generic"
        return clone

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params().values())

    def flatten(self, tensors: Params, batch_dims: int = 0) -> torch.Tensor:
        """Concatenate a parameter-shaped dict into vectors, in ``param_names`` order."""
        lead = None
        parts = []
        for n in self.param_names:
            t = tensors[n]
            lead = t.shape[:batch_dims]
            parts.append(t.reshape(*lead, -1))
        return torch.cat(parts, dim=batch_dims)

    def unflatten(self, vector: torch.Tensor) -> Params:
        out, start = {}, 0
        for n, p in self.params().items():
            out[n] = vector[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return out

    def layer_slices(self) -> dict[str, slice]:
        """Where each attributed parameter lives in the flat vector (per-layer methods use it)."""
        out, start = {}, 0
        for n, p in self.params().items():
            out[n] = slice(start, start + p.numel())
            start += p.numel()
        return out

    # -- functional model ---------------------------------------------------------------------
    def forward(self, params: Params, X) -> torch.Tensor:
        """Model outputs at ``params`` (attributed parameters; others fixed) for a batch ``X``."""
        args, kwargs = call_args(X, self.dtype if self.padding_mask_4d else None)
        try:
            out = functional_call(self.model, {**self.fixed(), **params}, args, kwargs)
        except NotImplementedError as exc:  # SDPA under forward-mode AD (curvature products)
            if not is_forward_ad_attention_error(exc):
                raise
            if not use_eager_attention(self.model):
                raise eager_attention_error(self.model) from exc
            attention_forward_ad_notice(self.model)
            out = functional_call(self.model, {**self.fixed(), **params}, args, kwargs)
        except RuntimeError as exc:
            if is_vmap_branch_error(exc):
                raise vmap_branch_error(self.model) from exc
            raise
        return model_output(out)

    @property
    def padding_mask_4d(self) -> bool:
        """Whether dict batches' ``attention_mask`` reaches the model as the 4-D additive mask
        (Hugging Face encoders: their own mask builder cannot be vmapped; see
        :mod:`ggda.models.calling`). Decided once per model."""
        return expands_padding_mask(self.model)

    def losses(self, params: Params, X, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.forward(params, X), y)

    def check_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> None:
        """Once per task: the loss is per example, and equals its declared closed form."""
        if getattr(self, "_loss_checked", True):
            return
        with torch.no_grad():
            values = self.loss_fn(outputs, y)
            if not isinstance(values, torch.Tensor) or values.shape != (len(y),):
                shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
                raise GGDAError(
                    f"The loss returned {shape} for a batch of {len(y)}; return one loss per example "
                    "(e.g. nn.CrossEntropyLoss(reduction='none'))."
                )
            if self.loss_kind != "custom":
                ref = loss_for(self.loss_kind)(outputs, y)
                if not torch.allclose(values.to(ref.dtype), ref, rtol=1e-4, atol=1e-5):
                    raise GGDAError(
                        f"The loss does not compute loss_kind='{self.loss_kind}' "
                        f"({'softmax cross-entropy' if self.loss_kind == 'cross-entropy' else '0.5*(out-y)^2'}) "
                        "on a check batch; declare loss_kind='custom'."
                    )
        self._loss_checked = True

    def to_tensor(self, X, y=None):
        """Inputs (and targets) on the task's device: a whole-set tensor for in-memory arrays, an
        :class:`~ggda.data.batches.InputView` (``view[rows]`` fetches a batch) for lazy inputs,
        or the moved batch for a batch (tensor, tuple or dict)."""
        if isinstance(X, ExampleInputs):
            Xt = InputView(X, self.device, self.dtype)
        elif isinstance(X, InputView):
            Xt = X
        elif is_batch(X) and not isinstance(X, torch.Tensor):
            Xt = to_device(X, self.device, self.dtype)
        else:
            Xt = torch.as_tensor(X, device=self.device)
            Xt = Xt.to(self.dtype) if Xt.is_floating_point() else Xt
        yt = None if y is None else torch.as_tensor(y, device=self.device)
        if yt is not None and not getattr(self, "_loss_checked", True) and len(yt):
            k = min(4, len(yt))
            head = Xt[:k] if isinstance(Xt, (torch.Tensor, InputView)) else take(Xt, slice(0, k))
            with torch.no_grad():
                self.check_loss(self.forward(self.params(), head), yt[:k])
        return Xt, yt

    def batch(self, X):
        """A (small) collection of inputs as one batch on the device: what ``forward`` takes."""
        Xt, _ = self.to_tensor(X)
        return Xt[:] if isinstance(Xt, InputView) else Xt

    # -- checkpoints --------------------------------------------------------------------------
    def at(self, state: dict | str | Path) -> AttributionTask:
        """The same task with the model at another state (a checkpoint path or a state dict)."""
        import copy

        if isinstance(state, (str, Path)):
            state = load_state(state)["state_dict"]
        model = copy.deepcopy(self.model)
        load_into(model, state, source="checkpoint")
        clone = copy.copy(self)
        clone.model = model.to(self.device).eval()
        return clone

    def describe(self) -> str:
        return f"{type(self.model).__name__}, {self.n_params:,} attributed parameters ({len(self.param_names)} tensors), {self.device}"


class TextClassificationTask(AttributionTask):
    """:class:`~ggda.task.AttributionTask` for token inputs and any Hugging Face classifier.

    ``X`` rows are packed token fields (:func:`ggda.data.text.pack_tokens`); :meth:`forward`
    splits them back into a dict, converts the padding mask to a 4-D additive mask (vmap-safe)
    and calls the model with keyword arguments, so every method and ``iter_group_gradients``
    work on token batches. Models that take packed rows themselves (:class:`TextClassifier`,
    :class:`TransformerTail`, :class:`PackedInputs`) are called directly.

    Gradients are restricted to the trainable parameters (``requires_grad``), or to ``layers``
    (name prefixes, e.g. ``["bert.encoder.layer.5", "classifier"]``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: PerExampleLoss | str = "classification",
        layers: Iterable[str] | None = None,
        device: str | torch.device | None = "cpu",
        fields: Sequence[str] = DEFAULT_FIELDS,
        mask_4d: bool = True,
    ) -> None:
        super().__init__(model, loss=loss, layers=layers, device=device)
        self.fields, self.mask_4d = tuple(fields), mask_4d

    def forward(self, params: Params, X: torch.Tensor) -> torch.Tensor:
        if getattr(self.model, "ggda_packed_input", False):
            return super().forward(params, X)
        # the dict of fields then takes the one model-calling path (4-D mask, .logits, SDPA)
        return super().forward(params, unpack_tokens(X, self.fields))

    @property
    def padding_mask_4d(self) -> bool:
        """The 4-D additive mask (vmap-safe) unless ``mask_4d=False`` or the model reads it
        differently from its own 0/1 mask (checked once, :func:`~ggda.models.calling.expands_padding_mask`)."""
        return bool(getattr(self, "mask_4d", True)) and expands_padding_mask(self.model)

    @classmethod
    def from_task(
        cls, task: AttributionTask, fields: Sequence[str] = DEFAULT_FIELDS
    ) -> TextClassificationTask:
        """The same model, loss, attributed layers, device and gradient path, reading packed token rows."""
        out = cls(task.model, loss=task.loss_fn, device=task.device, fields=fields)
        out.param_names = list(task.param_names)
        out.layers = task.layers
        out.loss_kind, out.gradients = task.loss_kind, task.gradients
        out._loss_checked = getattr(task, "_loss_checked", True)
        return out


def task_for_tokens(
    task: AttributionTask | nn.Module, fields: Sequence[str] = DEFAULT_FIELDS, loss="classification"
) -> AttributionTask:
    """The task that reads packed token rows (:func:`ggda.data.text.pack_tokens`) for ``task``.

    A :class:`TextClassificationTask`, a model that takes packed rows itself (``ggda_packed_input``)
    or a task subclass with its own ``forward`` is returned as is; a plain task (or a bare model)
    of a Hugging Face-style model becomes a :class:`TextClassificationTask` with the same settings,
    so its forward unpacks ``input_ids``/``attention_mask`` instead of feeding packed floats to
    the embedding layer.
    """
    if isinstance(task, nn.Module):
        if getattr(task, "ggda_packed_input", False):
            return AttributionTask(task, loss=loss)
        return TextClassificationTask(task, loss=loss, fields=fields)
    if isinstance(task, TextClassificationTask) or getattr(task.model, "ggda_packed_input", False):
        return task
    if type(task).forward is not AttributionTask.forward:  # the user's own forward decides
        return task
    return TextClassificationTask.from_task(task, fields)
