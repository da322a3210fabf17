"""Bring your own Hugging Face model, ``datasets.Dataset`` and training loop: attribute MiniLM with ggda.

A text researcher's usual setup, unchanged: the packaged all-MiniLM-L6-v2 loaded as
``AutoModelForSequenceClassification(num_labels=2)``, the Women's E-Commerce Clothing Reviews
(negative = 1-2 stars, positive = 4-5 stars, classes balanced) in a Hugging Face
``datasets.Dataset`` tokenised with ``.map(batched=True)`` to a fixed length and
``with_format("torch")``, and a plain PyTorch loop that fine-tunes the last encoder layer, the
pooler and the classifier (everything else frozen). ggda then

1. attributes the test loss of the first ``--targets`` test reviews to the training reviews with
   Grad-Dot, TracIn (the epoch checkpoints), TRAK and DataInf (an influence function), per review
   and on Grad-K-Means groups, through the last layer + head only, reading the tokens a batch at a
   time from the Hugging Face dataset;
2. scores the group attributions by the linear datamodeling score (LDS): ``--lds-subsets`` random
   halves of the groups, each retrained with *this file's* model factory and training function on
   the kept rows (``hf_dataset.select(kept)``), and the rank correlation between predicted and
   actual test losses.

Run (all offline; the model and the reviews come from packages, see the README). Measured on the
shared 2-core CPU machine with 1 torch thread (faster there than 2)::

    .venv/bin/python examples/minilm_reviews_hf.py --quick               # 200 train: 3.7 min, 2.9 GB
    .venv/bin/python examples/minilm_reviews_hf.py --out runs/minilm-hf  # 1,000 train / 200 test,
                                                                        # 40 targets, 50 groups,
                                                                        # 10 LDS retrains: 14 min, 3.0 GB

``--quick`` checks the pipeline (14 optimiser steps: the model is barely trained). At the default
size fine-tuning takes 1.4 min (test accuracy 0.755), attribution 9.3 min (DataInf is half of it)
and the 10 LDS retrains 3.3 min; peak memory is set by the per-example gradients of the 1.9M
attributed parameters (32 at a time), not by the data.

The ggda-facing code is :func:`attribute` and :func:`lds_check` (a plain ``AttributionTask`` of
the model: ggda feeds it the dict batches and builds the vmap-safe attention mask itself);
everything else is what a Hugging Face user already has.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: model and data are packaged
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from ggda.data.sources import from_huggingface  # noqa: E402
from ggda.evaluate import Retrainer, RetrainSpec, lds  # noqa: E402
from ggda.execution import SerialExecutor  # noqa: E402
from ggda.groups.make import make_grouping  # noqa: E402
from ggda.methods import make_method  # noqa: E402
from ggda.models.recipe import UserRecipe  # noqa: E402
from ggda.properties import ExampleLoss  # noqa: E402
from ggda.task import AttributionTask  # noqa: E402

METHODS = ("grad-dot", "tracin", "trak", "datainf")
COLUMNS = ["input_ids", "attention_mask"]  # the model's keyword inputs, as the tokenizer names them


# -- the user's data: texts -> a tokenised Hugging Face dataset ------------------------------------
def load_reviews(n_train: int, n_test: int, seed: int = 0):
    """(train texts, train labels, test texts, test labels): balanced sentiment reviews."""
    from ggda.data.text import clothing_reviews

    corpus = clothing_reviews(n=n_train + n_test, balanced=True, seed=seed)
    order = np.random.default_rng(seed).permutation(len(corpus))
    tr, te = order[:n_train], order[n_train : n_train + n_test]
    texts = corpus.texts
    return [texts[i] for i in tr], corpus.y[tr], [texts[i] for i in te], corpus.y[te]


def hf_dataset(texts, labels, tokenizer, max_len: int):
    """A ``datasets.Dataset`` of fixed-length token ids + attention masks + labels, torch format."""
    import datasets

    raw = datasets.Dataset.from_dict({"text": list(texts), "label": [int(v) for v in labels]})
    tokenised = raw.map(
        lambda batch: tokenizer(
            batch["text"],
            padding="max_length",
            truncation=True,
            max_length=max_len,
            return_token_type_ids=False,
        ),
        batched=True,
        remove_columns=["text"],
    )
    return tokenised.with_format("torch", columns=[*COLUMNS, "label"])


# -- the user's model: a factory, picklable (retraining builds fresh copies from it) ----------------
def trained_prefixes(model: nn.Module) -> list[str]:
    """The fine-tuned parameters: last encoder layer, pooler, classifier (the rest is frozen)."""
    last = model.config.num_hidden_layers - 1
    return [f"bert.encoder.layer.{last}", "bert.pooler", "classifier"]


@dataclass(frozen=True)
class BertClassifier:
    """``seed -> model``: a BERT sequence classifier, only :func:`trained_prefixes` trainable.

    ``path``: a local model directory (the packaged MiniLM); or ``config``: ``BertConfig`` keyword
    arguments for a small randomly initialised model (the test uses one). Dropout is 0 so that
    training is a deterministic function of the data and the seed. The attention implementation
    is transformers' default: ggda builds the vmap-safe padding mask itself and switches SDPA to
    eager attention only if an influence function's curvature products need forward-mode AD.
    """

    path: str | None = None
    config: dict | None = None
    n_labels: int = 2

    def __call__(self, seed: int) -> nn.Module:
        from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        torch.manual_seed(seed)  # the new classifier head's initialisation
        common = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        if self.path is not None:
            model = AutoModelForSequenceClassification.from_pretrained(
                self.path,
                num_labels=self.n_labels,
                local_files_only=True,
                **common,
            )
        else:
            cfg = BertConfig(**{**self.config, **common, "num_labels": self.n_labels})
            model = BertForSequenceClassification(cfg)
        keep = tuple(p + "." for p in trained_prefixes(model))
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(keep))
        return model.float().eval()


# -- the user's training function: a plain PyTorch loop ---------------------------------------------
@dataclass(frozen=True)
class FineTune:
    """``(model, data, seed, epochs=None, on_epoch=None)``: AdamW on the trainable parameters over a
    shuffled ``DataLoader`` of ``data`` (a Hugging Face dataset of the kept rows, torch format)."""

    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 32

    def __call__(self, model, data, seed, epochs=None, on_epoch=None) -> None:
        gen = torch.Generator().manual_seed(int(seed))
        loader = DataLoader(data, batch_size=self.batch_size, shuffle=True, generator=gen)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.lr)
        for epoch in range(1, (epochs or self.epochs) + 1):
            model.train()
            for batch in loader:
                logits = model(**{c: batch[c] for c in COLUMNS}).logits
                loss = F.cross_entropy(logits, batch["label"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if on_epoch is not None:
                on_epoch(epoch, model)
        model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int = 128) -> float:
    model.eval()
    right = 0
    for batch in DataLoader(data, batch_size=batch_size):
        right += int((model(**{c: batch[c] for c in COLUMNS}).logits.argmax(-1) == batch["label"]).sum())
    return right / len(data)


# -- ggda: the task, attribution and LDS --------------------------------------------------------------
def method_options(name: str, checkpoints, trak_dim: int) -> dict:
    # max_batch=32: groups of more than 16 reviews get one batched backward each instead of padded
    # vmapped tiles (about 2x faster for this 1.9M-parameter layer, and less memory)
    opts: dict = {"max_batch": 32}
    if name == "tracin":
        opts["checkpoints"] = checkpoints  # (state_dict, lr) after every epoch
    elif name == "trak":  # block-diagonal projection: proj_dim split over the layers (8x cheaper here)
        opts.update(proj_dim=trak_dim, per_layer=True)
    elif name == "datainf":  # 32 per-example gradients (1.9M entries each) at a time, not 256
        opts["chunk_size"] = 32
    elif name in ("if-cg", "if-explicit", "ekfac"):
        opts["damping"] = 1e-3
    return opts


def attribute(model, checkpoints, train_hf, test_hf, n_targets, n_groups, methods, trak_dim, meter):
    """Per-review and per-group scores of every method, and the Grad-K-Means grouping."""
    train = from_huggingface(train_hf, label="label", inputs=COLUMNS)  # lazy: rows read per batch
    targets = from_huggingface(test_hf.select(range(n_targets)), label="label", inputs=COLUMNS)
    task = AttributionTask(model, layers=trained_prefixes(model))  # model(**batch), as in training
    prop = ExampleLoss(targets)  # one property per target review: its test loss
    with meter("grad-kmeans"):
        grouping = make_grouping("grad-kmeans", train, n_groups=n_groups, task=task, seed=0)
    points, groups = {}, {}
    for name in methods:
        opts = method_options(name, checkpoints, trak_dim)
        with meter(f"{name} points"):
            points[name] = make_method(name, task, **opts).cache(train).attribute(prop)
        with meter(f"{name} groups"):
            groups[name] = make_method(name, task, **opts).cache(train, grouping).attribute(prop)
    return points, groups, grouping, task


def lds_check(factory, train_fn, train_hf, test_hf, scores: dict, grouping, n_targets, n_subsets, store, key):
    """LDS of each method's group scores: retrain on ``n_subsets`` random halves of the groups."""
    train = from_huggingface(train_hf, label="label", inputs=COLUMNS)
    test = from_huggingface(test_hf.select(range(n_targets)), label="label", inputs=COLUMNS)
    recipe = UserRecipe(factory, train_fn, key=key)  # key + the callables' fields name the stored results
    retrainer = Retrainer(RetrainSpec(recipe=recipe), store, SerialExecutor(), train, test, progress=True)
    results = lds(retrainer, scores, grouping, n_subsets=n_subsets, seeds=(0,))
    return {name: r.score for name, r in results.items()}, retrainer.executed


