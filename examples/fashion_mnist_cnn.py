"""Bring your own CNN, torch Dataset and training loop: attribute Fashion-MNIST with ggda.

A PyTorch user's usual setup, unchanged: the full Fashion-MNIST (60,000 + 10,000 images, read as
uint8 from the Debian package ``dataset-fashion-mnist``; ``make data``) behind a plain torch
``Dataset`` with a transform, a small ResNet with batch norm and a plain training loop that saves a
few checkpoints. ggda then

1. attributes test losses to training images with TracIn, EK-FAC and TRAK, per point and on
   Grad-K-Means groups (per class), reading the images a batch at a time through the ``Dataset``
   (no float copy of the training set is ever built), and reports each phase's time and peak memory;
2. scores the group attributions by retraining: remove the most helpful groups, retrain with
   *this file's* training function, compare the accuracy drop with removing random images.

Run::

    .venv/bin/python examples/fashion_mnist_cnn.py --quick                 # 2,000 images, ~2 min
    .venv/bin/python examples/fashion_mnist_cnn.py --out runs/fashion-cnn  # all 60,000 images
    .venv/bin/python examples/fashion_mnist_cnn.py --skip-retraining --methods tracin,trak

The ggda-facing code is :func:`attribute` and :func:`retraining`; everything above them is what a
PyTorch user already has.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ggda.data.sources import from_torch
from ggda.evaluate import Retrainer, RetrainSpec, retraining_score
from ggda.execution import SerialExecutor, make_executor
from ggda.groups.make import make_grouping
from ggda.methods import make_method
from ggda.models.recipe import UserRecipe
from ggda.properties import ExampleLoss, MeanLoss
from ggda.task import AttributionTask

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics
METHODS = ("tracin", "ekfac", "trak")


# -- the user's data: uint8 images behind a torch Dataset with a transform ---------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a uint8 array, e.g. (60000, 28, 28) images or (60000,) labels."""
    raw = gzip.open(path, "rb").read()
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3])]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(dims)


def load_split(split: str, n: int | None = None, root: Path = FASHION) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 28, 28), labels uint8 (n,)) of ``train`` or ``test`` (``t10k``)."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return images[:n], labels[:n]


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 (28, 28) -> float (1, 28, 28), standardised. Deterministic (no augmentation): every
    pass over the attribution data must see the same inputs."""
    return ((image.float() / 255.0 - MEAN) / STD)[None]


class FashionImages(Dataset):
    """uint8 images + labels; ``transform`` runs per item, so float images exist a batch at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=normalize) -> None:
        self.images, self.transform = images, transform
        self.targets = np.asarray(labels, dtype=np.int64)  # ggda reads the labels from here

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(torch.from_numpy(self.images[i].copy())), int(self.targets[i])


