"""Ground truth for the fidelity suite: exact retraining of the models the methods attribute.

* **Convex case** — multinomial logistic regression with an L2 term, fitted by Newton's method to
  a gradient norm below 1e-11 (float64), so leave-one-out, leave-group-out and LDS subsets are
  retrained *exactly* (warm-started from θ̂, quadratic convergence). Removal means training on the
  remaining rows with the same recipe: the mean loss over the n − |S| remaining points plus the
  same (wd/2)‖θ‖² (the 1/(n − |S|) renormalisation).
* **MLP / CNN** — paired-seed retraining: for every seed s the full model and every
  leave-group-out model start from the same initialisation and see the same shuffled order of
  the training set with the removed rows deleted (later batches shift, FiMODA's
  ``RandomSamplerLOO``). The truth of group j is the mean over seeds of f(θ_{s,−S_j}) − f(θ_s).
  All runs of one seed train together as one stacked model.

Everything is cost-oriented like ggda's properties: a target's value is its test loss, and the
truth of a removal is the change of that loss (positive = the removed points were helpful).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

# -- convex case: multinomial logistic regression by Newton -----------------------------------


class LogReg:
    """argmin_θ (1/Σw) Σ_i w_i CE(W x̃_i, y_i) + (wd/2)‖W‖² over W (C, d+1) (bias = last column)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, n_classes: int, wd: float) -> None:
        self.X = torch.as_tensor(np.c_[X, np.ones(len(X))], dtype=torch.float64)
        self.y = torch.as_tensor(y, dtype=torch.long)
        self.C, self.wd = int(n_classes), float(wd)
        self.Y = F.one_hot(self.y, self.C).double()

    def _grad_hess(self, W: torch.Tensor, w: torch.Tensor):
        X, C = self.X, self.C
        d1 = X.shape[1]
        N = float(w.sum())
        P = torch.softmax(X @ W.T, dim=1)  # (n, C)
        G = ((P - self.Y) * w[:, None]).T @ X / N + self.wd * W  # (C, d+1)
        Z = (X[:, None, :] * (P * w.sqrt()[:, None])[:, :, None]).reshape(len(X), C * d1)
        H = -(Z.T @ Z)
        for a in range(C):
            blk = slice(a * d1, (a + 1) * d1)
            H[blk, blk] += (X * (w * P[:, a])[:, None]).T @ X
        H /= N
        H.diagonal().add_(self.wd)
        return G, H

    def loss(self, W: torch.Tensor, w: torch.Tensor) -> float:
        z = self.X @ W.T
        ce = torch.logsumexp(z, 1) - z.gather(1, self.y[:, None])[:, 0]
        return float((w * ce).sum() / w.sum() + 0.5 * self.wd * (W**2).sum())

    def fit(self, w: np.ndarray | None = None, W0: torch.Tensor | None = None, tol: float = 1e-11):
        """Newton with backtracking to ‖∇‖ < ``tol``; returns (W, iterations, final gradient norm)."""
        w = torch.ones(len(self.X), dtype=torch.float64) if w is None else torch.as_tensor(w).double()
        W = torch.zeros(self.C, self.X.shape[1], dtype=torch.float64) if W0 is None else W0.clone()
        gnorm = float("inf")
        for it in range(100):
            G, H = self._grad_hess(W, w)
            gnorm = float(G.norm())
            if gnorm < tol:
                return W, it, gnorm
            step = torch.linalg.solve(H, G.reshape(-1)).reshape(W.shape)
            t, f0 = 1.0, self.loss(W, w)
            while t > 1e-8 and self.loss(W - t * step, w) > f0 + 1e-14 * abs(f0):
                t *= 0.5
            W = W - t * step
        raise RuntimeError(f"Newton did not reach ‖∇‖ < {tol:g} (last {gnorm:.2e})")

    @staticmethod
    def target_losses(W: torch.Tensor, Xt: np.ndarray, yt: np.ndarray) -> np.ndarray:
        Xb = torch.as_tensor(np.c_[Xt, np.ones(len(Xt))], dtype=torch.float64)
        z = Xb @ W.T
        yt = torch.as_tensor(yt, dtype=torch.long)
        return (torch.logsumexp(z, 1) - z.gather(1, yt[:, None])[:, 0]).numpy()

    def module(self, W: torch.Tensor) -> torch.nn.Linear:
        """The fitted model as the ``nn.Linear`` (float64) the methods attribute."""
        d = self.X.shape[1] - 1
        lin = torch.nn.Linear(d, self.C).double()
        with torch.no_grad():
            lin.weight.copy_(W[:, :d])
            lin.bias.copy_(W[:, d])
        return lin


