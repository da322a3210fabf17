"""Feature spaces the clustering groupings work in (GGDA §A4).

* :func:`input_features` — standardised, flattened inputs (K-Means);
* :func:`representation_features` — a hidden representation of the trained model, by default
  the input of its output layer (Repr-K-Means);
* :func:`last_layer_gradients` — per-example gradients of the training loss w.r.t. the output
  layer's weight and bias (Grad-K-Means, default). For an ``nn.Linear`` output layer
  o = W h + b the gradient is δ ⊗ [h, 1] with δ = ∂ℓ/∂o, so no per-example backward is needed:
  δ = softmax(o) − onehot(y) for cross-entropy and o − y for squared error in closed form, and
  one batched backward to the layer's *outputs* for any other loss;
* :func:`logit_gradients` — δ alone ("activation gradients", the cheapest gradient feature);
* :func:`projected_gradients` — per-example gradients of *all* attributed parameters through a
  seeded Gaussian random projection, computed in chunks so the (n × p) matrix never exists.

All of them return float32 NumPy arrays (n, d) ready for scikit-learn, and run on ``task.device``.
The model-based ones read the data exactly as attribution does — ``task.to_tensor`` batches
(:func:`task_batches`) fed to ``task.forward`` — so in-memory arrays, lazy torch / Hugging Face
inputs and packed token rows (decoded by the token task's forward) take one path. Input K-Means
refuses non-float inputs (token ids): ``KMEANS_ON_IDS`` says to use repr- or grad-kmeans.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ggda.data.batches import ExampleInputs, iter_rows
from ggda.errors import GGDAError
from ggda.models.capture import Capture
from ggda.task import AttributionTask

GRADIENT_FEATURES = ("last-layer", "logits", "projected")


#: Lazy inputs wider than this are clustered through a seeded Gaussian projection to this width
#: (distances kept up to a small distortion), so K-Means on images never holds the n × d inputs.
LAZY_INPUT_DIM = 256


#: Why K-Means on the inputs is refused for token ids and other non-feature inputs, and what to use.
KMEANS_ON_IDS = (
    "K-Means on the inputs would cluster raw token ids or other non-float inputs, not features; use "
    "repr-kmeans (the model's representation) or grad-kmeans (its loss gradients) instead."
)


def _lazy_input_features(X: ExampleInputs, batch_size: int = 1024) -> np.ndarray:
    parts, proj = [], None
    for _, batch in X.iter_batches(batch_size):
        if not isinstance(batch, torch.Tensor):
            raise GGDAError(
                "K-Means on inputs needs one float tensor per example; these inputs are tuples/dicts "
                "(token ids and masks?): use repr-kmeans or grad-kmeans instead."
            )
        if not batch.is_floating_point():
            raise GGDAError(KMEANS_ON_IDS)
        F = batch.reshape(len(batch), -1).float()
        if F.shape[1] > LAZY_INPUT_DIM:
            if proj is None:
                gen = torch.Generator().manual_seed(0)
                proj = torch.randn(F.shape[1], LAZY_INPUT_DIM, generator=gen) / LAZY_INPUT_DIM**0.5
            F = F @ proj
        parts.append(F.numpy())
    return np.concatenate(parts)


def input_features(X: np.ndarray, standardize: bool = True) -> np.ndarray:
    """Flattened inputs, z-scored per column (constant columns become 0) so no feature dominates.

    Lazy inputs are read a batch at a time (projected to ``LAZY_INPUT_DIM`` when wider)."""
    if isinstance(X, ExampleInputs):
        F = _lazy_input_features(X)
    else:
        F = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
    if not standardize:
        return np.ascontiguousarray(F)
    mean = F.mean(axis=0, dtype=np.float64)
    std = F.std(axis=0, dtype=np.float64)
    std[std < 1e-12] = 1.0
    return np.ascontiguousarray(((F - mean) / std).astype(np.float32))


# -- layers -------------------------------------------------------------------------------------
@dataclass
class OutputLayer:
    """The last ``nn.Linear`` the forward pass runs; ``direct`` when its output *is* the model output."""

    name: str
    module: nn.Linear
    direct: bool


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def find_output_layer(task: AttributionTask, X: np.ndarray) -> OutputLayer:
    """Find the output layer by running the model on two examples with hooks (execution order, not
    definition order, decides which ``nn.Linear`` is last)."""
    linear = [(name, m) for name, m in task.model.named_modules() if isinstance(m, nn.Linear)]
    _, head, _ = next(task_batches(task, X, None, 2))
    with Capture([m for _, m in linear]) as cap, torch.no_grad():
        output = task.forward(task.params(), head)
    if not cap.order:
        raise GGDAError(
            "The model has no nn.Linear layer, so last-layer gradients are undefined; "
            "use features='projected' (all parameters through a random projection)."
        )
    i, call = cap.order[-1]
    name, module = linear[i]
    return OutputLayer(name, module, direct=call.output is output)


def _named_module(model: nn.Module, layer: str) -> nn.Module:
    modules = _modules(model)
    if layer not in modules or layer == "":
        names = [n for n in modules if n]
        raise GGDAError(f"Layer '{layer}' is not in the model; choose one of {names}.")
    return modules[layer]


def task_batches(
    task: AttributionTask, X, y: np.ndarray | None = None, chunk_size: int = 2048
) -> Iterator[tuple[slice, object, torch.Tensor | None]]:
    """``(rows, inputs, targets)`` chunks exactly as the task batches them (``task.to_tensor``):
    the one path for in-memory arrays, lazy torch/Hugging Face inputs and packed token rows, so
    every feature is computed on what ``task.forward`` is given in attribution."""
    Xt, yt = task.to_tensor(X, y)
    for rows, xb in iter_rows(Xt, chunk_size):
        yield rows, xb, None if yt is None else yt[rows]


# -- representations ----------------------------------------------------------------------------
def representation_features(
    task: AttributionTask, X: np.ndarray, layer: str | None = None, chunk_size: int = 4096
) -> np.ndarray:
    """Hidden representation per example.

    ``layer=None``: the *input* of the output layer (the penultimate representation, what
    "representation" means in Repr-K-Means). ``layer="name"``: the *output* of that module
    (``model.named_modules()`` name, e.g. ``"1"`` in an ``nn.Sequential`` or ``"fc1"``), flattened.
    """
    if layer is None:
        module, take_input = find_output_layer(task, X).module, True
    else:
        module, take_input = _named_module(task.model, layer), False
    store: list[torch.Tensor] = []
    for _, xb, _ in task_batches(task, X, None, chunk_size):
        with Capture([module]) as cap, torch.no_grad():
            task.forward(task.params(), xb)
        call = cap.last(0)
        t = call.input if take_input else call.output
        if not isinstance(t, torch.Tensor):
            raise GGDAError(f"Layer '{layer}' does not produce a tensor; choose another layer.")
        store.append(t.detach().reshape(t.shape[0], -1).float().cpu())
    return np.ascontiguousarray(torch.cat(store).numpy())


# -- output-layer gradients ---------------------------------------------------------------------
def _closed_form_delta(task: AttributionTask, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """∂ℓ/∂o for the library's own losses without autograd; ``None`` for any other loss."""

    if task.loss_kind == "cross-entropy":
        delta = torch.softmax(out, dim=1)
        delta[torch.arange(len(y), device=out.device), y.long()] -= 1.0
        return delta
    if task.loss_kind == "squared-error":
        return out - y.to(out.dtype).reshape(out.shape)
    return None


