"""Train with the Hugging Face ``Trainer``, record checkpoints with ggda's callback, attribute with
TracIn and a TRAK checkpoint ensemble.

The model is trained the way a Hugging Face user already does it (``Trainer``,
``TrainingArguments``, a linear learning-rate decay); the only ggda line in training is
``callbacks=[GGDACheckpointCallback(out)]``, which saves the trainable parameters and the learning
rate after every epoch. ggda then reads them back with ``load_checkpoints`` and scores every
training sequence for the test loss of a few test sequences (positive = helpful).

A tiny BERT (2 layers, hidden 32, built from a config: nothing is downloaded) with frozen
embeddings learns whether a synthetic "review" holds more positive than negative words. Run
(offline, about a minute on one core)::

    .venv/bin/python examples/hf_trainer_tracin.py --out runs/hf-trainer

Needs ``pip install 'ggda[hf]'`` (transformers and accelerate). For your own model, replace
``build_model`` and ``make_reviews``; the AttributionTask needs the per-example loss and, for a
model that takes more than ``input_ids``, a batch format (see docs/bring-your-own.md).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the model is built from a config

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset, TensorDataset  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from ggda.integrations import load_checkpoints  # noqa: E402
from ggda.integrations.hf_trainer import GGDACheckpointCallback  # noqa: E402
from ggda.io import save_npz  # noqa: E402
from ggda.methods import make_method  # noqa: E402
from ggda.properties import ExampleLoss  # noqa: E402
from ggda.task import AttributionTask  # noqa: E402

VOCAB, LENGTH = 32, 12
POSITIVE, NEGATIVE = range(2, 8), range(8, 14)  # word ids; 14.. are filler


def make_reviews(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, LENGTH) token ids and labels: 1 when a review has more positive than negative words."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(14, VOCAB, (n, LENGTH), generator=g)
    for i in range(n):
        k_pos, k_neg = torch.randint(0, 4, (2,), generator=g).tolist()
        if k_pos == k_neg:
            k_pos += 1
        slots = torch.randperm(LENGTH, generator=g)[: k_pos + k_neg]
        words = [POSITIVE[j % 6] for j in torch.randint(0, 6, (k_pos,), generator=g).tolist()]
        words += [NEGATIVE[j % 6] for j in torch.randint(0, 6, (k_neg,), generator=g).tolist()]
        ids[i, slots] = torch.tensor(words)
    labels = (
        (ids[:, :, None] == torch.tensor(list(POSITIVE))).sum((1, 2))
        > ((ids[:, :, None] == torch.tensor(list(NEGATIVE))).sum((1, 2)))
    ).long()
    return ids, labels


class Reviews(Dataset):
    """The Trainer's view: one dict per example."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def build_model(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
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
        attn_implementation="eager",  # per-example gradients (torch.func.vmap) through plain attention
    )
    model = BertForSequenceClassification(config)
    for p in model.bert.embeddings.parameters():  # frozen: the callback does not save them
        p.requires_grad_(False)
    return model


def run(out: str | Path, n_train: int = 128, epochs: int = 4, n_targets: int = 4, seed: int = 0) -> dict:
    """Train with the callback, load the checkpoints, attribute; scores are written to
    ``OUT/scores.npz`` (targets × training examples)."""
    out = Path(out)
    ids, labels = make_reviews(n_train + 64, seed)
    train_ids, train_y = ids[:n_train], labels[:n_train]
    test_ids, test_y = ids[n_train:], labels[n_train:]  # 64 held out; the first n_targets are attributed
    model = build_model(seed)

    # -- training: the user's own Trainer, plus one callback --------------------------------------
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        learning_rate=2e-2,
        lr_scheduler_type="linear",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
    )
    callback = GGDACheckpointCallback(out, every=1, unit="epoch")
    Trainer(model=model, args=args, train_dataset=Reviews(train_ids, train_y), callbacks=[callback]).train()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(input_ids=test_ids).logits.argmax(1) == test_y).float().mean())

    # -- attribution: the checkpoints and rates the callback recorded -----------------------------
    checkpoints = load_checkpoints(out, model)  # frozen embeddings are filled in from `model`
    task = AttributionTask(model, loss=torch.nn.CrossEntropyLoss(reduction="none"))
    train = TensorDataset(train_ids, train_y)  # ggda reads input_ids positionally: model(input_ids)
    target = ExampleLoss(TensorDataset(test_ids[:n_targets], test_y[:n_targets]))
    tracin = make_method("tracin", task, checkpoints=checkpoints).cache(train).attribute(target)
    trak = (
        make_method("trak", task, checkpoints=checkpoints, ensemble="checkpoints", proj_dim=256)
        .cache(train)
        .attribute(target)
    )
    save_npz(out / "scores.npz", tracin=tracin, trak=trak, lrs=np.array([lr for _, lr in checkpoints]))

    print(f"{len(checkpoints)} checkpoints, learning rates {[round(lr, 5) for _, lr in checkpoints]}")
    print(f"held-out accuracy: {accuracy:.2f} (64 reviews)")
    for t in range(n_targets):
        helpful, harmful = np.argsort(-tracin[t])[:3], np.argsort(tracin[t])[:3]
        same = float((train_y[helpful] == test_y[t]).float().mean())
        print(
            f"target {t} (label {int(test_y[t])}): TracIn most helpful {helpful.tolist()} "
            f"({same:.0%} same label), most harmful {harmful.tolist()}; "
            f"TracIn vs TRAK rank correlation {_spearman(tracin[t], trak[t]):+.2f}"
        )
    return {"tracin": tracin, "trak": trak, "checkpoints": checkpoints, "accuracy": accuracy}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/hf-trainer", help="directory for checkpoints and scores")
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    torch.set_num_threads(1)
    run(a.out, a.n_train, a.epochs, a.targets, a.seed)


if __name__ == "__main__":
    main()