# -- the user's model: a small ResNet with batch norm ------------------------------------------------
class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem (28x28, max-pooled) -> residual blocks at 14, 7 and 4 pixels -> average pool -> linear."""

    def __init__(self, width: int = 16, n_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.layer1 = Block(w, w)
        self.layer2 = Block(w, 2 * w, stride=2)
        self.layer3 = Block(2 * w, 4 * w, stride=2)
        self.fc = nn.Linear(4 * w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def make_model(seed: int, width: int = 16) -> nn.Module:
    """A fresh, seeded model (the factory ggda calls for every retrain)."""
    torch.manual_seed(seed)
    return ResNet(width)


# -- the user's training loop ------------------------------------------------------------------------
def train(
    model: nn.Module,
    data: Dataset,
    seed: int,
    epochs: int | None = None,
    on_epoch=None,
    *,
    default_epochs: int = 2,
    lr: float = 3e-3,
    batch_size: int = 64,
    n_checkpoints: int = 0,
) -> list[tuple[dict, float]]:
    """Plain PyTorch: seeded shuffling, Adam, mean cross-entropy.

    The first five arguments are ggda's training-function contract (``data``: a torch Dataset of
    the kept examples; ``epochs``/``on_epoch`` are used by the gold standard). Returns
    ``n_checkpoints`` evenly spaced ``(state_dict, lr)`` pairs for TracIn (the last: the final model).
    """
    epochs = epochs or default_epochs
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * len(loader)
    save_at = (
        {round(total * (i + 1) / n_checkpoints) for i in range(n_checkpoints)} if n_checkpoints else set()
    )
    checkpoints, step = [], 0
    for epoch in range(1, epochs + 1):
        model.train()
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step in save_at:
                checkpoints.append((copy.deepcopy(model.state_dict()), lr))
        if on_epoch is not None:
            on_epoch(epoch, model)
    model.eval()
    return checkpoints


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(data, batch_size=batch_size))
    return correct / len(data)


# -- peak memory of each phase (Linux) ---------------------------------------------------------------
def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Time and peak resident memory (VmHWM) of named phases, in MiB above the RSS at creation.

    The kernel's peak mark is reset at the start of every phase (``/proc/self/clear_refs``), so a
    phase's peak is its own, not the training's before it.
    """

    def __init__(self) -> None:
        self.phases: dict[str, dict] = {}
        self.base = self._reset()

    @staticmethod
    def _reset() -> float:
        with contextlib.suppress(OSError):  # not Linux / not allowed: peaks then include the past
            Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_mb("VmRSS")

    @contextlib.contextmanager
    def phase(self, name: str):
        self._reset()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            peak = _proc_status_mb("VmHWM") - self.base
            self.phases[name] = {"seconds": time.perf_counter() - t0, "peak_mb": peak}

    @property
    def peak_mb(self) -> float:
        return max((p["peak_mb"] for p in self.phases.values()), default=0.0)


# -- ggda: attribution -------------------------------------------------------------------------------
class ChunkedMeanLoss(MeanLoss):
    """The mean test loss, its gradient summed ``rows`` test images at a time.

    Workaround: methods ask ``MeanLoss.gradients`` for its default 512-image chunks, ~250 MB of
    activations for this CNN whatever the methods' memory options say.
    """

    def __init__(self, data, rows: int) -> None:
        super().__init__(data)
        self.rows = rows

    def gradients(self, task, params=None, chunk_size=512):
        return super().gradients(task, params, chunk_size=min(chunk_size, self.rows))


def method_options(name: str, task: AttributionTask, checkpoints=(), trak_dim: int = 256, rows: int = 32):
    """Each method's options; ``rows`` training images per gradient pass bounds the working memory."""
    opts: dict = {"max_batch": rows, "memory_mb": 64.0}
    if name == "tracin":
        opts["checkpoints"] = list(checkpoints)  # the (state_dict, lr) pairs train() saved
    elif name == "ekfac":
        # the empirical Fisher: one output cotangent per image instead of ten (~3x faster here)
        opts.update(fisher="empirical", chunk_size=rows)
    elif name == "trak":
        # Kronecker projection: no dense p x k matrix; memory_mb sets its target-gradient chunks
        opts.update(proj_dim=trak_dim, projection="kronecker", memory_mb=rows * task.n_params * 4 / 2**20)
    return opts