def _layer_io_and_delta(
    task: AttributionTask, module: nn.Linear, direct: bool, Xb, yb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, δ) of one chunk: the layer input and ∂ℓ_i/∂o_i (per example, since losses are per example)."""
    # the output becomes a leaf: downstream layers see it, so autograd stops at this layer
    if direct:
        with Capture([module], mode="leaf") as cap, torch.no_grad():
            out = task.forward(task.params(), Xb)
        delta = _closed_form_delta(task, out, yb)
        if delta is not None:
            return cap.last(0).input, delta.detach()
    with Capture([module], mode="leaf") as cap, torch.enable_grad():
        out = task.forward(task.params(), Xb)
        total = task.loss_fn(out, yb).sum()  # Σ_i ℓ_i: its gradient w.r.t. o_i is ∂ℓ_i/∂o_i
        (delta,) = torch.autograd.grad(total, cap.last(0).output)
    return cap.last(0).input, delta.detach()


def last_layer_gradients(
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    layer: str | None = None,
    chunk_size: int = 2048,
    projection_dim: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Per-example gradients of the training loss w.r.t. one ``nn.Linear`` layer's (weight, bias).

    Row i is δ_i ⊗ h_i (flattened like ``weight``, C·H entries) followed by δ_i (the bias part),
    the same order as ``task.flatten`` of an autograd gradient of that layer. ``layer=None`` is
    the output layer, where δ has a closed form for cross-entropy and squared error; other
    layers/losses get δ from one batched backward to the layer's outputs (still exact).
    ``projection_dim`` optionally projects the rows (seeded Gaussian) to that many dimensions.
    """
    if layer is None:
        found = find_output_layer(task, X)
        module, direct = found.module, found.direct
    else:
        module = _named_module(task.model, layer)
        if not isinstance(module, nn.Linear):
            raise GGDAError(
                f"Layer '{layer}' is a {type(module).__name__}, not an nn.Linear; choose a Linear layer "
                "or use features='projected'."
            )
        found = find_output_layer(task, X)
        direct = found.direct and found.module is module
    has_bias = module.bias is not None
    dim_in = module.out_features * (module.in_features + int(has_bias))
    projector = None if projection_dim is None else GaussianProjector(dim_in, projection_dim, seed, task)
    parts = []
    for _, xb, yb in task_batches(task, X, y, chunk_size):
        h, delta = _layer_io_and_delta(task, module, direct, xb, yb)
        if h.ndim != 2:
            raise GGDAError(
                f"The layer's input has shape {tuple(h.shape)}; closed-form gradients need one vector per "
                "example. Use features='projected'."
            )
        G = (delta[:, :, None] * h[:, None, :]).reshape(len(h), -1)
        if has_bias:
            G = torch.cat([G, delta], dim=1)
        parts.append((G if projector is None else projector(G)).float().cpu())
    return np.ascontiguousarray(torch.cat(parts).numpy())


