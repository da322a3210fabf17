"""The Hugging Face Trainer callback records the trajectory ggda's TracIn needs (issue 19, item 7).

A tiny BERT (2 layers, hidden 32, built from a config: nothing is downloaded) with frozen
embeddings is trained by ``transformers.Trainer`` for 2 epochs on 64 synthetic token sequences
under a linear learning-rate decay. Checked: the saved tensors are the model's parameters at the
scheduled steps (frozen ones not saved), the learning rates are the scheduler's, and TracIn on the
loaded checkpoints equals Σ_c η_c ⟨∇ℓ(test; θ_c), ∇ℓ(train; θ_c)⟩ computed here with autograd.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

pytest.importorskip(
    "transformers", reason="the hf extra (transformers) is not installed: pip install 'ggda[hf]'"
)
pytest.importorskip("accelerate", reason="the hf extra (accelerate) is not installed: pip install 'ggda[hf]'")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ggda.data.sources import as_dataset  # noqa: E402
from ggda.errors import GGDAError  # noqa: E402
from ggda.integrations import INDEX_FILE, load_checkpoints, read_index  # noqa: E402
from ggda.integrations.hf_trainer import GGDACheckpointCallback  # noqa: E402
from ggda.methods import make_method  # noqa: E402
from ggda.properties import ExampleLoss  # noqa: E402
from ggda.task import AttributionTask  # noqa: E402

N, LENGTH, VOCAB, BATCH, EPOCHS, LR = 64, 8, 40, 16, 2, 5e-3
STEPS = EPOCHS * N // BATCH  # 8 optimizer steps


class Tokens(Dataset):
    """What a Trainer user hands it: one dict per example."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Witness(TrainerCallback):
    """The test's own record: the parameters after every step and the scheduler's rate for it."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.lrs: dict[int, float] = {}

    def on_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        self.lrs[state.global_step + 1] = float(lr_scheduler.get_last_lr()[0])  # before it steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (N, LENGTH))
    labels = (ids[:, :2].sum(1) > VOCAB).long()
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    model = BertForSequenceClassification(config)
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)  # frozen: not saved, filled from the model on load
    root = tmp_path_factory.mktemp("hf")
    by_step = GGDACheckpointCallback(root / "steps", every=3, unit="step")  # 3, 6 and the final 8
    by_epoch = GGDACheckpointCallback(root / "epochs")  # 4 and 8
    witness = Witness()
    args = TrainingArguments(
        output_dir=str(root / "trainer"),
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(ids, labels),
        callbacks=[witness, by_step, by_epoch],
    )
    trainer.train()
    model.eval()
    return model, ids, labels, root, witness


def test_checkpoints_are_the_parameters_and_rates_are_the_schedulers(trained):
    model, _, _, root, witness = trained
    assert sorted(witness.states) == list(range(1, STEPS + 1))
    for run, steps in (("steps", [3, 6, 8]), ("epochs", [4, 8])):
        index = read_index(root / run)
        assert [e["step"] for e in index["checkpoints"]] == steps
        assert index["trainer"] == "transformers.Trainer"
        for entry in index["checkpoints"]:
            s = entry["step"]
            # linear decay without warm-up: step s (1-based) uses LR * (STEPS - (s - 1)) / STEPS
            assert entry["lr"] == pytest.approx(witness.lrs[s], rel=1e-12)
            assert entry["lr"] == pytest.approx(LR * (STEPS - s + 1) / STEPS, rel=1e-9)
            assert entry["complete"] is False
            saved = torch.load(root / run / entry["file"], weights_only=True)["state_dict"]
            frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
            assert frozen and not frozen & set(saved)
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            assert trainable <= set(saved)
            for k, v in saved.items():
                assert torch.equal(v, witness.states[s][k]), (run, s, k)
        assert [e["epoch"] for e in read_index(root / "epochs")["checkpoints"]] == [1.0, 2.0]
    # the last checkpoint is the final model
    last, _ = load_checkpoints(root / "steps", model)[-1]
    for k, v in model.state_dict().items():
        assert torch.equal(last[k], v)


def per_example_grads(model, ids, labels, names) -> torch.Tensor:
    """(n, p) gradients of each example's cross-entropy w.r.t. the named parameters (autograd)."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(ids)):
        logits = model(input_ids=ids[i : i + 1]).logits
        loss = torch.nn.functional.cross_entropy(logits, labels[i : i + 1])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_tracin_on_trainer_checkpoints_is_the_brute_force_sum(trained):
    import copy

    model, ids, labels, root, _ = trained
    checkpoints = load_checkpoints(root / "steps", model)
    assert len(checkpoints) == 3
    task = AttributionTask(model, loss=torch.nn.CrossEntropyLoss(reduction="none"))
    train = as_dataset(TensorDataset(ids, labels))
    targets = as_dataset(TensorDataset(ids[:3] % (VOCAB - 1) + 1, labels[:3]))
    scores = make_method("tracin", task, checkpoints=checkpoints).cache(train).attribute(ExampleLoss(targets))

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = torch.zeros(3, N, dtype=torch.float64)
    for state, lr in checkpoints:
        at = copy.deepcopy(model)
        at.load_state_dict(state)
        G = per_example_grads(at, ids, labels, names).double()
        Gt = per_example_grads(at, ids[:3] % (VOCAB - 1) + 1, labels[:3], names).double()
        expected += lr * Gt @ G.T
    assert scores.shape == (3, N)
    assert np.allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    # the rates matter: unit weights give another answer
    plain = make_method("tracin", task, checkpoints=checkpoints, use_lr=False).cache(train)
    assert not np.allclose(plain.attribute(ExampleLoss(targets)), scores)


def test_trak_ensemble_over_trainer_checkpoints(trained):
    model, ids, labels, root, _ = trained
    checkpoints = load_checkpoints(root / "epochs", model)
    task = AttributionTask(model, loss=torch.nn.CrossEntropyLoss(reduction="none"))
    train = as_dataset(TensorDataset(ids, labels))
    targets = as_dataset(TensorDataset(ids[:3], labels[:3]))
    trak = make_method("trak", task, checkpoints=checkpoints, ensemble="checkpoints", proj_dim=64)
    scores = trak.cache(train).attribute(ExampleLoss(targets))
    assert len(trak.members) == 2 and scores.shape == (3, N) and np.isfinite(scores).all()
    # member m is the model at checkpoint m: the same as passing those models
    states = [task.at(state).model for state, _ in checkpoints]
    same = make_method("trak", task, models=states, ensemble="models", proj_dim=64).cache(train)
    assert np.allclose(same.attribute(ExampleLoss(targets)), scores, rtol=1e-5, atol=1e-8)


def test_partial_checkpoints_need_the_model_and_bad_dirs_are_one_line(trained, tmp_path):
    _, _, _, root, _ = trained
    with pytest.raises(GGDAError, match="pass model="):
        load_checkpoints(root / "steps")
    with pytest.raises(GGDAError, match=INDEX_FILE):
        load_checkpoints(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(GGDAError, match="not a ggda checkpoint index"):
        load_checkpoints(tmp_path)
    with pytest.raises(GGDAError, match="every"):
        GGDACheckpointCallback(tmp_path / "x", every=0)
    with pytest.raises(GGDAError, match="unit"):
        GGDACheckpointCallback(tmp_path / "x", unit="batch")
