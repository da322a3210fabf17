"""Runs one dattri 0.3.0 attribution inside ``benchmarks/.venv-dattri`` (torch + dattri only).

Usage: ``python dattri_worker.py JOB.npz OUT.npz`` — JOB holds the data, the model weights
(``param::NAME`` arrays), the architecture (``logreg``, ``mlp-s`` or ``resnet``: the ResNet of
``examples/fashion_mnist_cnn.py``), optionally the ``attributed`` parameter names (the others are
frozen) and TRAK's ``proj_type``, and the method settings; OUT gets the (n_train,
n_test) scores, the seconds spent in ``cache`` + ``attribute`` and the peak RSS (and, for IF-CG
with ``capture_solution`` in JOB, the (n_test, p) test gradients and the inverse-HVPs dattri computed).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent


def example_classes(path: Path, names: tuple[str, ...]) -> dict:
    """The classes ``names`` of an example script, executed without the rest of the script.

    Why: this venv has torch and dattri but not ggda, which the examples import; taking the
    class definitions out of the example's source keeps one definition of the architecture
    (a copy here could drift from it unnoticed)."""
    import ast

    tree = ast.parse(path.read_text())
    body = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in names]
    if {n.name for n in body} != set(names):
        raise SystemExit(f"{path} lacks one of {names}")
    namespace = {"torch": torch, "nn": nn, "F": nn.functional, "__name__": "example"}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return namespace


def build(arch: str) -> nn.Module:
    if arch == "logreg":
        return nn.Sequential(nn.Linear(784, 10))
    if arch == "resnet":  # examples/fashion_mnist_cnn.py's ResNet on flattened 28 x 28 rows
        classes = example_classes(HERE.parent / "examples" / "fashion_mnist_cnn.py", ("Block", "ResNet"))
        return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), classes["ResNet"]())
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def batch_of(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) with a batch dimension: dattri calls the loss and target functions on one example at
    a time under ``vmap`` (y a scalar), and a convolution needs a batch; batches pass through.
    The loss of a batch of one is the example's loss, so the MLP numbers are unchanged."""
    return (x[None], y[None]) if y.ndim == 0 else (x, y)


def trak_functions(model: nn.Module):
    """dattri's TRAK output function log(p / (1 - p)) and its correct-class probability for
    ``model``, shared by every dattri worker (this file and ``bench_trak_ensemble.py``)."""

    def margin_func(params, data):
        x, y = batch_of(*data)
        logp = -nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)
        return logp - torch.log(1 - torch.exp(logp))

    def correct_prob(params, data):
        x, y = data
        return torch.exp(
            -nn.functional.cross_entropy(torch.func.functional_call(model, params, x[None]), y[None])
        )

    return margin_func, correct_prob


def main(job_path: str, out_path: str) -> None:
    from dattri.algorithm import IFAttributorCG, IFAttributorExplicit, TracInAttributor, TRAKAttributor
    from dattri.task import AttributionTask

    job = np.load(job_path, allow_pickle=False)
    method, arch = str(job["method"]), str(job["arch"])
    model = build(arch)
    state = {k[len("param::") :]: torch.as_tensor(job[k]) for k in job.files if k.startswith("param::")}
    model.load_state_dict(state)
    model.eval()
    if "attributed" in job.files:  # only these parameters get gradients (dattri skips the others)
        attributed = {str(name) for name in job["attributed"]}
        for name, param in model.named_parameters():
            param.requires_grad_(name in attributed)
    Xtr, ytr = torch.as_tensor(job["Xtr"]), torch.as_tensor(job["ytr"]).long()
    Xte, yte = torch.as_tensor(job["Xte"]), torch.as_tensor(job["yte"]).long()
    train_bs, test_bs = int(job["train_bs"]), int(job["test_bs"])
    train_loader = DataLoader(TensorDataset(Xtr, ytr), batch_size=train_bs, shuffle=False)
    test_loader = DataLoader(TensorDataset(Xte, yte), batch_size=test_bs, shuffle=False)
    full_loader = DataLoader(TensorDataset(Xtr, ytr), batch_size=len(Xtr), shuffle=False)

    def loss_func(params, data):
        x, y = batch_of(*data)
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    margin_func, correct_prob = trak_functions(model)

    reg = float(job["regularization"])
    solutions: list[torch.Tensor] = []
    t0 = time.perf_counter()
    if method == "grad-dot":
        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
        attr = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=False, device="cpu")
        attr.projector_kwargs = None  # exact gradients (dattri projects to 512 dims by default)
        attr.cache()
        scores = attr.attribute(train_loader, test_loader)
    elif method in ("if-cg", "if-explicit"):
        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
        if method == "if-cg":
            attr = IFAttributorCG(
                task, max_iter=int(job["max_iter"]), tol=float(job["tol"]), regularization=reg
            )
        else:
            attr = IFAttributorExplicit(task, regularization=reg)
        attr.cache(full_loader)
        if (
            "capture_solution" in job.files
        ):  # keep the inverse-HVP dattri computes (its residual is measured outside)
            solve = attr.transform_test_rep

            def keep(ckpt_idx, test_rep, solve=solve):
                out = solve(ckpt_idx, test_rep)
                solutions.append((test_rep.detach().clone(), out.detach().clone()))
                return out

            attr.transform_test_rep = keep
        scores = attr.attribute(train_loader, test_loader)
    elif method == "trak":
        task = AttributionTask(loss_func=margin_func, model=model, checkpoints=model.state_dict())
        attr = TRAKAttributor(
            task,
            correct_probability_func=correct_prob,
            projector_kwargs={
                "proj_dim": int(job["proj_dim"]),
                "device": "cpu",
                **({"proj_type": str(job["proj_type"])} if "proj_type" in job.files else {}),
            },
            regularization=reg,
        )
        attr.cache(DataLoader(TensorDataset(Xtr, ytr), batch_size=train_bs, shuffle=False))
        scores = attr.attribute(test_loader)
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - t0
    from common import peak_rss_mb  # this folder is on sys.path: the worker runs as a script

    peak_mb = peak_rss_mb()
    extra = {}
    if solutions:  # the right-hand sides dattri solved for (its own test gradients) and its solutions
        extra = {
            "rhs": torch.cat([b for b, _ in solutions]).numpy(),
            "solution": torch.cat([x for _, x in solutions]).numpy(),
        }
    np.savez(out_path, scores=scores.detach().numpy(), seconds=seconds, peak_mb=peak_mb, **extra)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