# -- measurement ----------------------------------------------------------------------------------
def peak_mb() -> float:
    """Peak resident memory of this process (VmHWM) since the last :func:`reset_peak`, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Restart the VmHWM mark (Linux ``clear_refs``); elsewhere the peak keeps accumulating."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class Meter:
    """Seconds and peak resident memory of each phase: ``with meter("name"): ...``."""

    def __init__(self) -> None:
        self.phases: dict[str, dict] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        reset_peak()
        t0 = time.perf_counter()
        yield
        self.phases[name] = {"seconds": round(time.perf_counter() - t0, 1), "peak_mb": round(peak_mb())}
        print(
            f"  {name:16s} {self.phases[name]['seconds']:7.1f}s  peak {self.phases[name]['peak_mb']:6d} MB",
            flush=True,
        )

    @property
    def peak(self) -> float:
        return max((p["peak_mb"] for p in self.phases.values()), default=peak_mb())


# -- the whole run ----------------------------------------------------------------------------------
@dataclass
class Options:
    n_train: int = 1000
    n_test: int = 200
    max_len: int = 64
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 32
    targets: int = 40
    groups: int = 50
    lds_subsets: int = 10
    methods: tuple = METHODS
    trak_dim: int = 512
    out: Path | None = None


def run(factory: BertClassifier, tokenizer, data, opts: Options) -> dict:
    """Fine-tune, attribute, LDS. ``data``: (train texts, train labels, test texts, test labels)."""
    tr_texts, tr_y, te_texts, te_y = data
    meter = Meter()
    with meter("tokenise"):
        train_hf = hf_dataset(tr_texts, tr_y, tokenizer, opts.max_len)
        test_hf = hf_dataset(te_texts, te_y, tokenizer, opts.max_len)
    report: dict = {"n_train": len(train_hf), "n_test": len(test_hf), "max_len": opts.max_len}

    # 1. fine-tune (the user's own loop), keeping a TracIn checkpoint after every epoch
    train_fn = FineTune(opts.epochs, opts.lr, opts.batch_size)
    with meter("fine-tune"):
        model = factory(0)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        checkpoints = []

        def keep_checkpoint(epoch, m):  # frozen tensors are shared, only the trained ones copied
            state = {k: (v.detach().clone() if k in trainable else v) for k, v in m.state_dict().items()}
            checkpoints.append((state, opts.lr))

        train_fn(model, train_hf, seed=0, on_epoch=keep_checkpoint)
    report["test_accuracy"] = accuracy(model, test_hf)
    report["trainable_params"] = sum(model.get_parameter(n).numel() for n in trainable)
    print(f"  test accuracy {report['test_accuracy']:.3f}", flush=True)

    # 2. attribute
    n_targets = min(opts.targets, len(test_hf))
    points, groups, grouping, task = attribute(
        model, checkpoints, train_hf, test_hf, n_targets, opts.groups, opts.methods, opts.trak_dim, meter
    )
    report["attributed_params"] = task.n_params
    report["groups"] = grouping.n_groups
    for name in opts.methods:  # first-order methods: group score = sum of its members' scores
        summed = np.stack([points[name][:, grouping.labels == g].sum(1) for g in range(grouping.n_groups)], 1)
        report.setdefault("group_vs_summed_points_corr", {})[name] = float(
            np.corrcoef(summed.ravel(), groups[name].ravel())[0, 1]
        )
    first = points[opts.methods[0]][0]
    report["example"] = {
        "target": te_texts[0][:200],
        "target_label": int(te_y[0]),
        "most_helpful": tr_texts[int(first.argmax())][:200],
        "most_harmful": tr_texts[int(first.argmin())][:200],
    }

    # 3. LDS with the user's training function (a random attribution as the baseline: about 0)
    if opts.lds_subsets > 0:
        store = (opts.out or Path(tempfile.mkdtemp(prefix="ggda-minilm-"))) / "retrains"
        key = f"minilm-hf|max_len={opts.max_len}"  # factory and loop settings: UserRecipe digests them
        rand = np.random.default_rng(0).normal(size=groups[opts.methods[0]].shape)
        scores = {**groups, "random": rand}
        with meter("lds"):
            report["lds"], report["retrains"] = lds_check(
                factory,
                train_fn,
                train_hf,
                test_hf,
                scores,
                grouping,
                n_targets,
                opts.lds_subsets,
                store,
                key,
            )
    report["phases"] = meter.phases
    report["seconds"] = round(sum(p["seconds"] for p in meter.phases.values()), 1)
    report["peak_rss_mb"] = meter.peak
    if opts.out is not None:
        opts.out.mkdir(parents=True, exist_ok=True)
        for name in opts.methods:
            np.save(opts.out / f"points_{name}.npy", points[name])
            np.save(opts.out / f"groups_{name}.npy", groups[name])
        np.save(opts.out / "grouping.npy", grouping.labels)
    report["_scores"] = {"points": points, "groups": groups, "grouping": grouping}
    return report


def parse_args(argv=None) -> argparse.Namespace:
    d = Options()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="200 train / 40 test, 10 targets and groups, 4 LDS subsets"
    )
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--n-test", type=int, default=d.n_test, help="test reviews for the accuracy")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-len", type=int, default=d.max_len, help="tokens per review (padded/truncated)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--targets", type=int, default=d.targets, help="test reviews attributed one by one (and in the LDS)"
    )
    p.add_argument("--groups", type=int, default=d.groups, help="Grad-K-Means groups")
    p.add_argument(
        "--lds-subsets", type=int, default=d.lds_subsets, help="retrained halves of the groups (0: no LDS)"
    )
    p.add_argument("--methods", default=",".join(d.methods))
    p.add_argument("--trak-dim", type=int, default=d.trak_dim)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 was fastest on this shared 2-core machine)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="write scores (.npy), summary.json and retrains here"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test = 200, 40
        args.targets, args.groups, args.lds_subsets = 10, 10, 4
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ggda.models.text import load_tokenizer, minilm_path

    t0 = time.perf_counter()
    data = load_reviews(args.n_train, args.n_test)
    opts = Options(
        n_train=args.n_train, n_test=args.n_test, max_len=args.max_len, epochs=args.epochs, lr=args.lr,
        targets=args.targets, groups=args.groups, lds_subsets=args.lds_subsets,
        methods=tuple(m for m in args.methods.split(",") if m), trak_dim=args.trak_dim, out=args.out,
    )  # fmt: skip
    report = run(BertClassifier(path=str(minilm_path())), load_tokenizer(), data, opts)
    report.pop("_scores")
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)  # including loading the reviews
    report["threads"] = args.threads
    print(json.dumps(report, indent=2))
    if args.out is not None:
        (args.out / "summary.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
