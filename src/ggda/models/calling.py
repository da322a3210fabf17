"""How a batch reaches a model, in one place: ``model(x)``, ``model(*x)`` or ``model(**x)``.

Why one place: the attribution task's functional forward, the training loop, prediction and the
retraining jobs must all call a user's model the way the user's own code does, or a model fed
token ids and attention masks (a dict) would see different inputs in different stages.

Hugging Face encoders (BERT-style, bidirectional attention) build their attention mask from the
0/1 padding mask with data-dependent branches (``transformers.masking_utils`` asks
``padding_mask.all()`` to skip the mask), which ``torch.func.vmap`` (per-example gradients)
cannot trace. They also accept a ready 4-D additive mask as is, and that mask gives the same
outputs. :func:`expands_padding_mask` decides, once per model, whether the 4-D mask is safe —
by running the model both ways on a small synthetic padded batch and comparing (a causal
decoder, or a model that reads the 4-D mask differently, disagrees and keeps its own mask) — and
:func:`call_args` then hands such models the 4-D mask built by :func:`extended_attention_mask`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ggda.errors import GGDAError

#: The padding-mask keyword of Hugging Face models.
MASK_KEY = "attention_mask"


def extended_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(…, L) 0/1 padding mask → (…, 1, L, L) additive mask (0 keep, dtype-min drop).

    transformers passes a 4-D mask through unchanged; building it here keeps the forward free of
    data-dependent branches, so it can be vmapped.
    """
    m = mask.to(dtype)[..., None, None, :]
    length = mask.shape[-1]
    return ((1.0 - m) * torch.finfo(dtype).min).expand(*mask.shape[:-1], 1, length, length)


def is_hf_model(model: nn.Module) -> bool:
    """A ``transformers`` model: a ``config`` with a ``model_type`` and a token-id main input."""
    config = getattr(model, "config", None)
    return (
        config is not None
        and isinstance(getattr(config, "model_type", None), str)
        and getattr(model, "main_input_name", None) == "input_ids"
    )


def _probe_batch(model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """Two rows of 6 token ids, the second padded after 3 tokens (ids < the vocabulary size)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise ValueError("no vocabulary size")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, min(vocab, 1000), (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    return {"input_ids": ids.to(device), MASK_KEY: mask.to(device)}


def expands_padding_mask(model: nn.Module) -> bool:
    """Whether ``model`` (a Hugging Face encoder) gives the same outputs when its 0/1 padding mask
    is replaced by the 4-D additive mask; checked once on a synthetic padded batch, cached on the
    model. ``False`` for anything that is not a Hugging Face model, or when the outputs differ."""
    cached = getattr(model, "_ggda_mask_4d", None)
    if cached is not None:
        return bool(cached)
    ok = False
    if is_hf_model(model):
        try:
            param = next(model.parameters())
            probe = _probe_batch(model, param.device)
            dtype = param.dtype if param.is_floating_point() else torch.float32
            with torch.no_grad():
                own = model_output(model(**probe))
                ext = dict(probe, **{MASK_KEY: extended_attention_mask(probe[MASK_KEY], dtype)})
                ours = model_output(model(**ext))
            tol = max(1e-4, 10 * torch.finfo(own.dtype).eps)  # half precision: looser
            ok = own.shape == ours.shape and bool(torch.allclose(own, ours, rtol=tol, atol=tol / 10))
        except Exception:  # noqa: BLE001 - any failure: the model keeps its own mask handling
            ok = False
    try:  # cached on the model: copies (checkpoints, workers) keep the decision
        model._ggda_mask_4d = ok  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a module that refuses attributes is probed again next time
        pass
    return ok


def call_args(batch: Any, mask_dtype: torch.dtype | None = None) -> tuple[tuple, dict]:
    """(args, kwargs) of a model call on ``batch``: a dict becomes keywords, a tuple positionals.

    ``mask_dtype``: replace a dict batch's 0/1 ``attention_mask`` by the 4-D additive mask of that
    dtype (for models where :func:`expands_padding_mask` holds)."""
    if isinstance(batch, dict):
        kwargs = dict(batch)
        mask = kwargs.get(MASK_KEY)
        if mask_dtype is not None and isinstance(mask, torch.Tensor) and not mask.is_floating_point():
            if mask.ndim <= 2:  # (L,) per example under vmap, (B, L) per batch; 4-D masks stay
                kwargs[MASK_KEY] = extended_attention_mask(mask, mask_dtype)
        return (), kwargs
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def model_output(out: Any) -> torch.Tensor:
    """The output tensor of a model call: Hugging Face outputs give ``.logits``, tuples their first."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise GGDAError(
        f"The model returned {type(out).__name__}; return a tensor (or an object with .logits), or "
        "subclass AttributionTask and override forward()."
    )


def is_forward_ad_attention_error(exc: BaseException) -> bool:
    """PyTorch's fused attention kernels (SDPA) have no forward-mode AD rule: the error JVPs
    (influence-function curvature products) hit on a Hugging Face model with ``sdpa`` attention."""
    text = str(exc)
    return "forward AD" in text and "attention" in text


def use_eager_attention(model: nn.Module) -> bool:
    """Switch a Hugging Face model to ``eager`` attention (the same function, written with plain
    matmuls that forward-mode AD and ``vmap`` differentiate); ``False`` when it cannot switch."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        return False
    try:
        setter("eager")
    except Exception:  # noqa: BLE001 - a model that refuses: the caller says how to load it instead
        return False
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == "eager"


def attention_forward_ad_notice(model: nn.Module) -> None:
    """After :func:`use_eager_attention` succeeded: say once what was changed on the user's model."""
    warnings.warn(
        f"{type(model).__name__}: switched attention to attn_implementation='eager' (SDPA has no "
        "forward-mode derivative, which curvature products need); the outputs are the same.",
        RuntimeWarning,
        stacklevel=3,
    )


def eager_attention_error(model: nn.Module) -> GGDAError:
    """The one-line error when a model's attention has no forward-mode derivative and cannot be switched."""
    return GGDAError(
        f"{type(model).__name__}'s attention (SDPA) has no forward-mode derivative, which curvature "
        'products need; load the model with attn_implementation="eager" (e.g. '
        'AutoModelForSequenceClassification.from_pretrained(..., attn_implementation="eager")).'
    )


def is_vmap_branch_error(exc: BaseException) -> bool:
    """``torch.func.vmap`` met data-dependent control flow (``if mask.all():``, ``.item()``)."""
    return "vmap" in str(exc) and "data-dependent control flow" in str(exc)


def vmap_branch_error(model: nn.Module) -> GGDAError:
    """The one-line error for a model whose forward branches on its inputs under ``vmap``."""
    return GGDAError(
        f"{type(model).__name__}'s forward branches on its input values, which per-example gradients "
        "(torch.func.vmap) cannot trace; subclass AttributionTask and override forward() to build such "
        "values without branches (a padding mask: ggda.models.calling.extended_attention_mask)."
    )


def call_model(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model`` applied to one batch, as the user's own loop would call it."""
    args, kwargs = call_args(batch)
    return model_output(model(*args, **kwargs))
