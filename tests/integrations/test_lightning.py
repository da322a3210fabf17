"""The PyTorch Lightning callback records the trajectory ggda's TracIn needs (issue 19, item 7).

A small MLP LightningModule is trained for 2 epochs on 64 synthetic points with a per-step
linear decay of the learning rate (stepped by Lightning *before* ``on_train_batch_end``, so the
callback must read the rate at ``on_before_optimizer_step``). Checked: saved tensors are the
parameters at the scheduled steps, rates are the ones each step used, and TracIn on the loaded
checkpoints equals Σ_c η_c ⟨∇ℓ(test; θ_c), ∇ℓ(train; θ_c)⟩ computed here with autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip(
    "lightning.pytorch", reason="PyTorch Lightning is not installed: pip install 'ggda[lightning]'"
)

from ggda.integrations import load_checkpoints, read_index  # noqa: E402
from ggda.integrations.lightning import GGDACheckpointCallback  # noqa: E402
from ggda.methods import make_method  # noqa: E402
from ggda.properties import ExampleLoss  # noqa: E402
from ggda.task import AttributionTask  # noqa: E402

N, D, BATCH, EPOCHS, LR = 64, 6, 16, 2, 0.1
STEPS = EPOCHS * N // BATCH


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 3))
        self.seen_lrs: dict[int, float] = {}
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen_lrs[self.global_step + 1] = self.optimizers().param_groups[0]["lr"]  # the rate used
        return nn.functional.cross_entropy(self(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.states[self.global_step] = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=LR)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / STEPS)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    X = torch.randn(N, D)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 1).long()
    module = Classifier()
    root = tmp_path_factory.mktemp("pl")
    callbacks = [
        GGDACheckpointCallback(root / "steps", every=3, unit="step"),
        GGDACheckpointCallback(root / "epochs"),
    ]
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(X, y), batch_size=BATCH, shuffle=True))
    module.eval()
    return module, X, y, root


def test_checkpoints_are_the_parameters_and_rates_are_the_steps(trained):
    module, _, _, root = trained
    assert sorted(module.states) == list(range(1, STEPS + 1))
    for run, steps in (("steps", [3, 6, 8]), ("epochs", [4, 8])):
        entries = read_index(root / run)["checkpoints"]
        assert [e["step"] for e in entries] == steps
        for e in entries:
            assert e["lr"] == pytest.approx(module.seen_lrs[e["step"]], rel=1e-12)
            assert e["lr"] == pytest.approx(LR * (1 - (e["step"] - 1) / STEPS), rel=1e-9)
            assert e["complete"] is True
            saved = torch.load(root / run / e["file"], weights_only=True)["state_dict"]
            assert set(saved) == set(module.state_dict())
            for k, v in saved.items():
                assert torch.equal(v, module.states[e["step"]][k]), (run, e["step"], k)
    assert [e["epoch"] for e in read_index(root / "epochs")["checkpoints"]] == [1.0, 2.0]


def test_tracin_on_lightning_checkpoints_is_the_brute_force_sum(trained):
    import copy

    module, X, y, root = trained
    checkpoints = load_checkpoints(root / "steps")  # complete: no model needed, files read lazily
    assert all(not isinstance(state, dict) for state, _ in checkpoints)
    task = AttributionTask(module, loss=nn.CrossEntropyLoss(reduction="none"))
    targets = (X[:4].numpy(), y[:4].numpy())
    scores = (
        make_method("tracin", task, checkpoints=checkpoints)
        .cache((X.numpy(), y.numpy()))
        .attribute(ExampleLoss(*targets))
    )

    def grads(model, xs, ys):
        rows = []
        for i in range(len(xs)):
            loss = nn.functional.cross_entropy(model(xs[i : i + 1]), ys[i : i + 1])
            rows.append(
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
            )
        return torch.stack(rows).double()

    expected = torch.zeros(4, N, dtype=torch.float64)
    for path, lr in checkpoints:
        at = copy.deepcopy(module)
        at.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        expected += lr * grads(at, X[:4], y[:4]) @ grads(at, X, y).T
    assert np.allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-6 * expected.abs().max().item())
