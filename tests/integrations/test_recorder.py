"""CheckpointRecorder and load_checkpoints without a framework: a plain PyTorch loop records its
trajectory; ``layers`` saves part of the model and the loader completes it; resuming keeps the
trajectory it continues; malformed directories are one error line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ggda.errors import GGDAError
from ggda.integrations import CheckpointRecorder, load_checkpoints, read_index
from ggda.methods import make_method
from ggda.properties import ExampleLoss
from ggda.task import AttributionTask


def train(recorder: CheckpointRecorder, steps: int, start: int = 0, seed: int = 0) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    decay = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    states = {}
    for step in range(start + 1, steps + 1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        recorder.note_lr(opt)
        opt.step()
        decay.step()
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
        if recorder.due(step, "step"):
            recorder.save(model, step, epoch=step / 4)
    return model, states


def test_a_plain_loop_records_layers_and_the_loader_completes_them(tmp_path):
    rec = CheckpointRecorder(tmp_path, every=2, unit="step", layers=["2"])
    rec.begin()
    model, states = train(rec, 6)
    entries = read_index(tmp_path)["checkpoints"]
    assert [e["step"] for e in entries] == [2, 4, 6]
    assert [e["lr"] for e in entries] == [0.2, 0.1, 0.05]  # StepLR halves after every 2 steps
    saved = torch.load(tmp_path / entries[0]["file"], weights_only=True)["state_dict"]
    assert set(saved) == {"2.weight", "2.bias"} and torch.equal(saved["2.weight"], states[2]["2.weight"])
    checkpoints = load_checkpoints(tmp_path, model)
    state, lr = checkpoints[0]
    assert lr == 0.2 and torch.equal(state["2.bias"], states[2]["2.bias"])
    assert torch.equal(state["0.weight"], model.state_dict()["0.weight"])  # not saved: from the model
    # TracIn through the saved layer: the states and rates reach the method
    task = AttributionTask(model, layers=["2"])
    X, y = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32), np.arange(10) % 3
    scores = (
        make_method("tracin", task, checkpoints=checkpoints)
        .cache((X, y))
        .attribute(ExampleLoss(X[:2], y[:2]))
    )
    by_hand = sum(
        lr * make_method("grad-dot", task.at(s)).cache((X, y)).attribute(ExampleLoss(X[:2], y[:2]))
        for s, lr in checkpoints
    )
    assert np.allclose(scores, by_hand, rtol=1e-5)
    with pytest.raises(GGDAError, match="lacks"):
        load_checkpoints(tmp_path, nn.Linear(4, 3))


def test_resuming_keeps_the_trajectory_and_a_fresh_run_replaces_it(tmp_path):
    rec = CheckpointRecorder(tmp_path, every=1, unit="step")
    rec.begin()
    train(rec, 3)
    again = CheckpointRecorder(tmp_path, every=1, unit="step")
    again.begin(resume_step=2)
    assert [e["step"] for e in read_index(tmp_path)["checkpoints"]] == [1, 2]
    again.begin()
    assert read_index(tmp_path)["checkpoints"] == []
    with pytest.raises(GGDAError, match="records no checkpoints"):
        load_checkpoints(tmp_path)


def test_a_file_as_run_dir_and_a_malformed_index_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(GGDAError, match="file"):
        CheckpointRecorder(tmp_path / "file")
    (tmp_path / "ggda_checkpoints.json").write_text(
        '{"format": "ggda-trainer-checkpoints", "checkpoints": [{}]}'
    )
    with pytest.raises(GGDAError, match="malformed"):
        load_checkpoints(tmp_path)
    (tmp_path / "ggda_checkpoints.json").write_text("{trunc")
    with pytest.raises(GGDAError, match="not valid JSON"):
        load_checkpoints(tmp_path)