def attribute(
    model: nn.Module,
    train_set: Dataset,
    targets: Dataset,
    test_set: Dataset | None = None,
    *,
    methods=METHODS,
    checkpoints=(),
    n_groups: int = 100,
    trak_dim: int = 256,
    rows: int = 32,
    memory: PeakMemory | None = None,
    log=print,
) -> dict:
    """Every method per point and on Grad-K-Means groups: scores, grouping, time and peak memory.

    ``targets``: the test images explained one by one (``ExampleLoss``). ``test_set``: when given,
    the group attributions also score the mean test loss on it (what the retraining score ranks).
    """
    memory = memory or PeakMemory()
    train = from_torch(train_set)  # lazy: labels now (from .targets), images a batch at a time
    # Attribute through the convolution and linear weights; batch-norm scales and shifts are held
    # fixed (EK-FAC has no Kronecker factors for them; TRAK's Kronecker projection needs this too).
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    task = AttributionTask(model, loss=nn.CrossEntropyLoss(reduction="none"), layers=layers)
    per_example = ExampleLoss(targets)
    mean_loss = ChunkedMeanLoss(test_set, rows) if test_set is not None else None

    with memory.phase("grouping"):  # last-layer gradients (projected to 128-d: not n x 650 floats)
        grouping = make_grouping(
            "grad-kmeans",
            train,
            n_groups=n_groups,
            task=task,
            per_class=True,
            seed=0,
            chunk_size=rows,
            projection_dim=128,
        )
    log(f"grad-kmeans per class: {grouping.n_groups} groups in {memory.phases['grouping']['seconds']:.1f} s")
    out: dict = {"grouping": grouping, "methods": {}, "memory": memory}
    for name in methods:
        res = out["methods"][name] = {}
        opts = method_options(name, task, checkpoints, trak_dim, rows)
        with memory.phase(f"{name} points"):
            res["points"] = make_method(name, task, **opts).cache(train).attribute(per_example)
        with memory.phase(f"{name} groups"):
            method = make_method(name, task, **opts).cache(train, grouping)
            res["groups"] = method.attribute(per_example)
        if mean_loss is not None:
            with memory.phase(f"{name} mean-loss"):
                res["groups_mean_loss"] = method.attribute(mean_loss)
        p, g = memory.phases[f"{name} points"], memory.phases[f"{name} groups"]
        log(
            f"{name:>7}: per point {p['seconds']:6.1f} s (+{p['peak_mb']:.0f} MiB), on {grouping.n_groups} "
            f"groups {g['seconds']:6.1f} s (+{g['peak_mb']:.0f} MiB): {p['seconds'] / g['seconds']:.1f}x"
        )
    return out


# -- ggda: retraining score with this file's training function ----------------------------------------
def retraining(
    train_set: Dataset,
    test_set: Dataset,
    rankings: dict,
    store: Path,
    *,
    width: int = 16,
    epochs: int = 1,
    lr: float = 3e-3,
    fractions=(0.1,),
    seeds=(0,),
    workers: int = 1,
):
    """Remove the top ``fractions`` of training images (whole groups, most helpful first), retrain
    from scratch with :func:`train` for each seed, and compare with removing random images."""
    recipe = UserRecipe(
        functools.partial(make_model, width=width),
        functools.partial(train, default_epochs=epochs, lr=lr),
    )  # the partials' settings (width, epochs, lr) are part of the recipe's stored identity
    executor = SerialExecutor() if workers <= 1 else make_executor("local", workers=workers)
    retrainer = Retrainer(
        RetrainSpec(recipe=recipe), store, executor, from_torch(train_set), from_torch(test_set)
    )
    return retraining_score(retrainer, rankings, fractions=fractions, seeds=seeds)


