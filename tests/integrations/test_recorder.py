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


def train_two_rates(recorder: CheckpointRecorder, steps: int) -> nn.Module:
    """A body at a tenth of the head's rate (fine-tuning style), both halved by a scheduler."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.02}, {"params": model[2].parameters(), "lr": 0.2}]
    )
    decay = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    for step in range(1, steps + 1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        recorder.note_lr(opt)
        opt.step()
        decay.step()
        if recorder.due(step, "step"):
            recorder.save(model, step, epoch=step / 4)
    return model


def test_tracin_weighs_each_parameter_group_by_its_own_rate(tmp_path):
    rec = CheckpointRecorder(tmp_path, every=2, unit="step")
    rec.begin()
    model = train_two_rates(rec, 4)
    checkpoints = load_checkpoints(tmp_path)
    rates = [lr for _, lr in checkpoints]
    # the rates of the step that made each checkpoint, per parameter, before the scheduler moved them
    assert rates[0] == {"0.weight": 0.02, "0.bias": 0.02, "2.weight": 0.2, "2.bias": 0.2}
    assert rates[1]["0.weight"] == 0.01 and rates[1]["2.bias"] == 0.1
    assert [e["group_lrs"] for e in read_index(tmp_path)["checkpoints"]] == [[0.02, 0.2], [0.01, 0.1]]

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(7, 4)).astype(np.float32), np.arange(7) % 3
    Xt, yt = rng.normal(size=(2, 4)).astype(np.float32), np.array([0, 2])
    task = AttributionTask(model)
    scores = make_method("tracin", task, checkpoints=checkpoints).cache((X, y)).attribute(ExampleLoss(Xt, yt))

    # brute force: Σ_c Σ_θ η_c(θ) ∂ℓ_test/∂θ · ∂ℓ_i/∂θ, per-example autograd at each saved state
    def grads(net: nn.Module, x: np.ndarray, label: int) -> dict[str, torch.Tensor]:
        net.zero_grad()
        loss = nn.functional.cross_entropy(net(torch.as_tensor(x)[None]), torch.as_tensor([label]))
        loss.backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    by_hand = np.zeros((2, 7))
    for path, lr in checkpoints:
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        net.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        for t in range(2):
            gt = grads(net, Xt[t], int(yt[t]))
            for i in range(7):
                gi = grads(net, X[i], int(y[i]))
                by_hand[t, i] += sum(lr[n] * float((gt[n] * gi[n]).sum()) for n in gt)  # + = helpful
    assert np.allclose(scores, by_hand, rtol=1e-4, atol=1e-7)
    # the first group's rate for every parameter (the old behaviour) is measurably different
    one_rate = make_method("tracin", task, checkpoints=[(s, lr["0.weight"]) for s, lr in checkpoints])
    assert not np.allclose(one_rate.cache((X, y)).attribute(ExampleLoss(Xt, yt)), by_hand, rtol=1e-2)
    # checkpoint files carry the rates too; groups of mixed rates score as the sum of their members
    from_files = make_method("tracin", task, checkpoints=[s for s, _ in checkpoints]).cache((X, y))
    assert np.allclose(from_files.attribute(ExampleLoss(Xt, yt)), by_hand, rtol=1e-4, atol=1e-7)
    grouped = make_method("tracin", task, checkpoints=checkpoints).cache(
        (X, y), np.array([0, 0, 1, 1, 1, 2, 2])
    )
    summed = np.stack([by_hand[:, :2].sum(1), by_hand[:, 2:5].sum(1), by_hand[:, 5:].sum(1)], axis=1)
    assert np.allclose(grouped.attribute(ExampleLoss(Xt, yt)), summed, rtol=1e-4, atol=1e-7)
    # through the head alone one rate applies: the plain Grad-Dot path, scaled
    head = AttributionTask(model, layers=["2"])
    head_scores = (
        make_method("tracin", head, checkpoints=checkpoints).cache((X, y)).attribute(ExampleLoss(Xt, yt))
    )
    plain = sum(
        lr["2.weight"] * make_method("grad-dot", head.at(s)).cache((X, y)).attribute(ExampleLoss(Xt, yt))
        for s, lr in checkpoints
    )
    assert np.allclose(head_scores, plain, rtol=1e-5)


def test_bad_learning_rates_are_one_error_line(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    task = AttributionTask(model)
    X, y = np.zeros((3, 4), np.float32), np.arange(3)
    state = model.state_dict()
    for bad in ["fast", {}, {"0.weight": "x"}, True]:
        with pytest.raises(GGDAError, match="learning rate must be a number"):
            make_method("tracin", task, checkpoints=[(state, bad)])
    partial = make_method("tracin", task, checkpoints=[(state, {"2.weight": 0.1, "2.bias": 0.1})]).cache(
        (X, y)
    )
    with pytest.raises(GGDAError, match="no rate for attributed parameters"):
        partial.attribute(ExampleLoss(X[:1], y[:1]))