def removal_truth(lr: LogReg, W: torch.Tensor, removals: list[np.ndarray], Xt, yt) -> tuple[np.ndarray, dict]:
    """(T, R) change of every target's loss when each index set is removed (exact retraining)."""
    base = lr.target_losses(W, Xt, yt)
    out = np.zeros((len(yt), len(removals)))
    its, gmax = [], 0.0
    for r, idx in enumerate(removals):
        w = np.ones(len(lr.X))
        w[idx] = 0.0
        Wr, it, g = lr.fit(w, W)
        its.append(it)
        gmax = max(gmax, g)
        out[:, r] = lr.target_losses(Wr, Xt, yt) - base
    return out, {"newton_iterations_mean": float(np.mean(its)), "max_grad_norm": gmax}


def subset_values(lr: LogReg, W: torch.Tensor, subsets: list[np.ndarray], Xt, yt) -> np.ndarray:
    """(T, M) target losses of the model retrained on each kept-index subset (LDS)."""
    out = np.zeros((len(yt), len(subsets)))
    for m, keep in enumerate(subsets):
        w = np.zeros(len(lr.X))
        w[keep] = 1.0
        Wm, _, _ = lr.fit(w, W)
        out[:, m] = lr.target_losses(Wm, Xt, yt)
    return out


# -- non-convex: paired-seed stacked retraining ------------------------------------------------