# -- command line ------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="2,000 training / 500 test images, 1 epoch, 40 groups"
    )
    p.add_argument("--n-train", type=int, default=60_000)
    p.add_argument("--n-test", type=int, default=10_000, help="test images (accuracy, mean test loss)")
    p.add_argument("--targets", type=int, default=20, help="test images attributed one by one")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--width", type=int, default=16, help="channels of the first block (x2, x4 after)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate")
    p.add_argument("--checkpoints", type=int, default=3, help="TracIn checkpoints saved while training")
    p.add_argument("--groups", type=int, default=100, help="Grad-K-Means groups (split across classes)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--trak-dim", type=int, default=256)
    p.add_argument("--rows", type=int, default=32, help="training images per ggda gradient pass (memory)")
    p.add_argument("--retrain-epochs", type=int, default=1)
    p.add_argument("--fractions", default="0.1", help="removal fractions, e.g. 0.05,0.1,0.2")
    p.add_argument("--seeds", type=int, default=1, help="retraining seeds")
    p.add_argument("--workers", type=int, default=1, help="retraining processes (1: in this process)")
    p.add_argument("--skip-retraining", action="store_true")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads: 1 on a shared 2-core machine (two BLAS threads next to other busy "
        "processes ran 3-4x slower here), 2 on an idle one",
    )
    p.add_argument("--data-dir", type=Path, default=FASHION)
    p.add_argument(
        "--out", type=Path, default=None, help="write scores (.npy), model.pt and summary.json here"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.epochs = min(args.n_train, 2000), min(args.n_test, 500), 1
        args.groups = min(args.groups, 40)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        p.error(f"unknown method(s) {unknown}; choose from {','.join(METHODS)}")
    args.fractions = tuple(float(f) for f in args.fractions.split(","))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.data_dir / "train-images-idx3-ubyte.gz").exists():
        print(f"error: Fashion-MNIST is not in {args.data_dir}; run make data", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    summary: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

    # The user's side: data, model, training.
    t0 = time.perf_counter()
    train_set = FashionImages(*load_split("train", args.n_train, args.data_dir))
    test_set = FashionImages(*load_split("test", args.n_test, args.data_dir))
    targets = FashionImages(test_set.images[: args.targets], test_set.targets[: args.targets])
    model = make_model(0, args.width)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(train_set):,} training / {len(test_set):,} test images; ResNet, {n_params:,} parameters")
    checkpoints = train(
        model, train_set, 0, default_epochs=args.epochs, lr=args.lr, n_checkpoints=args.checkpoints
    )
    acc = evaluate(model, test_set)
    summary["train"] = {"seconds": time.perf_counter() - t0, "test_accuracy": acc, "n_params": n_params}
    print(f"trained {args.epochs} epoch(s) in {summary['train']['seconds']:.1f} s; test accuracy {acc:.3f}")

    # ggda: attribution, with each phase's time and peak memory.
    memory = PeakMemory()
    t0 = time.perf_counter()
    result = attribute(
        model,
        train_set,
        targets,
        None if args.skip_retraining else test_set,
        methods=args.methods,
        checkpoints=checkpoints,
        n_groups=args.groups,
        trak_dim=args.trak_dim,
        rows=args.rows,
        memory=memory,
    )
    input_mb = len(train_set) * 28 * 28 * 4 / 2**20
    summary["attribution"] = {
        "seconds": time.perf_counter() - t0,
        "n_groups": int(result["grouping"].n_groups),
        "peak_rss_increase_mb": memory.peak_mb,
        "float32_input_matrix_mb": input_mb,
        "phases": memory.phases,
    }
    print(
        f"attribution: {summary['attribution']['seconds']:.1f} s, peak RSS +{memory.peak_mb:.0f} MiB "
        f"(a float32 copy of the training images would be {input_mb:.0f} MiB)"
    )
    print(f"test image 0 ({CLASSES[targets.targets[0]]}), most helpful training images:")
    for name, r in result["methods"].items():
        top = np.argsort(-r["points"][0])[:5]
        print(f"  {name:>7}: " + ", ".join(f"{i} ({CLASSES[train_set.targets[i]]})" for i in top))

    # ggda: retraining score of the group attributions of the mean test loss, with train() above.
    if not args.skip_retraining:
        grouping = result["grouping"]
        rankings = {
            f"{m}-grad-kmeans": (r["groups_mean_loss"], grouping) for m, r in result["methods"].items()
        }
        t0 = time.perf_counter()
        removal = retraining(
            train_set,
            test_set,
            rankings,
            (args.out or Path("runs/fashion-cnn")) / "retrains",
            width=args.width,
            epochs=args.retrain_epochs,
            lr=args.lr,
            fractions=args.fractions,
            seeds=tuple(range(args.seeds)),
            workers=args.workers,
        )
        table = removal.table()
        summary["retraining"] = {"seconds": time.perf_counter() - t0, "rows": table.to_dict("records")}
        print(
            f"retraining score ({summary['retraining']['seconds']:.1f} s; lower accuracy = better attribution):"
        )
        print(table[["label", "fraction", "n_removed", "acc_mean", "drop"]].to_string(index=False))

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, r in result["methods"].items():
            np.save(args.out / f"{name}-points.npy", r["points"])
            np.save(args.out / f"{name}-groups.npy", r["groups"])
        np.save(args.out / "groups.npy", result["grouping"].labels)
        torch.save(
            {"width": args.width, "model": model.state_dict(), "checkpoints": checkpoints},
            args.out / "model.pt",
        )
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
        print(f"wrote {args.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
