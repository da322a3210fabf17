"""Checkpoints recorded by someone else's training loop, in a directory ggda reads.

TracInCP sums η_c ∇f(θ_c)ᵀ g(θ_c) over saved states θ_c and their learning rates η_c, and TRAK
can ensemble over saved states: both need the training trajectory, which ggda's own loop records
(``ggda train``) but a model trained with the Hugging Face ``Trainer`` or PyTorch Lightning does
not. The callbacks in :mod:`ggda.integrations.hf_trainer` and :mod:`ggda.integrations.lightning`
drive one :class:`CheckpointRecorder`, which writes::

    RUN_DIR/ggda_checkpoints.json          the index: trainer, schedule, and per checkpoint its
                                           file, optimizer step, epoch and learning rate
    RUN_DIR/checkpoints/step_00000016.pt   a ggda model file (``load_state`` reads it): the saved
                                           state dict and meta {epoch, step, lr, complete}

and :func:`load_checkpoints` turns the directory into the ``(state, lr)`` pairs that
``make_method("tracin", task, checkpoints=...)`` and ``make_method("trak", task,
checkpoints=..., ensemble="checkpoints")`` take.

What is saved: every trainable parameter and every buffer (``params="trainable"``, the default),
or only the parameters under ``layers`` (name prefixes, as ``AttributionTask(layers=...)``
takes). Frozen parameters never change during training, so they are not written again at every
checkpoint; the loader fills them (and, with ``layers``, every parameter not saved) from the
model you pass — exact for frozen parameters, an approximation for trained ones that you chose
not to attribute through.

The learning rate recorded is the one of the optimizer step that produced the checkpoint (for an
epoch checkpoint, the epoch's last step), read from the optimizer before the scheduler moves it:
what ggda's own loop records. With several parameter groups of different rates (a lower rate for
a pretrained body than for a new head) each parameter's rate is recorded too (``param_lrs``,
parameter name -> rate): TracIn's step is then ``Σ_j η_j ∂f/∂θ_j ∂ℓ/∂θ_j``, one rate per
parameter, not the first group's rate for all. ``lr`` stays the first group's rate and
``group_lrs`` keeps every group's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ggda.errors import GGDAError
from ggda.io import read_json, save_json, save_torch
from ggda.models.checkpoint import learning_rate, load_state
from ggda.options import COUNT, Spec, check

__all__ = ["INDEX_FILE", "CheckpointRecorder", "SavedCheckpoint", "load_checkpoints", "read_index"]

INDEX_FILE = "ggda_checkpoints.json"
FORMAT = "ggda-trainer-checkpoints"
UNITS = ("epoch", "step")


class SavedCheckpoint(NamedTuple):
    """One recorded state: ``state`` is a checkpoint file (a complete state dict, loaded when a
    method needs it) or an in-memory state dict (a partial one, completed from your model), and
    ``lr`` its learning rate — or ``{parameter name: rate}`` when the optimizer's parameter groups
    had different rates. A pair, so TracIn and TRAK take it as it is."""

    state: Path | dict[str, torch.Tensor]
    lr: float | dict[str, float]


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP/accelerate wrapper (its state-dict keys carry no prefix)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _selected_keys(model: nn.Module, layers: list[str] | None) -> list[str]:
    """State-dict keys to save: buffers, and the trainable parameters (under ``layers`` if given)."""
    params = dict(model.named_parameters(remove_duplicate=False))

    def chosen(name: str) -> bool:
        if not params[name].requires_grad:
            return False
        return layers is None or any(name == s or name.startswith(s + ".") for s in layers)

    keys = [k for k in model.state_dict() if k not in params or chosen(k)]
    if not any(k in params for k in keys):
        what = f"under layers {layers}" if layers is not None else "that are trainable"
        raise GGDAError(
            f"The model has no parameters {what}; choose layers from {[n for n in params][:8]} ..."
        )
    return keys


class CheckpointRecorder:
    """Writes checkpoints and learning rates of a training run into ``run_dir`` (see the module).

    Args:
        run_dir: the directory to write (created; an index already there is replaced when
            training begins).
        every: save every ``every`` epochs (``unit="epoch"``) or optimizer steps (``"step"``).
        unit: ``"epoch"`` or ``"step"``.
        layers: parameter name prefixes to save (default: every trainable parameter).
        final: also save the state at the end of training if the schedule missed it (ggda's own
            loop always saves the last epoch: TracIn's sum then ends at the final model).
        trainer: a label written into the index.
    """

    def __init__(
        self,
        run_dir: str | Path,
        every: int = 1,
        unit: str = "epoch",
        layers: Iterable[str] | None = None,
        final: bool = True,
        trainer: str = "custom",
    ) -> None:
        from ggda.outputs import check_output_dir

        self.run_dir = check_output_dir(run_dir, flag="run_dir")
        self.every = check("every", every, COUNT)
        self.unit = check("unit", unit, Spec(str, choices=UNITS))
        self.layers = None if layers is None else [str(s) for s in layers]
        self.final = bool(final)
        self.trainer = trainer
        self.entries: list[dict[str, Any]] = []
        self.lr: float | None = None
        self.group_lrs: list[float] = []
        # rate of each parameter (by id) at the last noted step, when the groups' rates differ
        self.rates_by_id: dict[int, float] | None = None

    # -- what the callbacks call --------------------------------------------------------------
    def begin(self, resume_step: int = 0) -> None:
        """Start a trajectory. A fresh run (``resume_step=0``) forgets the entries of an earlier
        run into the same directory; a run resumed at optimizer step ``resume_step`` keeps the
        recorded entries up to that step (the trajectory it continues)."""
        self.entries = []
        if resume_step > 0 and (self.run_dir / INDEX_FILE).exists():
            self.entries = [e for e in read_index(self.run_dir)["checkpoints"] if e["step"] <= resume_step]
        self.lr = None
        self._write_index()

    def note_lr(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Remember the learning rate of the step the optimizer takes now (call it around
        ``optimizer.step()``, before the scheduler moves the rate)."""
        if optimizer is None or not getattr(optimizer, "param_groups", None):
            return
        self.group_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.lr = self.group_lrs[0]
        self.rates_by_id = None
        if len(set(self.group_lrs)) > 1:  # read now: the scheduler moves the rates after the step
            self.rates_by_id = {id(q): float(g["lr"]) for g in optimizer.param_groups for q in g["params"]}

    def due(self, count: int, unit: str) -> bool:
        """Whether the ``count``-th epoch or step (by ``unit``) is on the schedule."""
        return unit == self.unit and count > 0 and count % self.every == 0

    @property
    def last_step(self) -> int | None:
        return self.entries[-1]["step"] if self.entries else None

    def save(
        self, model: nn.Module, step: int, epoch: float, optimizer: torch.optim.Optimizer | None = None
    ) -> Path:
        """Write the state at optimizer step ``step`` with the last noted learning rate (or the
        optimizer's current one when none was noted) and update the index."""
        if self.lr is None:
            self.note_lr(optimizer)
        if self.lr is None:
            raise GGDAError(
                "No learning rate is known for this checkpoint; pass the optimizer (or call note_lr) "
                "before saving."
            )
        model = _unwrap(model)
        keys = _selected_keys(model, self.layers)
        state = model.state_dict()
        saved = {k: state[k].detach().cpu().clone() for k in keys}
        complete = len(saved) == len(state)
        rel = Path("checkpoints") / f"step_{int(step):08d}.pt"
        meta = {"epoch": float(epoch), "step": int(step), "lr": self.lr, "complete": complete}
        if self.rates_by_id is not None:  # parameters in no group are left out: nothing moves them
            meta["param_lrs"] = {
                n: self.rates_by_id[id(q)] for n, q in model.named_parameters() if id(q) in self.rates_by_id
            }
        (self.run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        save_torch(self.run_dir / rel, {"spec": None, "state_dict": saved, "meta": meta})
        self.entries = [e for e in self.entries if e["step"] != int(step)]
        self.entries.append({"file": rel.as_posix(), **meta, "group_lrs": list(self.group_lrs)})
        self._write_index()
        return self.run_dir / rel

    def _write_index(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_json(
            self.run_dir / INDEX_FILE,
            {
                "format": FORMAT,
                "version": 1,
                "trainer": self.trainer,
                "unit": self.unit,
                "every": self.every,
                "layers": self.layers,
                "checkpoints": self.entries,
            },
        )


def read_index(run_dir: str | Path) -> dict[str, Any]:
    """The index of a directory written by a ggda trainer callback (``ggda_checkpoints.json``)."""
    run_dir = Path(run_dir)
    path = run_dir / INDEX_FILE
    fix = "record the training run again with a ggda checkpoint callback."
    try:
        index = read_json(path, fix)
    except FileNotFoundError:
        raise GGDAError(
            f"{run_dir} holds no {INDEX_FILE}; pass the run_dir given to GGDACheckpointCallback."
        ) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise GGDAError(f"{path} is not a ggda checkpoint index; {fix}")
    entries = index.get("checkpoints")
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and {"file", "step", "epoch", "lr"} <= set(e) for e in entries
    ):
        raise GGDAError(f"{path} has a malformed checkpoint list; {fix}")
    return index


def load_checkpoints(run_dir: str | Path, model: nn.Module | None = None) -> list[SavedCheckpoint]:
    """The recorded checkpoints of ``run_dir`` in training order, as ``(state, lr)`` pairs.

    Pass them to ``make_method("tracin", task, checkpoints=...)`` or
    ``make_method("trak", task, checkpoints=..., ensemble="checkpoints")``. A complete checkpoint
    comes back as its file (read when the method reaches it); a partial one (frozen parameters
    not saved, or ``layers``) as a state dict completed from ``model`` (the model the task
    attributes: same architecture), which is then required.
    """
    run_dir = Path(run_dir)
    index = read_index(run_dir)
    if not index["checkpoints"]:
        raise GGDAError(f"{run_dir} records no checkpoints yet; train with the callback first.")
    own = None if model is None else _unwrap(model).state_dict()
    out = []
    for entry in sorted(index["checkpoints"], key=lambda e: e["step"]):
        path = run_dir / entry["file"]
        lr = learning_rate(entry.get("param_lrs", entry["lr"]), str(path))
        if entry.get("complete", False):
            out.append(SavedCheckpoint(path, lr))
            continue
        if own is None:
            raise GGDAError(
                f"{path} holds only part of the model (frozen or unselected parameters are not saved); "
                "pass model=<the trained model> to load_checkpoints to complete it."
            )
        saved = load_state(path)["state_dict"]
        unknown = [k for k in saved if k not in own]
        if unknown:
            raise GGDAError(
                f"{path} holds parameters the model lacks ({unknown[:3]}); pass the model it was trained as."
            )
        out.append(SavedCheckpoint({**own, **saved}, lr))
    return out
