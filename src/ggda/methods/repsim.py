"""RepSim: similarity of hidden representations, the cheap non-gradient baseline.

The representation h(x) is the *input of the model's last parametrised layer* (the penultimate
activations of an MLP/CNN head), captured with a forward hook; ``layer=`` picks another module and
``hook="output"`` takes its output instead. One no-grad forward pass over the training set is all
it costs — no gradients, no Hessian — which is why it is the usual baseline (Hanawa et al., 2021).

Group representation: h_S = Σ_{i∈S} h(x_i). Scores, by ``similarity``:

* ``cosine`` (default): cos(h(z), h_S), the cosine with the group's summed representation. Cosine is
  scale-free, so the sum and the mean (centroid) give the same score. **Not additive**: a group's
  score is not the sum of its members' scores; singletons give per-point RepSim.
* ``dot``: h(z)ᵀ h_S = Σ_{i∈S} h(z)ᵀh(x_i) — additive (group = sum of members); with
  ``aggregate="mean"`` it is the dot product with the centroid.
* ``member-cosine``: Σ_{i∈S} cos(h(z), h(x_i)) — member-normalised and additive.

Sign: a similarity, read as "positive = helpful" (training points that look like the target support
its prediction). It is a heuristic, not a counterfactual estimate: it does not see labels or the
loss, so it cannot tell a helpful near neighbour from a mislabelled one.

Targets: the property's target examples (test-loss, margin: one row per example). For
mean-test-loss the row is the mean over its examples of the per-example scores. A callable property
has no examples to represent, so RepSim refuses it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ggda.errors import GGDAError
from ggda.methods.base import Attributor, register
from ggda.models.capture import Capture
from ggda.properties import ExampleProperty, MeanLoss, Property
from ggda.task import AttributionTask

SIMILARITIES = ("cosine", "dot", "member-cosine")
HOOKS = ("input", "output")


def last_layer_name(model: nn.Module) -> str:
    """Name of the last module (in registration order) that owns parameters directly.

    A bare layer (``nn.Linear(d, C)``: the model *is* its only parametrised module) gives ``""``,
    the model itself, whose input is the raw example."""
    names = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not names:
        raise GGDAError("RepSim found no layer with parameters; pass layer=NAME of a module to hook.")
    return names[-1]


@register("repsim")
class RepSim(Attributor):
    """RepSim: cosine/dot similarity of hidden representations (last layer's input by default).

    Args:
        layer: module name to hook (see ``model.named_modules()``); default the last layer with
            parameters.
        hook: ``input`` (default) or ``output`` of that module.
        similarity: ``cosine``, ``dot`` or ``member-cosine`` (module docstring).
        batch_size: rows per forward pass.
    """

    #: Read by noisy-label detection (:func:`ggda.evaluate.noisy_labels.detect_by_self_influence`).
    self_influence_note = (
        "RepSim compares representations only; it sees neither labels nor the loss, so a flipped "
        "label cannot change its self-similarity and it has no self-influence to rank by."
    )

    def __init__(
        self,
        task: AttributionTask,
        layer: str | None = None,
        hook: str = "input",
        similarity: str = "cosine",
        batch_size: int = 1024,
        aggregate: str = "sum",
        max_batch: int = 2048,
        memory_mb: float = 1024.0,
    ) -> None:
        super().__init__(task, aggregate=aggregate, max_batch=max_batch, memory_mb=memory_mb)
        if similarity not in SIMILARITIES:
            raise GGDAError(
                f"Unknown RepSim similarity '{similarity}'; choose one of {', '.join(SIMILARITIES)}."
            )
        if hook not in HOOKS:
            raise GGDAError(f"Unknown RepSim hook '{hook}'; choose input or output.")
        modules = dict(task.model.named_modules())
        self.layer = layer if layer is not None else last_layer_name(task.model)
        if self.layer not in modules or (layer is not None and not self.layer):
            raise GGDAError(
                f"RepSim: the model has no module '{layer}'; choose one of {[n for n in modules if n]}."
            )
        self.hook, self.similarity, self.batch_size = hook, similarity, int(batch_size)
        self.group_repr: torch.Tensor | None = None

    def representations(self, X: np.ndarray) -> torch.Tensor:
        """(n, d) representations h(x), float64, on the task's device."""
        module = dict(self.task.model.named_modules())[self.layer]
        params = self.task.params()
        with Capture([module]) as cap, torch.no_grad():
            for start in range(0, len(X), self.batch_size):
                self.task.forward(params, self.task.batch(X[start : start + self.batch_size]))
        values = [call.input if self.hook == "input" else call.output for call in cap.calls[0]]
        return torch.cat([v.detach().reshape(v.shape[0], -1).double() for v in values])

    @staticmethod
    def _normalise(H: torch.Tensor) -> torch.Tensor:
        return H / H.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def _cache(self) -> None:
        H = self.representations(self.train.X)
        if self.similarity == "member-cosine":
            H = self._normalise(H)
        labels = torch.as_tensor(self.grouping.labels, device=H.device)
        groups = torch.zeros(self.grouping.n_groups, H.shape[1], dtype=H.dtype, device=H.device)
        self.group_repr = groups.index_add_(0, labels, H)

    def _attribute(self, prop: Property) -> np.ndarray:
        if isinstance(prop, MeanLoss):
            X, mean = prop.inner.X, True
        elif isinstance(prop, ExampleProperty):
            X, mean = prop.X, False
        else:
            raise GGDAError(
                "RepSim needs target examples to represent; use test-loss, margin or mean-test-loss."
            )
        R = self.representations(X)
        groups = self.group_repr
        if self.similarity != "dot":
            R = self._normalise(R)
        if self.similarity == "cosine":
            groups = self._normalise(groups)
        scores = R @ groups.T
        if mean:
            scores = scores.mean(0, keepdim=True)
        return scores.cpu().numpy()