def logit_gradients(
    task: AttributionTask, X: np.ndarray, y: np.ndarray, chunk_size: int = 4096
) -> np.ndarray:
    """δ_i = ∂ℓ_i/∂o_i at the output layer (C numbers per example): the "activation gradient"."""
    found = find_output_layer(task, X)
    parts = [
        _layer_io_and_delta(task, found.module, found.direct, xb, yb)[1].float().cpu()
        for _, xb, yb in task_batches(task, X, y, chunk_size)
    ]
    return np.ascontiguousarray(torch.cat(parts).numpy())


# -- random projections -------------------------------------------------------------------------
class GaussianProjector:
    """x ↦ x P / √d with P (D × d) i.i.d. N(0, 1), generated in seeded row blocks.

    Block j of P comes from its own generator seeded by (seed, j), so P is the same whether it is
    kept (when D·d fits ``memory_mb``) or regenerated block by block for every chunk (very wide
    models), and the projection never needs the full P in memory. Distances are preserved in
    expectation (Johnson–Lindenstrauss), which is all K-Means needs.
    """

    BLOCK = 8192

    def __init__(self, dim_in: int, dim_out: int, seed: int, task: AttributionTask, memory_mb: float = 256.0):
        if dim_out < 1:
            raise GGDAError(f"projection_dim must be a positive integer; got {dim_out}.")
        self.dim_in, self.dim_out, self.seed = dim_in, dim_out, seed
        self.device, self.dtype = task.device, task.dtype
        keep = dim_in * dim_out * 4 <= memory_mb * 2**20
        self.full = torch.cat(list(self._blocks())) if keep else None

    def _blocks(self) -> Iterator[torch.Tensor]:
        for j, start in enumerate(range(0, self.dim_in, self.BLOCK)):
            rows = min(self.BLOCK, self.dim_in - start)
            gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + j)
            yield torch.randn(rows, self.dim_out, generator=gen, device=self.device, dtype=self.dtype)

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        if self.full is not None:
            out = G @ self.full
        else:
            out = torch.zeros(len(G), self.dim_out, device=G.device, dtype=G.dtype)
            for start, block in zip(range(0, self.dim_in, self.BLOCK), self._blocks(), strict=True):
                out += G[:, start : start + len(block)] @ block
        return out / self.dim_out**0.5


def projected_gradients(
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    projection_dim: int = 512,
    seed: int = 0,
    memory_mb: float = 256.0,
) -> np.ndarray:
    """Per-example gradients of all attributed parameters, randomly projected to ``projection_dim``.

    Gradients come from :func:`~ggda.gradients.iter_per_example_gradients` in chunks sized so a
    chunk's (rows × p) block stays within ``memory_mb``; each chunk is projected and dropped.
    """
    from ggda.gradients import iter_per_example_gradients

    p = task.n_params
    rows = int(max(1, min(1024, memory_mb * 2**20 // (4 * p))))
    projector = GaussianProjector(p, projection_dim, seed, task, memory_mb)
    out = np.empty((len(X), projection_dim), dtype=np.float32)
    for sl, G in iter_per_example_gradients(task, X, y, chunk_size=rows):
        out[sl] = projector(G).float().cpu().numpy()
    return out


def gradient_features(
    task: AttributionTask,
    X: np.ndarray,
    y: np.ndarray,
    features: str = "last-layer",
    layer: str | None = None,
    projection_dim: int | None = None,
    seed: int = 0,
    chunk_size: int = 2048,
    memory_mb: float = 256.0,
) -> np.ndarray:
    """Dispatch on ``features`` (``last-layer``, ``logits`` or ``projected``) for Grad-K-Means."""
    if features == "last-layer":
        return last_layer_gradients(task, X, y, layer, chunk_size, projection_dim, seed)
    if layer is not None:
        raise GGDAError(f"layer= applies to features='last-layer' only; drop it for features='{features}'.")
    if features == "logits":
        return logit_gradients(task, X, y, chunk_size)
    if features == "projected":
        return projected_gradients(task, X, y, projection_dim or 512, seed, memory_mb)
    raise GGDAError(f"Unknown gradient features '{features}'; choose one of {', '.join(GRADIENT_FEATURES)}.")