def stacked_train(
    make_model,
    X: np.ndarray,
    y: np.ndarray,
    keeps: list[np.ndarray | None],
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    wd: float,
    momentum: float = 0.9,
    checkpoints: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Train one model per entry of ``keeps`` (index arrays of the rows kept, None = all) as one
    stacked model: same initialisation (``seed``), same per-epoch shuffle with the removed rows
    deleted; SGD with momentum on the mean batch loss + (wd/2)‖θ‖² (float32).

    ``checkpoints`` > 0: instead return that many snapshots of the first run, evenly spaced over
    the epochs (the last one is the final model), for TracIn."""
    torch.manual_seed(seed)
    model = make_model()
    names = [k for k, _ in model.named_parameters()]
    R, n = len(keeps), len(X)
    params = {
        k: v.detach().unsqueeze(0).repeat(R, *([1] * v.ndim)).clone() for k, v in model.named_parameters()
    }
    vel = {k: torch.zeros_like(v) for k, v in params.items()}
    Xt = torch.as_tensor(X, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    kept = np.ones((R, n), dtype=bool)
    for r, keep in enumerate(keeps):
        if keep is not None:
            kept[r] = False
            kept[r, keep] = True

    fwd = _stacked_forward(model)

    rng = np.random.default_rng(seed)
    every = max(1, epochs // checkpoints) if checkpoints else 0
    snaps = []
    for epoch in range(epochs):
        perm = rng.permutation(n)
        orders = [perm[kept[r, perm]] for r in range(R)]
        steps = max(-(-len(o) // batch_size) for o in orders)
        idx = np.zeros((R, steps * batch_size), dtype=np.int64)
        mask = np.zeros((R, steps * batch_size), dtype=np.float32)
        for r, o in enumerate(orders):
            idx[r, : len(o)] = o
            mask[r, : len(o)] = 1.0
        idx_t, mask_t = torch.as_tensor(idx), torch.as_tensor(mask)
        for s in range(steps):
            sl = slice(s * batch_size, (s + 1) * batch_size)
            ib, mb = idx_t[:, sl], mask_t[:, sl]
            active = (mb.sum(1) > 0).float()
            leaves = {k: v.requires_grad_(True) for k, v in params.items()}
            z = fwd(leaves, Xt[ib])  # (R, B, C)
            ce = F.cross_entropy(z.flatten(0, 1), yt[ib].flatten(), reduction="none").view(mb.shape)
            total = ((ce * mb).sum(1) / mb.sum(1).clamp_min(1.0)).sum()  # runs are independent
            g = dict(zip(names, torch.autograd.grad(total, [leaves[k] for k in names]), strict=True))
            params = {k: v.detach() for k, v in leaves.items()}
            for k in names:
                shape = (R,) + (1,) * (params[k].ndim - 1)
                a = active.reshape(shape)
                vel[k] = torch.where(a > 0, momentum * vel[k] + g[k] + wd * params[k], vel[k])
                params[k] = params[k] - lr * a * vel[k]
        if every and (epochs - 1 - epoch) % every == 0 and len(snaps) < checkpoints:
            snaps.append({k: params[k][0].clone() for k in names})
    if checkpoints:
        return snaps
    return [{k: params[k][r].clone() for k in names} for r in range(R)]


def _stacked_forward(model: torch.nn.Module):
    """(R-stacked params, (R, B, ...) inputs) -> (R, B, C): batched GEMMs for a Linear/ReLU chain
    (several times faster than ``vmap`` on small layers), ``vmap(functional_call)`` otherwise."""
    layers = list(model) if isinstance(model, torch.nn.Sequential) else []
    if layers and all(isinstance(m, torch.nn.Linear | torch.nn.ReLU) for m in layers):
        names = [(f"{i}.weight", f"{i}.bias") for i, m in enumerate(layers) if isinstance(m, torch.nn.Linear)]

        def chain(p, xb):
            h, k = xb, 0
            for m in layers:
                if isinstance(m, torch.nn.Linear):
                    w, b = names[k]
                    h = torch.baddbmm(p[b][:, None, :], h, p[w].transpose(1, 2))
                    k += 1
                else:
                    h = torch.relu(h)
            return h

        return chain
    if layers and all(
        isinstance(
            m, torch.nn.Unflatten | torch.nn.Conv2d | torch.nn.ReLU | torch.nn.Flatten | torch.nn.Linear
        )
        for m in layers
    ):
        return _stacked_conv(layers)
    return vmap(lambda p, xb: functional_call(model, p, (xb,)), in_dims=(0, 0))


def _stacked_conv(layers):
    """R small CNNs as one grouped convolution (groups = R): run r's channels are group r."""

    def net(p, xb):
        R, B = xb.shape[:2]
        h = xb.reshape(R * B, *xb.shape[2:])
        conv_mode = False
        for i, m in enumerate(layers):
            if isinstance(m, torch.nn.Unflatten):
                h = m(h)  # (R·B, C, H, W)
                h = h.reshape(R, B, *h.shape[1:]).transpose(0, 1).reshape(B, R * h.shape[1], *h.shape[2:])
                conv_mode = True
            elif isinstance(m, torch.nn.Conv2d):
                w, b = p[f"{i}.weight"], p[f"{i}.bias"]  # (R, out, in, k, k), (R, out)
                h = F.conv2d(
                    h,
                    w.reshape(-1, *w.shape[2:]),
                    b.reshape(-1),
                    stride=m.stride,
                    padding=m.padding,
                    groups=R,
                )
            elif isinstance(m, torch.nn.ReLU):
                h = torch.relu(h)
            elif isinstance(m, torch.nn.Flatten):
                h = h.reshape(B, R, -1).transpose(0, 1)  # (R, B, C·H·W) in run r's channel order
                conv_mode = False
            else:
                w, b = p[f"{i}.weight"], p[f"{i}.bias"]
                h = torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))
        assert not conv_mode
        return h

    return net


def target_losses_of(
    make_model, params: dict[str, torch.Tensor], Xt: np.ndarray, yt: np.ndarray
) -> np.ndarray:
    model = make_model()
    with torch.no_grad():
        z = functional_call(model, params, (torch.as_tensor(Xt, dtype=torch.float32),))
        return F.cross_entropy(z, torch.as_tensor(yt, dtype=torch.long), reduction="none").double().numpy()


def paired_seed_truth(
    make_model, X, y, Xt, yt, groups: list[np.ndarray], seeds: int, **train
) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """Paired-seed leave-group-out: ((S, T, K) per-seed changes, full models per seed, their
    (S, T) target losses)."""
    n = len(X)
    keeps: list[np.ndarray | None] = [None] + [np.setdiff1d(np.arange(n), g) for g in groups]
    diffs, fulls, base = [], [], []
    for s in range(seeds):
        models = stacked_train(make_model, X, y, keeps, seed=s, **train)
        losses = np.stack([target_losses_of(make_model, p, Xt, yt) for p in models], 1)  # (T, 1+K)
        diffs.append(losses[:, 1:] - losses[:, :1])
        fulls.append(models[0])
        base.append(losses[:, 0])
    return np.stack(diffs), fulls, np.stack(base)
